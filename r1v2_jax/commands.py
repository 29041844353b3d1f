"""The bodies of the ``r1v2`` commands (argument parsing is :mod:`r1v2_jax.cli`)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

import jax
import numpy as np

import r1v2_jax
from r1v2_jax.benchmarks import registry as benchmarks
from r1v2_jax.convert.hf_config import read_config
from r1v2_jax.data.formats import SkipCounter, load_records
from r1v2_jax.data.image import load_image
from r1v2_jax.data.prompt import PromptBuilder
from r1v2_jax.data.public_formats import convert_mmpr, convert_rl
from r1v2_jax.data.synthetic import make_synthetic
from r1v2_jax.data.tokenizer import chat_template, load_tokenizer
from r1v2_jax.model.vlm import abstract_params, param_shardings
from r1v2_jax.parallel.multihost import initialize
from r1v2_jax.plan.planner import format_plan, plan
from r1v2_jax.sampling.engine import EngineConfig, PagedEngine
from r1v2_jax.sampling.sampler import SamplingParams
from r1v2_jax.train import benchmark_eval as B
from r1v2_jax.train.checkpoints import ResumeError
from r1v2_jax.train.config_files import CONFIG_ERRORS, experiment_from, load_experiment
from r1v2_jax.train.evaluate import evaluate
from r1v2_jax.train.experiment import (
    demo_config,
    demo_hybrid_config,
    experiment_meshes,
    format_summary,
    load_experiment_model,
    make_run,
    run_experiment,
)
from r1v2_jax.train.loop import TrainingDiverged
from r1v2_jax.train.metrics_log import MetricsLog
from r1v2_jax.train.schema import ExperimentError


def _table(rows: list[tuple[str, str]], title: str) -> str:
    w = max(len(r[0]) for r in rows)
    line = "-" * (w + 3 + max(len(r[1]) for r in rows))
    return "\n".join([title, line] + [f"{a:<{w}} | {b}" for a, b in rows] + [line])


def _distributed(args) -> None:
    """Join the other processes of a multi-host job before anything touches JAX."""
    if getattr(args, "multihost", False) or getattr(args, "coordinator", None):
        initialize(args.coordinator, args.num_processes, args.process_id, auto=args.multihost)


def _config_error(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def cmd_train(args, overrides) -> int:
    try:
        exp = load_experiment(args.config, overrides)
    except CONFIG_ERRORS as e:
        return _config_error(e)
    _distributed(args)
    return _run(exp)


def _run(exp) -> int:
    try:
        summary = run_experiment(exp)
    except ExperimentError as e:  # found once devices exist (a mesh that does not divide them, a missing model)
        return _config_error(e)
    except (TrainingDiverged, ResumeError) as e:  # a diverged run, unresumable checkpoints: the message, exit 3
        print(f"error: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        print(format_summary(summary))
    return 0


def cmd_demo(args, overrides) -> int:
    """The main job: SFT -> RM -> MPO -> GRPO (rule + reward model + format) on the synthetic
    task with a tiny model, evaluated after each stage, exported to the released format and
    reloaded (:func:`~r1v2_jax.train.experiment.demo_hybrid_config`)."""
    cfg = demo_hybrid_config()
    if args.out:
        cfg.run_dir = args.out
    try:
        exp = experiment_from(cfg, "demo", overrides)
    except CONFIG_ERRORS as e:
        return _config_error(e)
    return _run(exp)


def cmd_smoke(args) -> int:
    """Init a model, save it in the released format, load it back, and run it on an image prompt:
    the checkpoint path users take, end to end, in seconds."""

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
    print(
        _table(
            [
                ("preset", args.preset),
                ("devices", f"{len(jax.devices())} x {jax.devices()[0].platform}"),
                ("parameters", f"{model.num_params:,}"),
                (
                    "ViT / adapter / LLM",
                    " / ".join(
                        f"{r1v2_jax.count_params(model.params[k]):,}"
                        for k in ("vision_model", "mlp1", "language_model")
                    ),
                ),
                ("released checkpoint", ckpt),
                ("save + load (s)", f"{t_save - t0:.2f} + {t_load - t_save:.2f}"),
                ("prompt tokens (image)", f"{ids.shape[1]} ({n_img})"),
                ("logits", f"{list(b.shape)}"),
                ("reload max |diff|", f"{diff:.3g}"),
                ("forward (s, incl. compile)", f"{t_fwd - t_load:.2f}"),
                (f"greedy {args.new_tokens} tokens", " ".join(map(str, seq[0, ids.shape[1] :].tolist()))),
                ("greedy time (s)", f"{t_gen - t_fwd:.2f}"),
            ],
            "r1v2 smoke: init -> save released -> load_pretrained -> forward",
        )
    )
    if diff != 0.0:
        print(f"error: reloaded model differs from the saved one (max |diff| {diff})", file=sys.stderr)
        return 1
    return 0


def cmd_info(args) -> int:

    cfg = read_config(args.model) if args.model else r1v2_jax.model_config(args.preset)
    ap = abstract_params(cfg, boxed=False)
    v, t = cfg.vision, cfg.text
    print(
        _table(
            [
                (
                    "ViT",
                    f"{v.num_layers} layers, hidden {v.hidden_size}, {v.num_heads} heads, mlp {v.intermediate_size}, "
                    f"{v.norm_type}, qk_norm={v.qk_norm}, qkv_bias={v.qkv_bias}",
                ),
                (
                    "tiles",
                    f"{cfg.tile_size}px, patch {v.patch_size}, {cfg.tokens_per_tile()} tokens/tile, "
                    f"pixel shuffle {cfg.ps_version}, select_layer {cfg.select_layer}",
                ),
                (
                    "LLM",
                    f"{t.num_layers} layers, hidden {t.hidden_size}, {t.num_heads}/{t.num_kv_heads} heads, "
                    f"mlp {t.intermediate_size}, vocab {t.vocab_size}, rope θ {t.rope_theta:g}",
                ),
                ("<IMG_CONTEXT> id", str(cfg.image_token_id)),
                ("params ViT", f"{r1v2_jax.count_params(ap['vision_model']):,}"),
                ("params adapter", f"{r1v2_jax.count_params(ap['mlp1']):,}"),
                ("params LLM", f"{r1v2_jax.count_params(ap['language_model']):,}"),
                ("params total", f"{r1v2_jax.count_params(ap):,}"),
            ],
            f"r1v2 info: {args.model or args.preset}",
        )
    )
    return 0


class _Spinner:
    """A progress line on stderr while a compiled call runs (the decode loop is one program)."""

    def __init__(self, label: str):

        self.label, self._stop = label, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0, frames, i = time.perf_counter(), "|/-\\", 0
        while not self._stop.wait(0.2):
            print(
                f"\r{self.label} {frames[i % 4]} {time.perf_counter() - t0:5.1f}s", end="", file=sys.stderr, flush=True
            )
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
    builder = PromptBuilder(
        tokenizer,
        cfg.tokens_per_tile(),
        template=chat_template(args.model),
        think=not args.no_think,
        max_prompt_len=1 << 20,
    )
    try:
        ids = builder.encode_prompt(args.prompt, [len(pix)] if pix is not None else [])
    except ValueError as e:  # e.g. the prompt spells a special token (<|im_end|>, <IMG_CONTEXT>, ...)
        print(f"error: --prompt: {e}", file=sys.stderr)
        return 2
    eos = [i for i in (tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")) if i is not None]
    t1 = time.perf_counter()
    with _Spinner(f"generating up to {args.max_new_tokens} tokens"):
        kw = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            eos_ids=tuple(eos),
        )
        if args.engine:  # the paged engine: the same tokens as the static sampler for the same seed
            sp = SamplingParams(**kw, pad_id=eos[0] if eos else 0)
            engine = PagedEngine(model, EngineConfig(slots=1))
            out = engine(
                np.asarray([ids], np.int32), pixel_values=None if pix is None else pix[None], sp=sp, seed=args.seed
            )
        else:
            out = r1v2_jax.generate(model, [ids], pixel_values=pix, seed=args.seed, **kw)
        n = int(out.lengths[0])
        gen = np.asarray(out.tokens)[0, len(ids) : len(ids) + n].tolist()
    t2 = time.perf_counter()
    if gen and gen[-1] in eos:
        gen = gen[:-1]
    print(tokenizer.decode(gen, skip_special_tokens=False))
    print(
        f"[{n} tokens in {t2 - t1:.1f}s ({n / max(t2 - t1, 1e-9):.1f} tok/s); load {t1 - t0:.1f}s; "
        f"{'eos' if bool(out.finished[0]) else 'max_new_tokens reached'}]",
        file=sys.stderr,
    )
    return 0


def cmd_make_data(args) -> int:
    if args.kind != "synthetic":
        return _convert_public(args)
    if args.n is None:
        print("error: make-data synthetic needs --n N", file=sys.stderr)
        return 2
    try:
        counts = make_synthetic(
            args.out,
            args.n,
            seed=args.seed,
            image_size=args.image_size,
            test_fraction=args.test_fraction,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts['train']} train / {counts['test']} test examples")
    return 0


def _convert_public(args) -> int:
    """``r1v2 make-data easyr1|mmpr OUT --from PATH``: a public training set in our format."""
    if not args.src:
        print(f"error: make-data {args.kind} needs --from PATH", file=sys.stderr)
        return 2
    skips = SkipCounter()
    try:
        if args.kind == "easyr1":
            res = convert_rl(args.src, args.out, overwrite=args.overwrite, skips=skips)
        else:
            res = convert_mmpr(args.src, args.out, image_root=args.image_root, overwrite=args.overwrite, skips=skips)
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "rl" if args.kind == "easyr1" else "preference"
    print(f"wrote {args.out}/data.jsonl: {res['written']} {kind} records, {res['images']} images")
    print(f"skipped: {skips.total} {skips.as_dict()}")
    return 0 if res["written"] else 2


def _eval_config(args):
    """The experiment config ``r1v2 eval`` loads its model and data settings through."""
    cfg = demo_config()
    cfg.run_dir = tempfile.mkdtemp(prefix="r1v2-eval-")
    cfg.model.init = args.model
    cfg.data.batch_size, cfg.data.max_tiles, cfg.data.dynamic_tiling = args.batch_size, args.max_tiles, True
    cfg.data.max_prompt_len = 1 << 16  # prompts are never cut: any length up to 64k, in power-of-two buckets
    cfg.data.length_buckets = tuple(1 << i for i in range(6, 17))
    return cfg


def _benchmark_items(args, skips: SkipCounter):
    """(benchmark, split, items) of ``--benchmark`` / ``--split`` / ``--data`` (``--limit`` first)."""
    bench = benchmarks.get(args.benchmark)
    split = args.split or bench.default_split
    if split not in bench.splits:
        raise ValueError(f"--split: {args.benchmark} has splits {', '.join(bench.splits)}, not {split!r}")
    items = bench.load(args.data, split, skips)
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise ValueError(
            f"{args.data}: no usable {args.benchmark} items in split {split!r} (skipped: {skips.as_dict()})"
        )
    return bench, split, items


def _benchmark_protocol(args, split: str) -> B.Protocol:
    return B.Protocol(
        benchmark=args.benchmark,
        split=split,
        model=os.path.abspath(args.model) if getattr(args, "model", None) else "",
        data=os.path.abspath(args.data),
        runs=5 if args.runs is None else args.runs,
        temperature=0.6 if args.temperature is None else args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=B.MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
        seed=args.seed,
        limit=args.limit,
    )


def _print_results(res: dict, out: str | None) -> None:
    print(B.results_markdown(res), end="")
    if out:
        print(f"wrote {os.path.join(out, B.RESULTS_MD)} and {B.RESULTS_JSON}")


def cmd_benchmark_eval(args, overrides) -> int:
    """``r1v2 eval --benchmark NAME``: a published benchmark with the paper's protocol, resumable."""
    _distributed(args)
    try:
        skips = SkipCounter()
        bench, split, items = _benchmark_items(args, skips)
        protocol = _benchmark_protocol(args, split)
        out = args.out or os.path.join("runs", "eval", f"{bench.name}_{split}")
        exp = experiment_from(_eval_config(args), "eval", overrides)
        mc, params, tok, template = load_experiment_model(exp)
    except (*CONFIG_ERRORS, KeyError, FileNotFoundError) as e:
        return _config_error(e)
    mesh, sampler_mesh = experiment_meshes(exp)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(mc, mesh))
    run = make_run(exp, mc, tok, template, mesh, sampler_mesh, metrics=MetricsLog(exp.run_dir, False))
    try:
        res = B.evaluate_benchmark(
            run,
            params,
            bench,
            items,
            protocol,
            out,
            batch_size=exp.data.batch_size,
            skips=skips,
            score_workers=args.score_workers,
        )
    except (B.ProtocolMismatch, ValueError) as err:  # another protocol's folder, a damaged generations file
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        run.close()
    if jax.process_index() == 0:
        _print_results(res, out)
    return 0


