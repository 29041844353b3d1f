"""r1v2 plan: AOT compilation of the GRPO train step for an abstract TPU topology (libtpu)."""

import json

import jax
import pytest

from r1v2_jax.cli import main
from r1v2_jax.convert.skywork_vl import config_dict
from r1v2_jax.model.config import TextConfig
from r1v2_jax.model.qwen2_5_vl import QwenVisionConfig, QwenVLConfig
from r1v2_jax.plan.topology import parse_topology

pytestmark = pytest.mark.slow  # the fast lane (-m "not slow") skips this module


def test_topology_names():
    t = parse_topology("v5p-128")
    assert (t.topology_name, t.chips) == ("v5p:4x4x4", 64) and t.hbm_bytes == 95 * 1024**3
    assert parse_topology("v5p-8").topology_name == "v5p:2x2x1"
    assert parse_topology("v6e-16").topology_name == "v6e:4x4"
    assert parse_topology("v4:2x2x2").chips == 8
    with pytest.raises(ValueError, match="expected e.g. v5p-128"):
        parse_topology("h100-8")


def test_plan_tiny_on_a_small_tpu_slice(tmp_path, capsys):
    pytest.importorskip("libtpu")
    out = tmp_path / "plan.json"
    # XLA's estimate (its extra compiles) is checked with MPO below and in its own test
    rc = main(
        [
            "plan",
            "--config",
            "configs/demo.py",
            "--topology",
            "v5p-8",
            "--json",
            str(out),
            "--config.plan.xla_estimate=False",
            "--config.grpo.reward_model.kind=none",  # the reward model's program: its own test below
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["algorithm"] == "grpo" and r["chips"] == 4 and r["fits"] and r["remat_policy"] == "full"
    assert r["xla_step_seconds"] is None and all("xla_seconds" not in p for p in r["programs"].values())
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} == r["sampler_mesh"]
    assert set(r["programs"]) == {"train", "prefill", "decode"}
    # the train step runs splash attention (auto on a TPU mesh) and chunked log-probs; the step as it
    # was before (materialised attention, whole-sequence logits) is compiled beside it
    tr = r["programs"]["train"]
    assert tr["attention_impl"] == "splash" and tr["kernel_flops"] > 0 and tr["logprob_chunk_size"] == 512
    assert r["baseline_train"]["temp_bytes"] > 0  # (at these tiny widths splash's 128-padding costs more)
    for name, p in r["programs"].items():
        assert p["argument_bytes"] > 0 and p["total_bytes"] > 0 and p["flops"] > 0 and p["seconds"] > 0, name
    # a decode step reads every weight whole (FSDP shards all-gathered; no tensor axis here) and
    # the chip's quarter of the KV cache
    import numpy as np

    from r1v2_jax.model.vlm import abstract_params
    from r1v2_jax.train.config_files import load_experiment
    from r1v2_jax.train.experiment import model_config_from

    mc = model_config_from(load_experiment("configs/demo.py"))
    weights = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract_params(mc, boxed=False)))
    t = mc.text
    cache = 2 * t.num_layers * 8 * 8 * (192 + 32) * t.num_kv_heads * t.resolved_head_dim * np.dtype(mc.dtype).itemsize
    assert r["programs"]["decode"]["bytes_per_token_step"] == weights + cache // 4
    # the sampler's programs are charged the optimizer state that stays in HBM meanwhile
    assert r["programs"]["decode"]["resident_bytes"] > 0 == r["programs"]["train"]["resident_bytes"]
    assert r["peak_bytes"] == max(p["total_bytes"] for p in r["programs"].values())
    assert 0 < r["mfu"] < 1 and r["step_seconds"] == pytest.approx(sum(p["seconds"] for p in r["programs"].values()))
    # the paged engine over each sampler mesh the 4 chips allow (tensor 8 and 16 do not divide them)
    e = r["engine"]
    assert [o["tensor"] for o in e["options"]] == [4, 8, 16] and "skipped" in e["options"][1]
    assert e["best"] == 4 and e["options"][0]["mesh"] == [1, 1, 4] and e["options"][0]["fits"]
    o = e["options"][0]
    assert o["total_bytes"] == o["weight_bytes"] + o["pool_bytes"] + o["logits_bytes"] + o["resident_bytes"]
    assert o["ragged"]["seconds"] < o["dense"]["seconds"]  # the valid KV only, under the same model
    assert r["engine_step_seconds"] == pytest.approx(
        r["step_seconds"] - r["programs"]["decode"]["seconds"] + e["seconds"]
    )
    text = capsys.readouterr().out
    assert "fits" in text and "decode" in text and "step time (roofline" in text and "XLA's cost model" not in text
    assert "paged engine (analytic" in text and "fastest that fits: tensor 4" in text
    # the same programs on a chip with almost no memory: exit status 1, the largest buffers named
    rc = main(
        [
            "plan",
            "--config",
            "configs/demo.py",
            "--topology",
            "v5p-8",
            "--hbm-gib",
            "0.001",
            "--config.plan.xla_estimate=False",
            "--config.grpo.reward_model.kind=none",
        ]
    )
    assert rc == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "['mlp']" in text


