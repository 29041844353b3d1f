"""The ``r1v2`` command line.

    r1v2 demo [--out DIR] [--config.K=V]    the main job: SFT -> MPO -> GRPO on the synthetic task, on CPU
    r1v2 smoke [--preset tiny]              init -> save released -> load_pretrained -> forward, in seconds
    r1v2 train --config configs/X.py [--config.K=V]   run an experiment (resumes from its run_dir)
         [--multihost | --coordinator H:P --num-processes N --process-id I]   on every host of a job
    r1v2 eval --model PATH --data FILE      pass@1 over k samples, per category
    r1v2 plan --config C --topology v5p-128 AOT-compile train step + sampler for a TPU slice: memory, time
    r1v2 info --model PATH | --preset NAME   config and parameter counts of a checkpoint or preset
    r1v2 generate --model PATH [--image FILE] --prompt TEXT   answer a prompt (released HF dir or our checkpoint)
    r1v2 make-data synthetic OUT --n N      the synthetic visual-reasoning task (train/test JSONL + images)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _table(rows: list[tuple[str, str]], title: str) -> str:
    w = max(len(r[0]) for r in rows)
    line = "-" * (w + 3 + max(len(r[1]) for r in rows))
    return "\n".join([title, line] + [f"{a:<{w}} | {b}" for a, b in rows] + [line])


def _distributed(args) -> None:
    """Join the other processes of a multi-host job before anything touches JAX."""
    if getattr(args, "multihost", False) or getattr(args, "coordinator", None):
        from r1v2_jax.parallel.multihost import initialize

        initialize(args.coordinator, args.num_processes, args.process_id, auto=args.multihost)


def _add_distributed_args(p) -> None:
    g = p.add_argument_group("multi-host (run the same command on every host)")
    g.add_argument("--multihost", action="store_true", help="join a Cloud TPU pod's hosts (jax.distributed, auto)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (explicit cluster, e.g. CPU tests)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def cmd_train(args, overrides) -> int:
    from r1v2_jax.train.experiment import format_summary, run_experiment
    from r1v2_jax.train.config_files import ConfigKeyError, load_config

    try:
        cfg = load_config(args.config, overrides)
    except (ConfigKeyError, FileNotFoundError, ValueError, AttributeError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _distributed(args)
    summary = run_experiment(cfg)
    import jax

    if jax.process_index() == 0:
        print(format_summary(summary))
    return 0


def cmd_demo(args, overrides) -> int:
    """The main job: SFT -> MPO -> GRPO on the synthetic task with a tiny model, evaluated after
    each stage, exported to the released format and reloaded."""
    from r1v2_jax.train.experiment import demo_config, format_summary, run_experiment
    from r1v2_jax.train.config_files import apply_override

    cfg = demo_config()
    cfg.lock()
    if args.out:
        cfg.run_dir = args.out
    for ov in overrides:
        apply_override(cfg, ov, "demo")
    summary = run_experiment(cfg)
    print(format_summary(summary))
    return 0


def cmd_smoke(args) -> int:
    """Init a model, save it in the released format, load it back, and run it on an image prompt:
    the checkpoint path users take, end to end, in seconds."""
    import jax
    import numpy as np

    import r1v2_jax

    t0 = time.perf_counter()
    cfg = r1v2_jax.model_config(args.preset)
    model = r1v2_jax.init_model(cfg, seed=args.seed)
    out = args.out or tempfile.mkdtemp(prefix="r1v2-smoke-")
    ckpt = os.path.join(out, "released")
    r1v2_jax.save_released(model, ckpt, overwrite=True)
    t_save = time.perf_counter()
    loaded = r1v2_jax.load_pretrained(ckpt, dtype=cfg.param_dtype)
    t_load = time.perf_counter()

    rng = np.random.default_rng(args.seed)
    n_img = cfg.tokens_per_tile()
    prompt = rng.integers(0, cfg.image_token_id - 1, 8)
    ids = np.concatenate([prompt[:2], np.full(n_img, cfg.image_token_id), prompt[2:]])[None]
    pix = rng.standard_normal((1, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
    a = np.asarray(model(ids, pix))
    b = np.asarray(loaded(ids, pix))
    t_fwd = time.perf_counter()
    # Greedy continuation by repeated full forward passes (the KV-cache sampler is r1v2_jax.generate).
    seq = ids
    for _ in range(args.new_tokens):
        nxt = int(np.asarray(loaded(seq, pix))[0, -1].argmax())
        seq = np.concatenate([seq, [[nxt]]], axis=1)
    t_gen = time.perf_counter()
    diff = float(np.abs(a - b).max())
    print(_table([
        ("preset", args.preset),
        ("devices", f"{len(jax.devices())} x {jax.devices()[0].platform}"),
        ("parameters", f"{model.num_params:,}"),
        ("ViT / adapter / LLM", " / ".join(f"{r1v2_jax.count_params(model.params[k]):,}"
                                           for k in ("vision_model", "mlp1", "language_model"))),
        ("released checkpoint", ckpt),
        ("save + load (s)", f"{t_save - t0:.2f} + {t_load - t_save:.2f}"),
        ("prompt tokens (image)", f"{ids.shape[1]} ({n_img})"),
        ("logits", f"{list(b.shape)}"),
        ("reload max |diff|", f"{diff:.3g}"),
        ("forward (s, incl. compile)", f"{t_fwd - t_load:.2f}"),
        (f"greedy {args.new_tokens} tokens", " ".join(map(str, seq[0, ids.shape[1]:].tolist()))),
        ("greedy time (s)", f"{t_gen - t_fwd:.2f}"),
    ], "r1v2 smoke: init -> save released -> load_pretrained -> forward"))
    if diff != 0.0:
        print(f"error: reloaded model differs from the saved one (max |diff| {diff})", file=sys.stderr)
        return 1
    return 0


def cmd_info(args) -> int:
    import r1v2_jax
    from r1v2_jax.convert.hf_config import read_config
    from r1v2_jax.model.vlm import abstract_params

    cfg = read_config(args.model) if args.model else r1v2_jax.model_config(args.preset)
    ap = abstract_params(cfg, boxed=False)
    v, t = cfg.vision, cfg.text
    print(_table([
        ("ViT", f"{v.num_layers} layers, hidden {v.hidden_size}, {v.num_heads} heads, mlp {v.intermediate_size}, "
                f"{v.norm_type}, qk_norm={v.qk_norm}, qkv_bias={v.qkv_bias}"),
        ("tiles", f"{cfg.tile_size}px, patch {v.patch_size}, {cfg.tokens_per_tile()} tokens/tile, "
                  f"pixel shuffle {cfg.ps_version}, select_layer {cfg.select_layer}"),
        ("LLM", f"{t.num_layers} layers, hidden {t.hidden_size}, {t.num_heads}/{t.num_kv_heads} heads, "
                f"mlp {t.intermediate_size}, vocab {t.vocab_size}, rope θ {t.rope_theta:g}"),
        ("<IMG_CONTEXT> id", str(cfg.image_token_id)),
        ("params ViT", f"{r1v2_jax.count_params(ap['vision_model']):,}"),
        ("params adapter", f"{r1v2_jax.count_params(ap['mlp1']):,}"),
        ("params LLM", f"{r1v2_jax.count_params(ap['language_model']):,}"),
        ("params total", f"{r1v2_jax.count_params(ap):,}"),
    ], f"r1v2 info: {args.model or args.preset}"))
    return 0


class _Spinner:
    """A progress line on stderr while a compiled call runs (the decode loop is one program)."""

    def __init__(self, label: str):
        import threading

        self.label, self._stop = label, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0, frames, i = time.perf_counter(), "|/-\\", 0
        while not self._stop.wait(0.2):
            print(f"\r{self.label} {frames[i % 4]} {time.perf_counter() - t0:5.1f}s", end="", file=sys.stderr, flush=True)
            i += 1

    def __enter__(self):
        if sys.stderr.isatty():
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._t.is_alive():
            self._t.join()
            print("\r" + " " * (len(self.label) + 12) + "\r", end="", file=sys.stderr, flush=True)


def cmd_generate(args) -> int:
    import numpy as np

    import r1v2_jax
    from r1v2_jax.data.image import load_image
    from r1v2_jax.data.prompt import PromptBuilder
    from r1v2_jax.data.tokenizer import chat_template, load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with _Spinner("loading model"):
        model = r1v2_jax.load_model(args.model, args.dtype)
    cfg = model.config
    pix = load_image(args.image, tile_size=cfg.tile_size, max_num=args.max_tiles) if args.image else None
    builder = PromptBuilder(tokenizer, cfg.tokens_per_tile(), template=chat_template(args.model),
                            think=not args.no_think, max_prompt_len=1 << 20)
    ids = builder.encode_prompt(args.prompt, [len(pix)] if pix is not None else [])
    eos = [i for i in (tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")) if i is not None]
    t1 = time.perf_counter()
    with _Spinner(f"generating up to {args.max_new_tokens} tokens"):
        out = r1v2_jax.generate(model, [ids], pixel_values=pix, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                repetition_penalty=args.repetition_penalty, eos_ids=eos, seed=args.seed)
        n = int(out.lengths[0])
        gen = np.asarray(out.tokens)[0, len(ids):len(ids) + n].tolist()
    t2 = time.perf_counter()
    if gen and gen[-1] in eos:
        gen = gen[:-1]
    print(tokenizer.decode(gen, skip_special_tokens=False))
    print(f"[{n} tokens in {t2 - t1:.1f}s ({n / max(t2 - t1, 1e-9):.1f} tok/s); load {t1 - t0:.1f}s; "
          f"{'eos' if bool(out.finished[0]) else 'max_new_tokens reached'}]", file=sys.stderr)
    return 0


def cmd_make_data(args) -> int:
    from r1v2_jax.data.synthetic import make_synthetic

    try:
        counts = make_synthetic(args.out, args.n, seed=args.seed, image_size=args.image_size,
                                test_fraction=args.test_fraction, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts['train']} train / {counts['test']} test examples")
    return 0


def cmd_eval(args) -> int:
    import r1v2_jax
    from r1v2_jax.data.formats import SkipCounter, load_records
    from r1v2_jax.data.pipeline import PipelineConfig
    from r1v2_jax.data.prompt import PromptBuilder
    from r1v2_jax.data.tokenizer import chat_template, load_tokenizer
    from r1v2_jax.train.metrics_log import MetricsLog
    from r1v2_jax.train.evaluate import evaluate
    from r1v2_jax.train.run import Run

    try:
        tok = load_tokenizer(args.model)
        model = r1v2_jax.load_model(args.model)
        skips = SkipCounter()
        records = load_records(args.data, "rl", skips)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.config
    builder = PromptBuilder(tok, cfg.tokens_per_tile(), template=chat_template(args.model), max_prompt_len=1 << 16)
    pipe = PipelineConfig(batch_size=args.batch_size, max_tiles=args.max_tiles, process_index=0, process_count=1,
                          length_buckets=tuple(1 << i for i in range(6, 17)))
    run = Run(cfg, tok, builder, tempfile.mkdtemp(prefix="r1v2-eval-"), MetricsLog(tempfile.mkdtemp(), False),
              pipeline=pipe, progress=False)
    try:
        r = evaluate(run, model.params, records, k=args.k, temperature=args.temperature,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, skips=skips)
    except (ValueError, RuntimeError) as e:  # an empty dataset, nothing usable in it
        print(f"error: {args.data}: {e}", file=sys.stderr)
        return 2
    rows = [(cat, f"{acc:.3f}", str(n)) for cat, (acc, n) in r["per_category"].items()]
    rows.append(("all", f"{r['pass@1']:.3f}", str(r["n"])))
    print(f"pass@1 (mean over k={args.k} samples, temperature {args.temperature}) on {args.data}")
    print("\n".join(f"{a:<16} | {b:>7} | {c:>5}" for a, b, c in [("category", "pass@1", "n")] + rows))
    n_skipped = sum(r["skipped"].values())
    print(f"skipped items: {n_skipped}" + (f" {r['skipped']}" if n_skipped else ""))
    return 0


def cmd_plan(args, overrides) -> int:
    import json

    from r1v2_jax.plan.planner import format_plan, plan
    from r1v2_jax.train.config_files import ConfigKeyError, load_config

    try:
        cfg = load_config(args.config, overrides)
        report = plan(cfg, args.topology, hbm_bytes=int(args.hbm_gib * 1024**3) if args.hbm_gib else None)
    except (ConfigKeyError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="r1v2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: SFT -> MPO -> GRPO on the synthetic task, on CPU")
    d.add_argument("--out", default=None, help="run folder (default runs/demo); rerunning resumes")
    d.set_defaults(fn=cmd_demo, takes_overrides=True)
    sm = sub.add_parser("smoke", help="init -> save released -> load_pretrained -> forward (seconds)")
    sm.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    sm.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--new-tokens", type=int, default=8)
    sm.set_defaults(fn=cmd_smoke)
    tr = sub.add_parser("train", help="run an experiment config (resumes from its run_dir)")
    tr.add_argument("--config", required=True)
    _add_distributed_args(tr)
    tr.set_defaults(fn=cmd_train, takes_overrides=True)
    pl = sub.add_parser("plan", help="AOT-compile the RL train step and the sampler for a TPU topology: memory, step time")
    pl.add_argument("--config", required=True)
    pl.add_argument("--topology", required=True, help="e.g. v5p-128, v4-32, v5e-16, v6e-64, v5p:4x4x4")
    pl.add_argument("--hbm-gib", type=float, default=None, help="override the chip's HBM (GiB)")
    pl.add_argument("--json", default=None, help="also write the report as JSON")
    pl.set_defaults(fn=cmd_plan, takes_overrides=True)
    ev = sub.add_parser("eval", help="pass@1 of a model on a JSONL dataset, per category")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--k", type=int, default=1)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--max-new-tokens", type=int, default=1024)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-tiles", type=int, default=12)
    ev.set_defaults(fn=cmd_eval)
    i = sub.add_parser("info", help="config and parameter counts")
    g = i.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="a released-format checkpoint directory")
    g.add_argument("--preset", choices=["tiny", "small", "r1v2_38b"])
    i.set_defaults(fn=cmd_info)
    g = sub.add_parser("generate", help="answer a prompt about an image")
    g.add_argument("--model", required=True, help="a released-format HF directory or an r1v2-jax checkpoint")
    g.add_argument("--image", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--temperature", type=float, default=0.6, help="released setting 0.6; 0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.05)
    g.add_argument("--max-tiles", type=int, default=12)
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-think", action="store_true", help="do not pre-fill <think>")
    g.set_defaults(fn=cmd_generate)
    md = sub.add_parser("make-data", help="make a dataset")
    md.add_argument("kind", choices=["synthetic"])
    md.add_argument("out")
    md.add_argument("--n", type=int, required=True)
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--image-size", type=int, default=448)
    md.add_argument("--test-fraction", type=float, default=0.2)
    md.add_argument("--overwrite", action="store_true")
    md.set_defaults(fn=cmd_make_data)
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown or (overrides and not getattr(args, "takes_overrides", False)):
        p.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if getattr(args, "takes_overrides", False):
        return args.fn(args, overrides)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
