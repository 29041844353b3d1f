"""Reward models in training (r1v2_jax.train.reward_scoring): the score enters GRPO's hybrid
reward and MPO's pair split; unscored groups are dropped, never scored zero."""

import json
import re
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rewards import _Handler, server  # noqa: F401  (the local reward server fixture)

from r1v2_jax.data.tokenizer import tiny_tokenizer
from r1v2_jax.model.config import model_config
from r1v2_jax.parallel.sharding import make_mesh, tree_shardings
from r1v2_jax.rewards.format import FormatConfig
from r1v2_jax.rewards.hybrid import HybridConfig
from r1v2_jax.rewards.reward_model import RewardModel, abstract_reward_params, init_reward_params
from r1v2_jax.rewards.rm_config import RewardModelConfig
from r1v2_jax.rewards.verifier import VerifierConfig
from r1v2_jax.train.config_files import load_config, load_experiment
from r1v2_jax.train.experiment import format_summary, run_experiment
from r1v2_jax.train.reward_scoring import OursRM, RemoteRM, RMScores, response_text
from r1v2_jax.train.rollout import score_completions
from r1v2_jax.train.run import Run

TEXTS = [
    "ok</think>\\boxed{1}<|im_end|>",  # right, formatted
    "ok</think>\\boxed{2}<|im_end|>",  # wrong
    "ok</think>\\boxed{4}<|im_end|>",  # wrong (gold 3)
    "ok</think>\\boxed{3}<|im_end|>",  # right
]


def _rollout(tok, texts, prompt_len=3):
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    m = max(map(len, ids))
    tokens = np.zeros((len(ids), prompt_len + m), np.int32)
    tokens[:, :prompt_len] = 7  # a full-length prompt
    for i, x in enumerate(ids):
        tokens[i, prompt_len : prompt_len + len(x)] = x
    n = len(ids)
    return SimpleNamespace(
        tokens=tokens,
        lengths=np.asarray([len(x) for x in ids]),
        prompt_lengths=np.full((n,), prompt_len),
        logprobs=np.zeros((n, m), np.float32),
        ref_logprobs=np.zeros((n, m), np.float32),
    )


def test_rm_score_is_added_and_an_unscored_group_is_nan_not_zero(tmp_path):
    tok = tiny_tokenizer(255)
    out = _rollout(tok, TEXTS)
    run = Run(None, tok, None, str(tmp_path), None, verifier=VerifierConfig(timeout=5.0, num_workers=1))
    try:
        hy = HybridConfig(w_rm=0.5)
        total, rule, _, m, _ = score_completions(
            run, out, ["1", "3"], [[], []], 2, hy, FormatConfig(), lambda t: RMScores(np.array([2.0, -4.0, 6.0, 8.0]))
        )
        assert rule.tolist() == [1.0, 0.0, 0.0, 1.0]
        # rule + format (1 each: all formatted) + 0.5 * rm, by hand
        np.testing.assert_allclose(total, [1 + 1 + 1.0, 0 + 1 - 2.0, 0 + 1 + 3.0, 1 + 1 + 4.0])
        assert m["reward_rm"] == pytest.approx(3.0) and m["weight_rm"] == 0.5 and m["weight_rule"] == 1.0
        assert m["rm_failed"] == 0 and m["rm_dropped_groups"] == 0
        total, _, _, m, _ = score_completions(
            run, out, ["1", "3"], [[], []], 2, hy, FormatConfig(), lambda t: RMScores(np.array([2.0, np.nan, 6, 8]), 1)
        )
        assert np.isnan(total[:2]).all() and np.isfinite(total[2:]).all()  # the whole first group
        assert m["rm_failed"] == 1 and m["rm_dropped_groups"] == 1
        assert m["reward_rm"] == pytest.approx(7.0)  # over the scored groups only
        _, _, _, m, _ = score_completions(run, out, ["1", "3"], [[], []], 2, hy, FormatConfig())
        assert "reward_rm" not in m and "weight_rm" not in m
        sig = HybridConfig(w_rm=0.5, rm_transform="sigmoid")
        total, _, _, m, _ = score_completions(
            run, out, ["1", "3"], [[], []], 2, sig, FormatConfig(), lambda t: RMScores(np.array([2.0, np.nan, 6, 8]), 1)
        )
        s6, s8 = 1 / (1 + np.exp(-6.0)), 1 / (1 + np.exp(-8.0))
        np.testing.assert_allclose(total[2:], [0 + 1 + 0.5 * s6, 1 + 1 + 0.5 * s8], rtol=1e-6)
        assert np.isnan(total[:2]).all()
        assert m["reward_rm"] == pytest.approx(7.0) and m["reward_rm_term"] == pytest.approx((s6 + s8) / 2)
    finally:
        run.close()