def test_plan_mpo_and_a_separate_sampler_mesh(tmp_path, capsys):
    pytest.importorskip("libtpu")
    out = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "--config",
            "configs/demo.py",
            "--topology",
            "v5p-8",
            "--json",
            str(out),
            "--config.stages=('sft','mpo')",
            "--config.mpo.micro_batches=4",
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["algorithm"] == "mpo" and set(r["programs"]) == {"train"}
    # XLA's own estimate, loops counted by trip count, beside the roofline one, and its MFU
    assert r["programs"]["train"]["xla_seconds"] > 0 and r["xla_step_seconds"] == r["programs"]["train"]["xla_seconds"]
    assert r["xla_mfu"] == pytest.approx(r["flops_per_step"] / (r["xla_step_seconds"] * 4 * 459e12))
    # the Pallas kernels XLA's estimate leaves out are added at the stated efficiency
    tr = r["programs"]["train"]
    assert tr["kernel_flops"] > 0
    assert tr["kernel_seconds"] == pytest.approx(tr["kernel_flops"] / (4 * 459e12 * r["kernel_efficiency"]))
    assert tr["xla_seconds"] == pytest.approx(tr["xla_seconds_outside_kernels"] + tr["kernel_seconds"])
    # and the MFU of what the step computes (no weight gradients for a frozen LLM) beside it
    assert 0 < tr["needed_flops"] <= tr["flops"]
    assert tr["xla_mfu_needed"] == pytest.approx(tr["needed_flops"] / (tr["xla_seconds"] * 4 * 459e12))
    text = capsys.readouterr().out
    assert "step time (XLA's cost model, loops counted by trip count)" in text
    assert "kernel FLOPs at 50% of peak" in text and "train program, before -> now" in text
    # 8 pairs / 4 micro-batches = 2 rows per micro-batch over 4 devices: reported
    assert any("micro-batch" in n for n in r["notes"]) and "note: mpo micro-batch" in text
    rc = main(
        [
            "plan",
            "--config",
            "configs/demo.py",
            "--topology",
            "v5p-8",
            "--json",
            str(out),
            "--config.plan.sampler_mesh=(1,2,2)",
            "--config.plan.xla_estimate=False",
            "--config.grpo.reward_model.kind=none",
        ]
    )
    r = json.loads(out.read_text())
    assert rc == 0 and r["sampler_mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} != r["mesh"]


def test_compiler_out_of_memory_is_a_report_not_a_crash(tmp_path, capsys):
    """When activations exceed HBM the TPU compiler itself refuses (RESOURCE_EXHAUSTED): the plan
    reports that program as not fitting, with the compiler's figure, and exits 1."""
    pytest.importorskip("libtpu")
    from r1v2_jax.plan.programs import OutOfMemory, memory_report

    oom = OutOfMemory(
        "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. ... the total memory required "
        "for HLO temporaries (100.21G) exceeds available HBM (95.74G)."
    )
    m = memory_report(oom, hbm=95 * 1024**3, resident=10)
    assert not m["fits"] and m["temp_bytes"] == int(100.21 * 1024**3) and m["total_bytes"] == m["temp_bytes"] + 10
    out = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "--config",
            "configs/demo.py",
            "--topology",
            "v5p-8",
            "--json",
            str(out),
            "--config.data.max_prompt_len=32768",
            "--config.grpo.max_new_tokens=32",
            "--config.model.attention_impl=xla",
            "--config.plan.xla_estimate=False",
            "--config.grpo.reward_model.kind=none",
        ]
    )
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert rc == 1 and not r["fits"] and "compiler_error" in r["programs"]["train"], text
    assert "the TPU compiler ran out of HBM" in text


