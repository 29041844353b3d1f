"""The ``r1v2`` command line.

r1v2 demo [--out DIR] [--config.K=V]    the main job: SFT -> MPO -> GRPO on the synthetic task, on CPU
r1v2 smoke [--preset tiny]              init -> save released -> load_pretrained -> forward, in seconds
r1v2 train --config configs/X.py [--config.K=V]   run an experiment (resumes from its run_dir)
     [--multihost | --coordinator H:P --num-processes N --process-id I]   on every host of a job
r1v2 eval --model PATH --data FILE      pass@1 over k samples, per category
r1v2 eval --benchmark NAME --data DIR --model PATH [--split S] [--runs 5] [--out DIR]
                                        a published benchmark, the paper's protocol, resumable
r1v2 score --benchmark NAME --data DIR --predictions FILE   re-score saved responses (no model)
r1v2 plan --config C --topology v5p-128 AOT-compile train step + sampler for a TPU slice: memory, time
r1v2 info --model PATH | --preset NAME   config and parameter counts of a checkpoint or preset
r1v2 generate --model PATH [--image FILE] --prompt TEXT   answer a prompt (released HF dir or our checkpoint)
r1v2 make-data synthetic OUT --n N      the synthetic visual-reasoning task (train/test JSONL + images)
r1v2 make-data easyr1 OUT --from PATH   verl / EasyR1 multimodal RL parquet -> our rl JSONL + images
r1v2 make-data mmpr OUT --from META     InternVL MMPR preference pairs -> our preference JSONL + images
"""

from __future__ import annotations

import argparse
import sys

from r1v2_jax import commands as C


def _add_distributed_args(p) -> None:
    g = p.add_argument_group("multi-host (run the same command on every host)")
    g.add_argument("--multihost", action="store_true", help="join a Cloud TPU pod's hosts (jax.distributed, auto)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (explicit cluster, e.g. CPU tests)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def main(argv: list[str] | None = None) -> int:
    # Longer than 60 lines: one flat declaration per subcommand and option, read top to bottom;
    # splitting it would only scatter the command table.
    p = argparse.ArgumentParser(prog="r1v2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: SFT -> MPO -> GRPO on the synthetic task, on CPU")
    d.add_argument("--out", default=None, help="run folder (default runs/demo); rerunning resumes")
    d.set_defaults(fn=C.cmd_demo, takes_overrides=True)
    sm = sub.add_parser("smoke", help="init -> save released -> load_pretrained -> forward (seconds)")
    sm.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    sm.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--new-tokens", type=int, default=8)
    sm.set_defaults(fn=C.cmd_smoke)
    tr = sub.add_parser("train", help="run an experiment config (resumes from its run_dir)")
    tr.add_argument("--config", required=True)
    _add_distributed_args(tr)
    tr.set_defaults(fn=C.cmd_train, takes_overrides=True)
    pl = sub.add_parser(
        "plan", help="AOT-compile the RL train step and the sampler for a TPU topology: memory, step time"
    )
    pl.add_argument("--config", required=True)
    pl.add_argument("--topology", required=True, help="e.g. v5p-128, v4-32, v5e-16, v6e-64, v5p:4x4x4")
    pl.add_argument("--hbm-gib", type=float, default=None, help="override the chip's HBM (GiB)")
    pl.add_argument("--json", default=None, help="also write the report as JSON")
    pl.set_defaults(fn=C.cmd_plan, takes_overrides=True)
    ev = sub.add_parser("eval", help="pass@1 of a model on a JSONL dataset or a published benchmark")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True, help="an rl dataset, or the benchmark's local Hub copy")
    ev.add_argument("--k", type=int, default=1, help="samples per question (our JSONL format)")
    ev.add_argument("--temperature", type=float, default=None, help="default 0 (JSONL); 0.6 (--benchmark)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default 1024 (JSONL); 65536 (--benchmark)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-tiles", type=int, default=12)
    b = ev.add_argument_group("published benchmarks (--benchmark)")
    b.add_argument("--benchmark", default=None, help="mmmu, mathvista, mathvision, olympiadbench, aime24, ...")
    b.add_argument("--split", default=None, help="default: the benchmark's own (e.g. mmmu: validation)")
    b.add_argument("--runs", type=int, default=None, help="runs per question, pass@1 averaged (default 5)")
    b.add_argument("--top-p", type=float, default=0.95)
    b.add_argument("--repetition-penalty", type=float, default=1.05)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--limit", type=int, default=0, help="first N items only (0: all)")
    b.add_argument("--out", default=None, help="results folder (default runs/eval/NAME_SPLIT); rerunning resumes")
    b.add_argument("--score-workers", type=int, default=0, help="score in N worker processes (0: in this one)")
    _add_distributed_args(ev)
    ev.set_defaults(fn=C.cmd_eval, takes_overrides=True)
    sc = sub.add_parser("score", help="re-score saved responses by a benchmark's rules (no model)")
    sc.add_argument("--benchmark", required=True)
    sc.add_argument("--data", required=True, help="the benchmark's local Hub copy")
    sc.add_argument("--predictions", required=True, help="generations.jsonl, or JSONL lines {id, response}")
    sc.add_argument("--split", default=None)
    sc.add_argument("--runs", type=int, default=None, help="score runs 0..N-1 (default: all in the file)")
    sc.add_argument("--limit", type=int, default=0)
    sc.add_argument("--out", default=None, help="also write scores.jsonl, results.json and results.md here")
    sc.add_argument("--score-workers", type=int, default=0, help="score in N worker processes (0: in this one)")
    sc.set_defaults(fn=C.cmd_score)
    i = sub.add_parser("info", help="config and parameter counts")
    g = i.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="a released-format checkpoint directory")
    g.add_argument("--preset", choices=["tiny", "small", "r1v2_38b"])
    i.set_defaults(fn=C.cmd_info)
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
    g.add_argument("--engine", action="store_true", help="decode with the paged engine (same tokens, paged KV cache)")
    g.set_defaults(fn=C.cmd_generate)
    md = sub.add_parser("make-data", help="make a dataset")
    md.add_argument("kind", choices=["synthetic", "easyr1", "mmpr"])
    md.add_argument("out")
    md.add_argument("--n", type=int, default=None, help="synthetic: number of examples")
    md.add_argument("--from", dest="src", default=None, help="easyr1/mmpr: the public data set (file or folder)")
    md.add_argument("--image-root", default=None, help="mmpr: image folder of a single annotation file")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--image-size", type=int, default=448)
    md.add_argument("--test-fraction", type=float, default=0.2)
    md.add_argument("--overwrite", action="store_true")
    md.set_defaults(fn=C.cmd_make_data)
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