def cmd_score(args) -> int:
    """``r1v2 score``: re-score saved responses by a benchmark's rules, without a model."""
    try:
        skips = SkipCounter()
        bench, split, items = _benchmark_items(args, skips)
        preds = B.read_predictions(args.predictions)
        runs = args.runs or max(r for _, r in preds) + 1
        saved = B.protocol_from(args.predictions) or {}
        protocol = B.Protocol(
            benchmark=bench.name,
            split=split,
            model=str(saved.get("model", "")),
            data=os.path.abspath(args.data),
            runs=runs,
            temperature=float(saved.get("temperature", 0.6)),
            top_p=float(saved.get("top_p", 0.95)),
            repetition_penalty=float(saved.get("repetition_penalty", 1.05)),
            max_new_tokens=int(saved.get("max_new_tokens", B.MAX_NEW_TOKENS)),
            seed=int(saved.get("seed", 0)),
            limit=args.limit,
        )
        res, scored, unknown = B.score_predictions(
            bench, items, preds, protocol, skips.as_dict(), workers=args.score_workers
        )
    except (*CONFIG_ERRORS, KeyError, FileNotFoundError) as e:
        return _config_error(e)
    if not scored:
        print(f"error: {args.predictions}: none of its ids is an item of {bench.name}/{split}", file=sys.stderr)
        return 2
    if unknown:
        print(f"warning: {unknown} prediction(s) name ids that are not items of {bench.name}/{split}", file=sys.stderr)
    res["predictions"] = os.path.abspath(args.predictions)
    res["predictions_unknown_ids"] = unknown
    if args.out:
        B.write_results(args.out, res, scored, items)
    _print_results(res, args.out)
    return 0