def test_xla_estimate_counts_every_layer_and_loop_trip():
    """XLA's cost model counts a loop body once (a scanned layer stack as one layer, the
    micro-batch scan as one micro-batch, the decode loop as one token). The plan extrapolates
    from 2- and 4-layer unrolled compiles, multiplies by micro-batches, and counts the decode
    loop's body once per token; against XLA's own figures for the fully unrolled programs it
    agrees within 10% (XLA's cost model is close to, not exactly, linear in the layer count:
    fusion and scheduling differ a little from one layer count to the next)."""
    pytest.importorskip("libtpu")
    from r1v2_jax.parallel.sharding import make_mesh
    from r1v2_jax.plan.programs import (
        Job,
        compile_program,
        no_compile_cache_writes,
        sampler_programs,
        train_program,
        xla_estimate,
        xla_seconds,
    )
    from r1v2_jax.plan.topology import devices_for
    from r1v2_jax.train.config_files import load_experiment
    from r1v2_jax.train.experiment import model_config_from

    with no_compile_cache_writes():
        cfg = load_experiment(
            "configs/demo.py",
            [
                "--config.model.text_layers=6",
                "--config.model.vision_layers=5",
                "--config.grpo.group_size=2",
                "--config.grpo.max_new_tokens=16",
            ],
        )
        devices = devices_for(parse_topology("v5p-8"))
        job = Job(cfg, "grpo", tiles=1)
        mesh = make_mesh(1, 4, 1, devices=devices)
        mc = model_config_from(cfg).replace(scan_layers=True)
        rows = cfg.data.batch_size * cfg.grpo.group_size
        # the same rows in 2 micro-batches: twice one half-size micro-batch
        est = xla_estimate(job, mc, mesh, mesh, n_micro=2, rows=rows)
        unrolled = mc.replace(scan_layers=False)
        truth_half = xla_seconds(compile_program(train_program(job, unrolled, mesh, rows // 2, 1)[0]))
        pre, (dec, dec2), _, _ = sampler_programs(job, unrolled, mesh, decode_loops=(1, 2))
        assert est["train"] == pytest.approx(2 * truth_half, rel=0.1)
        assert est["prefill"] == pytest.approx(xla_seconds(pre), rel=0.1)
        # decode: the whole loop once, then one trip of its body (what running the loop a second
        # time adds) for each further token; the setup outside the loop is counted once
        once = xla_seconds(dec)
        body = xla_seconds(dec2) - once
        assert 0 < body < once
        assert est["decode"] == pytest.approx(once + 15 * body, rel=0.1)
        # less than multiplying the whole program by the tokens would say; the margin is what runs
        # once outside the loop (the sampling keys, the output buffers; until the sampler handed
        # the cache to decode in the loop's layout, also a copy of K and V in and out, which
        # made it over 20%)
        assert est["decode"] < 16 * once
        # what the correction is for: the scanned program's own figure counts one layer per tower
        assert xla_seconds(compile_program(train_program(job, mc, mesh, rows // 2, 1)[0])) < 0.75 * truth_half


@pytest.mark.parametrize("kind", ["skywork_vl", "ours"])
def test_plan_scores_rollouts_with_the_reward_model(tmp_path, kind):
    """grpo.reward_model gets its scoring program (one forward over the rollout batch) compiled
    on the sampler mesh and reported with memory per chip and roofline time."""
    pytest.importorskip("libtpu")
    tiny = QwenVLConfig(
        vision=QwenVisionConfig(
            depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=48, fullatt_block_indexes=(1,)
        ),
        text=TextConfig(
            vocab_size=300, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
        ),
        mrope_section=(2, 2, 2),
        image_token_id=290,
    )
    d = tmp_path / "skywork"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_dict(tiny)))
    out = tmp_path / "plan.json"
    # kind "ours" scores with the RM the rm stage trains: the hybrid demo has that stage
    config = "configs/demo_hybrid.py" if kind == "ours" else "configs/demo.py"
    args = ["plan", "--config", config, "--topology", "v5p-8", "--json", str(out)]
    args += ["--config.plan.xla_estimate=False", f"--config.grpo.reward_model.kind={kind}"]
    if kind == "skywork_vl":
        args += [f"--config.grpo.reward_model.path={d}", "--config.grpo.reward_model.image_grid=(1,8,12)"]
    assert main(args) == 0
    r = json.loads(out.read_text())
    p = r["programs"]["reward_model"]
    assert p["fits"] and p["argument_bytes"] > 0 and p["flops"] > 0 and p["seconds"] > 0
    assert p["rows"] == 8 * 8 and p["resident_bytes"] > 0  # demo: 8 prompts x 8 samples
    if kind == "skywork_vl":
        assert p["image_tokens"] == 8 * 12 // 4
    assert r["step_seconds"] >= p["seconds"]