def test_response_text():
    assert response_text("a</think> b<|im_end|>", "full") == "a</think> b"
    assert response_text("a</think>x</think> b <|im_end|>", "answer") == "b"
    assert response_text("no think", "answer") == "no think"


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_ours_rm_scores_the_rollout_as_its_sequences(tmp_path, mesh_shape):
    """The rm stage's model reads each rollout row as prompt + completion up to its length;
    the expected scores come from the model applied to each row cut by hand (no padding)."""
    cfg = model_config("tiny")
    tok = tiny_tokenizer(255)
    out = _rollout(tok, TEXTS[:2] + ["x<|im_end|>", "ok</think>"], prompt_len=4)
    out.prompt_lengths = np.asarray([4, 2, 3, 4])  # left padding of rows 1, 2
    params = init_reward_params(cfg, jax.random.key(3))
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    if mesh is not None:
        params = jax.device_put(params, nn.unbox(tree_shardings(abstract_reward_params(cfg), mesh)))
    run = Run(cfg, tok, None, str(tmp_path), None, mesh=mesh)
    got = OursRM(run, RewardModelConfig(kind="ours", batch_size=2), params).score(out, None, {}, TEXTS, 2)
    module = RewardModel(cfg)
    host = jax.device_get(params)
    t = out.tokens.shape[1]
    m = out.logprobs.shape[1]
    want = []
    for i in range(4):
        row = out.tokens[i, t - m - out.prompt_lengths[i] : t - m + out.lengths[i]]
        want.append(float(module.apply({"params": host}, jnp.asarray(row[None]))[0]))
    np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-5)
    assert got.failed == 0


def test_remote_rm_failed_batch_drops_its_group(server, tmp_path):  # noqa: F811
    run = Run(None, None, None, str(tmp_path), None)
    records = [{"_where": f"w{i}", "_root": str(tmp_path), "question": f"q{i}", "images": ["a.png"]} for i in (0, 1)]
    rm = RemoteRM(run, RewardModelConfig(kind="remote", url=server, batch_size=2, retries=0, timeout=2.0), records)
    batch = {"where": ["w0", "w1"]}
    texts = ["a</think>xy<|im_end|>", "b</think>xyz", "c", "dd"]
    res = rm.score(None, None, batch, texts, 2)
    assert res.scores.tolist() == [len("a</think>xy"), len("b</think>xyz"), 1.0, 2.0] and res.failed == 0
    _Handler.mode = "error"  # every batch fails: NaN, counted
    res = rm.score(None, None, batch, texts, 2)
    assert np.isnan(res.scores).all() and res.failed == 4


def test_rm_config_errors():
    with pytest.raises(ValueError, match="url"):
        RewardModelConfig(kind="remote")
    with pytest.raises(ValueError, match="response"):
        RewardModelConfig(response="last")
    assert load_experiment("configs/demo_hybrid.py", []).grpo.reward_model.kind == "ours"  # rm stage first
    with pytest.raises(ValueError, match="no 'rm' before 'grpo'"):
        load_experiment("configs/demo.py", ["--config.stages=('sft','grpo')", "--config.grpo.reward_model.kind=ours"])
    with pytest.raises(ValueError, match="threshold_on"):
        load_experiment("configs/demo.py", ["--config.mpo.pairs.threshold_on=rm"])