def cmd_eval(args, overrides) -> int:
    """pass@1 of a model on an ``rl`` dataset; the settings go through the experiment schema
    (``--config.eval.*`` / ``--config.data.*`` overrides too), so they are checked like a run's.
    With ``--benchmark``: :func:`cmd_benchmark_eval`."""
    if args.benchmark:
        return cmd_benchmark_eval(args, overrides)
    for flag, value in (("--split", args.split), ("--runs", args.runs), ("--out", args.out), ("--limit", args.limit)):
        if value:
            return _config_error(ValueError(f"{flag}: only with --benchmark"))
    args.temperature = 0.0 if args.temperature is None else args.temperature
    args.max_new_tokens = 1024 if args.max_new_tokens is None else args.max_new_tokens
    cfg = demo_config()
    cfg.run_dir = tempfile.mkdtemp(prefix="r1v2-eval-")
    cfg.model.init = args.model
    cfg.eval.k, cfg.eval.temperature, cfg.eval.max_new_tokens = args.k, args.temperature, args.max_new_tokens
    cfg.data.batch_size, cfg.data.max_tiles, cfg.data.dynamic_tiling = args.batch_size, args.max_tiles, True
    cfg.data.max_prompt_len = 1 << 16  # prompts are never cut: any length up to 64k, in power-of-two buckets
    cfg.data.length_buckets = tuple(1 << i for i in range(6, 17))
    try:
        exp = experiment_from(cfg, "eval", overrides)
        mc, params, tok, template = load_experiment_model(exp)
        skips = SkipCounter()
        records = load_records(args.data, "rl", skips)
    except (*CONFIG_ERRORS, KeyError) as e:
        return _config_error(e)
    mesh, sampler_mesh = experiment_meshes(exp)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(mc, mesh))
    run = make_run(exp, mc, tok, template, mesh, sampler_mesh, metrics=MetricsLog(exp.run_dir, False))
    e = exp.eval
    try:
        r = evaluate(
            run,
            params,
            records,
            k=e.k,
            temperature=e.temperature,
            top_p=e.top_p,
            max_new_tokens=e.max_new_tokens,
            batch_size=exp.data.batch_size,
            skips=skips,
        )
    except (ValueError, RuntimeError) as err:  # an empty dataset, nothing usable in it
        print(f"error: {args.data}: {err}", file=sys.stderr)
        return 2
    finally:
        run.close()
    rows = [(cat, f"{acc:.3f}", str(n)) for cat, (acc, n) in r["per_category"].items()]
    rows.append(("all", f"{r['pass@1']:.3f}", str(r["n"])))
    print(f"pass@1 (mean over k={e.k} samples, temperature {e.temperature}) on {args.data}")
    print("\n".join(f"{a:<16} | {b:>7} | {c:>5}" for a, b, c in [("category", "pass@1", "n")] + rows))
    n_skipped = sum(r["skipped"].values())
    print(f"skipped items: {n_skipped}" + (f" {r['skipped']}" if n_skipped else ""))
    return 0


def cmd_plan(args, overrides) -> int:
    try:
        exp = load_experiment(args.config, overrides)
    except CONFIG_ERRORS as e:
        return _config_error(e)
    try:
        report = plan(exp, args.topology, hbm_bytes=int(args.hbm_gib * 1024**3) if args.hbm_gib else None)
    except (ValueError, RuntimeError) as e:  # an unknown topology, a mesh that does not fit it
        return _config_error(e)
    print(format_plan(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] else 1