@pytest.mark.slow
def test_rm_stage_feeds_mpo_split_and_grpo_reward(tmp_path):
    """stages sft -> rm -> mpo -> grpo: the rm stage trains on pairs mined from the SFT policy
    (Bradley-Terry steps logged, the policy passed through unchanged); MPO splits pairs on the
    trained RM's score; GRPO's total is rule + format + RM (the logged means add up) with the
    RM's weight logged."""
    c = load_config(
        "configs/demo.py",
        [
            f"--config.run_dir={tmp_path / 'run'}",
            "--config.stages=('sft','rm','mpo','grpo')",
            "--config.sft.steps=40",  # enough for right and wrong answers among the candidates
            "--config.rm.steps=2",
            "--config.rm.pairs.threshold=0.5",
            "--config.rm.pairs.prompts=8",
            "--config.data.batch_size=4",
            "--config.mpo.steps=2",
            "--config.mpo.pairs.prompts=8",
            "--config.mpo.pairs.reward_model.kind=ours",
            "--config.mpo.pairs.threshold_on=rm",
            "--config.mpo.pairs.threshold=-1e9",  # every candidate chosen: no pair, and no MPO update
            "--config.grpo.steps=2",
            "--config.grpo.group_size=4",
            "--config.grpo.max_new_tokens=8",
            "--config.grpo.reward_model.kind=ours",
            "--config.grpo.reward.w_rm=0.5",
            "--config.data.synthetic_n=40",
            "--config.eval.prompts=4",
            "--config.eval.max_new_tokens=8",
            "--config.progress=False",
            "--config.export=False",
            "--config.checkpoint.async_save=False",
        ],
    )
    summary = run_experiment(c)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    pairs = [r for r in rows if r["stage"] == "rm_pairs"]
    assert len(pairs) == 1 and pairs[0]["prompts"] == 8
    assert pairs[0]["pairs"] > 0  # the SFT policy answers some prompts right, some wrong
    rm = [r for r in rows if r["stage"] == "rm"]
    assert [r["step"] for r in rm] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 <= r["bt_accuracy"] <= 1 for r in rm)
    assert summary["evals"]["rm"] == summary["evals"]["sft"]  # the policy is what SFT left
    mpo_pairs = next(r for r in rows if r["stage"] == "mpo_pairs")
    assert mpo_pairs["pairs"] == 0 and mpo_pairs["threshold_on"] == "rm" and np.isfinite(mpo_pairs["reward_rm"])
    cal = mpo_pairs["calibration"]  # the sweep at the RM scores' percentiles
    assert [r["threshold"] for r in cal] == sorted(r["threshold"] for r in cal) and len(cal) == 5
    assert all(r["pairs"] == r["agree"] + r["disagree"] + r["undecided"] for r in cal)
    assert mpo_pairs["rm_high_on_wrong"] == 1.0  # threshold -1e9: every wrong candidate would be chosen
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert len(grpo) == 2
    for r in grpo:
        assert r["weight_rm"] == 0.5 and r["rm_dropped_groups"] == 0
        assert 0 <= r["rm_high_on_wrong"] <= 1 and 0 <= r["contradiction_rate"] <= 1
        want = (
            r["weight_rule"] * r["reward_rule_gated"] + r["weight_format"] * r["reward_format"] + 0.5 * r["reward_rm"]
        )
        assert r["reward_total"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    # the summary's per-stage means of each component (what `r1v2 demo` prints)
    means = summary["rewards"]["grpo"]
    for k in ("reward_rule", "reward_format", "reward_rm", "reward_total"):
        assert means[k] == pytest.approx(np.mean([r[k] for r in grpo]), rel=1e-6)
    assert re.search(r"\| rule +\| format +\| rm score +\| rm term +\| total", format_summary(summary))


@pytest.mark.slow
def test_the_demo_runs_the_hybrid_reward(tmp_path):
    """configs/demo_hybrid.py (what `r1v2 demo` runs), shrunk: the rm stage trains on one curated
    pair per training record (no sampling), GRPO's total is rule + format + 0.5 x sigmoid(RM
    score) (the logged means add up, the term within [0, 1]) and the summary prints each
    component's mean."""
    c = load_config(
        "configs/demo_hybrid.py",
        [
            f"--config.run_dir={tmp_path / 'run'}",
            "--config.sft.steps=10",
            "--config.rm.steps=2",
            "--config.data.batch_size=4",
            "--config.mpo.steps=1",
            "--config.mpo.pairs.prompts=4",
            "--config.grpo.steps=2",
            "--config.grpo.group_size=4",
            "--config.grpo.max_new_tokens=8",
            "--config.data.synthetic_n=24",
            "--config.eval.prompts=2",
            "--config.eval.max_new_tokens=8",
            "--config.progress=False",
            "--config.export=False",
            "--config.checkpoint.async_save=False",
        ],
    )
    assert tuple(c.stages) == ("sft", "rm", "mpo", "grpo")
    summary = run_experiment(c)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    n_train = sum(1 for _ in open(tmp_path / "run" / "data" / "train.jsonl"))
    pairs = next(r for r in rows if r["stage"] == "rm_pairs")
    assert pairs["source"] == "answers" and pairs["pairs"] == pairs["prompts"] == n_train
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert len(grpo) == 2
    for r in grpo:
        assert r["weight_rm"] == 0.5 and 0 <= r["reward_rm_term"] <= 1
        want = r["reward_rule"] + r["reward_format"] + 0.5 * r["reward_rm_term"]
        assert r["reward_total"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    means = summary["rewards"]["grpo"]
    assert set(means) >= {"reward_rule", "reward_format", "reward_rm", "reward_rm_term", "reward_total"}
    assert re.search(r"grpo +\| [0-9.]+ +\| [0-9.]+ +\| -?[0-9.]+ +\| [0-9.]+ +\| [0-9.]+", format_summary(summary))


def _qwen_like_tokenizer(path):
    """A byte-level tokenizer.json whose special tokens sit at the tiny Qwen2.5-VL's ids
    (bytes 0..255, then fillers, <|image_pad|> 290, <|vision_start|> 292, <|vision_end|> 293)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = [f"<|filler{i}|>" for i in range(290 - 256)]
    specials += ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    specials += ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    tok.add_special_tokens(specials)
    assert tok.token_to_id("<|image_pad|>") == 290 and tok.token_to_id("<|vision_end|>") == 293
    tok.save(path)
    return tok


def test_skywork_rm_scores_each_row_as_its_record_and_completion(tmp_path):
    """kind skywork_vl: the released directory loads, each rollout row is scored as (its
    record's question and images, its completion without the eos) through Qwen2.5-VL's
    template; the same items scored directly agree, and a different completion scores apart."""
    from PIL import Image
    from test_vl_reward import reference, write_release

    from r1v2_jax.train.reward_scoring import SkyworkRM

    m, head = reference(0)
    d = write_release(m, head, str(tmp_path / "rm"), naming="v4")
    tok = _qwen_like_tokenizer(str(tmp_path / "rm" / "tokenizer.json"))
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (60, 90), "b.png": (56, 56)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    records = [
        {"_where": "r0", "_root": str(tmp_path), "question": "How many?", "images": ["a.png"]},
        {"_where": "r1", "_root": str(tmp_path), "question": "Which colour?", "images": ["b.png"]},
    ]
    run = Run(None, None, None, str(tmp_path), None)
    rm = SkyworkRM(run, RewardModelConfig(kind="skywork_vl", path=d, dtype="float32", response="answer"), records)
    texts = ["think</think>3<|im_end|>", "hmm</think>4", "x</think>red<|im_end|>", "red"]
    got = rm.score(None, None, {"where": ["r0", "r1"]}, texts, 2)
    assert got.failed == 0 and np.isfinite(got.scores).all()
    from r1v2_jax.convert.skywork_vl import load_skywork_vl
    from r1v2_jax.rewards.vl_reward import make_vl_scorer, score_texts

    config, params = load_skywork_vl(d, dtype=np.float32)
    ims = [[Image.open(tmp_path / "a.png").convert("RGB")], [Image.open(tmp_path / "b.png").convert("RGB")]]
    items = [("How many?", "3", ims[0]), ("How many?", "4", ims[0])] + [("Which colour?", "red", ims[1])] * 2
    want = score_texts(
        make_vl_scorer(config), jax.tree.map(jnp.asarray, params), lambda s: tok.encode(s).ids, items, pad_id=296
    )
    np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-5)
    assert got.scores[2] == pytest.approx(got.scores[3], abs=1e-5)  # same record, same answer
    assert abs(got.scores[0] - got.scores[1]) > 1e-4  # the completion is read


def test_grpo_monitor_logs_rates_and_stops_after_patience():
    from r1v2_jax.rewards.calibration import MonitorConfig
    from r1v2_jax.train.stages.grpo import GRPOSection, GRPOStep

    run = SimpleNamespace(eos_ids=lambda: (0,), mesh=None)
    mon = MonitorConfig(max_contradiction_rate=0.4, max_rm_high_on_wrong=0.6, rm_high=1.0, action="stop", patience=2)
    g = GRPOStep(run, GRPOSection(group_size=2, monitor=mon), None, None, None, 0)
    facts = [[{"kind": "count", "color": "red", "shape": "circle", "count": 3}], []]
    batch = {"facts": facts}
    texts = ["</think>There are 2 red circles.", "</think>3 red circles", "</think>5", "</think>7"]
    rule = np.array([0.0, 1.0, 0.0, 0.0])
    rm = np.array([5.0, 0.0, 2.0, np.nan])  # wrong rows 0, 2 (3 is unscored): both above rm_high
    m = {}
    g._watch(texts, batch, rule, rm, slice(0, 4), 1, m)
    # one of the two answers about an image with facts contradicts them (2 red circles, not 3)
    assert m["contradiction_rate"] == 0.5 and m["rm_high_on_wrong"] == 1.0
    with pytest.raises(RuntimeError, match="grpo.monitor: stopping at step 2: contradiction rate 50.0%"):
        g._watch(texts, batch, rule, rm, slice(0, 4), 2, {})
    g2 = GRPOStep(run, GRPOSection(group_size=2), None, None, None, 0)  # default: bounds of 1, never stops
    for step in range(3):
        g2._watch(texts, batch, rule, rm, slice(0, 4), step, {})
    with pytest.raises(ValueError, match="monitor.action"):
        GRPOSection(monitor=MonitorConfig())
