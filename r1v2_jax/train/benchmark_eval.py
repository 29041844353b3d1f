"""A published benchmark, end to end: sample ``runs`` responses per question with a model,
score them by the benchmark's own rules, and report pass@1 averaged over the runs.

The paper's protocol is the default (:class:`Protocol`): 5 runs, temperature 0.6, top-p 0.95,
repetition penalty 1.05, up to 64K new tokens. Works for any registered
:class:`~r1v2_jax.benchmarks.base.Benchmark`.

**Files** (in ``out``):

* ``generations.jsonl``: one line per finished response, ``{"id", "run", "response",
  "tokens", "finished"}``, appended (and flushed) batch by batch as they come out;
* ``protocol.json``: the settings, written at the start; a rerun with different settings into
  the same folder is refused (its generations would mix two protocols), except ``runs``,
  which may grow;
* ``scores.jsonl`` (each response's score and extracted answer), ``results.json`` and
  ``results.md`` (pass@1 overall, per run and per breakdown, the protocol, the counts of
  items left out by reason), written at the end; :func:`score_predictions` writes them from
  saved generations alone (``r1v2 score``).

**Resume**: rerunning the same command reads ``generations.jsonl`` and generates only the
(item, run) pairs not in it; a partial last line (a killed writer) is dropped. Samples are
seeded per batch, so a resumed run draws other (equally distributed) samples for what was
left than an uninterrupted one would have.

**Hosts**: items are dealt to hosts by index (``i % process_count``), every host samples its
share in lockstep with the others (a host that runs out repeats its last batch as padding),
and process 0 gathers the finished responses and writes all files.

pass@1 is the mean over items of each item's mean over its runs (the mean over runs of each
run's accuracy when every item has all its runs). Items the benchmark could not read or whose
prompt could not be built (a bad image, a prompt over the length limit) are counted by reason
and left out of the mean; ``pass@1_counting_skipped`` scores them 0. Breakdown tables
average items by each ``breakdown`` axis; a value may be a list (MathVista's ``skills``): the
item then counts under each of its values.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import sys
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from r1v2_jax.benchmarks import registry
from r1v2_jax.benchmarks.base import Benchmark, Score
from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.pipeline import PreparePrompt, collate_prompts
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.sampling.sampler import SamplingParams
from r1v2_jax.train.rollout import rollout
from r1v2_jax.train.run import Run

log = logging.getLogger("r1v2_jax.train")

GENERATIONS, PROTOCOL, SCORES = "generations.jsonl", "protocol.json", "scores.jsonl"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
MAX_NEW_TOKENS = 65536


class ProtocolMismatch(ValueError):
    """An output folder holding generations made with other settings."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a benchmark is run (recorded in ``protocol.json`` and the results)."""

    benchmark: str
    split: str
    model: str = ""
    data: str = ""
    runs: int = 5
    temperature: float = 0.6
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    max_new_tokens: int = MAX_NEW_TOKENS
    seed: int = 0
    limit: int = 0  # first N items only (0: all)

    def __post_init__(self):
        if self.runs < 1:
            raise ValueError(f"runs: must be >= 1, got {self.runs}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens: must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}")
        if self.limit < 0:
            raise ValueError(f"limit: must be >= 0 (0 = all), got {self.limit}")
        # the sampler's own checks (temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0)
        SamplingParams(1, self.temperature, self.top_p, 0, self.repetition_penalty)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- generations on disk ----


def read_generations(path: str) -> dict[tuple[str, int], dict]:
    """``{(id, run): line}`` of a generations file (empty when there is none). A last line
    cut short by a killed writer is dropped (and cut from the file, so appends start clean);
    any other unreadable line is a ValueError naming ``file:line``."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    out: dict[tuple[str, int], dict] = {}
    keep = len(data)
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = n == len(lines) or (n == len(lines) - 1 and not lines[-1].strip())
        try:
            rec = json.loads(raw.decode("utf-8"))
            key = (str(rec["id"]), int(rec["run"]))
            if not isinstance(rec.get("response"), str):
                raise KeyError("response")
        except (ValueError, KeyError, TypeError) as e:
            if last and not data.endswith(b"\n"):
                log.warning("%s:%d: dropping a partial last line (a killed run)", path, n)
                keep = len(data) - len(raw)
                break
            raise ValueError(f"{path}:{n}: not a generation line ({type(e).__name__}: {e})") from None
        out[key] = rec
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    elif data and not data.endswith(b"\n"):  # a whole last line whose newline was lost: end it
        with open(path, "ab") as f:
            f.write(b"\n")
    return out


def append_generations(path: str, records: list[dict]) -> None:
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_protocol(out: str, protocol: Protocol) -> None:
    """Write ``protocol.json``, or check that the one there matches (``runs`` may differ)."""
    path = os.path.join(out, PROTOCOL)
    mine = protocol.as_dict()
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k != "runs" and theirs.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ProtocolMismatch(
                f"{out}: holds generations made with other settings ({shown}); use another --out or the same settings"
            )
    with open(path, "w") as f:
        json.dump(mine, f, indent=2)


# ---- generation ----


def _decode(run: Run, out, eos: tuple[int, ...]) -> list[tuple[str, int, bool]]:
    tokens, lengths, finished = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.finished)
    m = out.logprobs.shape[1]
    start = tokens.shape[1] - m
    texts = []
    for i in range(len(tokens)):
        gen = tokens[i, start : start + int(lengths[i])].tolist()
        if bool(finished[i]) and gen and gen[-1] in eos:
            gen = gen[:-1]
        texts.append((run.tokenizer.decode(gen, skip_special_tokens=False), int(lengths[i]), bool(finished[i])))
    return texts


def generate(
    run: Run,
    params,
    items: list[dict],
    protocol: Protocol,
    out: str,
    *,
    batch_size: int = 8,
    skips: SkipCounter | None = None,
    progress: bool = True,
) -> dict[tuple[str, int], dict]:
    """Sample every (item, run) pair not yet in ``out/generations.jsonl``; returns all
    generations (process 0's file, shared with every host)."""
    skips = skips if skips is not None else SkipCounter()
    path = os.path.join(out, GENERATIONS)
    main = dist.is_main()
    done_keys = dist.allgather_json(sorted(read_generations(path)) if main else [])[0]
    done = {(str(k[0]), int(k[1])) for k in done_keys}
    p, count = jax.process_index(), jax.process_count()
    if batch_size % count:
        raise ValueError(f"batch_size: {batch_size} must be divisible by the {count} hosts")
    local_b = batch_size // count
    units = [(i, r) for i, it in enumerate(items) for r in range(protocol.runs) if (it["id"], r) not in done]
    mine = [u for u in units if u[0] % count == p]
    todo = dist.allgather_json(len(units))[0]
    eos = run.eos_ids()
    sp = SamplingParams(
        max_new_tokens=protocol.max_new_tokens,
        temperature=protocol.temperature,
        top_p=protocol.top_p,
        repetition_penalty=protocol.repetition_penalty,
        eos_ids=eos,
        pad_id=eos[0] if eos else 0,
    )
    cfg = run.pipeline
    prepare = PreparePrompt(run.builder, run.model_config.tile_size, cfg)
    sampler = run.sampler(params) if todo else None
    key = jax.random.fold_in(jax.random.key(protocol.seed), len(done))
    bar = tqdm(
        total=len(done) + todo,
        initial=len(done),
        desc=f"{protocol.benchmark}/{protocol.split}",
        unit="response",
        disable=not (progress and main),
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        dynamic_ncols=True,
    )
    cache: dict[int, dict] = {}
    bad: set[int] = set()
    # with several hosts or a mesh every batch has local_b rows (the last one padded by
    # repeating a row whose output is dropped); alone on one device, the last batch is smaller
    fixed_rows = count > 1 or run.mesh is not None or run.sampler_mesh is not None
    prep_skips = SkipCounter()  # this host's items whose prompt cannot be built (summed over hosts below)
    last = None
    pos = 0
    try:
        while dist.agree_max(int(pos < len(mine))):
            batch_units, examples = [], []
            while pos < len(mine) and len(examples) < local_b:
                i, r = mine[pos]
                pos += 1
                if i in bad:
                    continue
                if i not in cache:
                    cache = {k: v for k, v in cache.items() if k >= i - 1}
                    cache[i] = prepare.map(items[i])
                ex = cache[i]
                if "_skip" in ex:
                    bad.add(i)
                    prep_skips.skip(ex["_skip"], ex["_detail"])
                    continue
                batch_units.append((i, r))
                examples.append(ex)
            pad = not examples
            if pad:  # this host has nothing (left) to sample: repeat a batch as padding
                if last is None:
                    last = next(
                        ([e] for e in (prepare.map(it) for it in items) if "_skip" not in e),
                        None,
                    )
                    if last is None:
                        raise ValueError("benchmark: no item of this host could be prepared as a prompt")
                examples = last
            if fixed_rows and len(examples) < local_b:  # one batch shape on every host and mesh
                examples = examples + [examples[-1]] * (local_b - len(examples))
            last = examples
            if not dist.agree_max(int(not pad)):  # every host is padding: nothing to sample
                continue
            batch = collate_prompts(examples, cfg, run.model_config.tile_size, pad_id=sp.pad_id)
            key, k = jax.random.split(key)
            res, _ = rollout(run, sampler, sampler.model.params, batch, sp, 1, k)
            texts = [] if pad else _decode(run, res, eos)
            recs = [
                {"id": items[i]["id"], "run": r, "response": t, "tokens": n, "finished": f}
                for (i, r), (t, n, f) in zip(batch_units, texts)
            ]
            gathered = [x for host in dist.allgather_json(recs) for x in host]
            if main:
                append_generations(path, gathered)
            bar.update(len(gathered))
    finally:
        bar.close()
    for reason, n in _summed_skips(prep_skips).items():
        skips.counts[reason] += n
    return read_generations(path) if main else {}  # only process 0 scores


def _summed_skips(skips: SkipCounter) -> dict[str, int]:
    total: dict[str, int] = {}
    for host in dist.allgather_json(skips.as_dict()):
        for reason, n in host.items():
            total[reason] = total.get(reason, 0) + n
    return total


# ---- scoring and results ----


def score_all(
    bench: Benchmark,
    items: list[dict],
    gens: dict[tuple[str, int], dict],
    runs: int,
    progress=True,
    workers: int = 0,
):
    """``[(item index, run, Score, generation)]`` for every generation of ``items`` with
    run < ``runs``, in (item, run) order. The benchmark's scorer is called once per response:
    in this process (``workers`` 0), or in that many spawned worker processes (for slow
    scorers such as running code; the benchmark must be a registered module's, and items
    travel without their images). A progress bar shows how far it is."""
    by_id = {it["id"]: i for i, it in enumerate(items)}
    todo = sorted(
        ((by_id[k[0]], k[1], g) for k, g in gens.items() if k[0] in by_id and k[1] < runs), key=lambda x: x[:2]
    )
    bar = tqdm(total=len(todo), desc=f"scoring {bench.name}", unit="response", disable=not progress, mininterval=5.0)
    scores: list[Score] = []
    try:
        if workers <= 0:
            for i, r, g in todo:
                scores.append(registry.safe_score(bench, items[i], g["response"], f"{items[i]['id']} run {r}"))
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")  # never fork a process that holds JAX
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [
                    pool.submit(
                        registry.score_by_name,
                        bench.name,
                        dict(items[i], images=[]),
                        g["response"],
                        f"{items[i]['id']} run {r}",
                    )
                    for i, r, g in todo
                ]
                for f in concurrent.futures.as_completed(futures):
                    bar.update(1)
                scores = [f.result() for f in futures]
    finally:
        bar.close()
    return [(i, r, s, g) for (i, r, g), s in zip(todo, scores)]


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def summarize(items: list[dict], scored, protocol: Protocol, skipped: dict[str, int]) -> dict:
    """pass@1 overall, per run and per breakdown value, with the counts (see the module doc)."""
    per_item: dict[int, list[float]] = {}
    per_run: dict[int, list[float]] = {}
    details: dict[str, int] = {}
    truncated = 0
    for i, r, s, g in scored:
        per_item.setdefault(i, []).append(s.correct)
        per_run.setdefault(r, []).append(s.correct)
        if s.detail:
            details[s.detail] = details.get(s.detail, 0) + 1
        truncated += int(not g.get("finished", True))
    item_acc = {i: _mean(v) for i, v in per_item.items()}
    complete = sum(len(v) == protocol.runs for v in per_item.values())
    tables: dict[str, dict[str, dict]] = {}
    for i, acc in item_acc.items():
        for axis, values in items[i].get("breakdown", {}).items():
            for v in values if isinstance(values, list) else [values]:
                cell = tables.setdefault(axis, {}).setdefault(str(v) or "(none)", {"sum": 0.0, "n": 0})
                cell["sum"] += acc
                cell["n"] += 1
    breakdown = {
        axis: {v: {"pass@1": c["sum"] / c["n"], "n": c["n"]} for v, c in sorted(cells.items())}
        for axis, cells in sorted(tables.items())
    }
    n_skipped = sum(skipped.values())
    overall = _mean(item_acc.values())
    denom = len(item_acc) + n_skipped
    run_accs = [_mean(per_run[r]) for r in sorted(per_run)]
    return {
        "benchmark": protocol.benchmark,
        "split": protocol.split,
        "pass@1": overall,
        "pass@1_counting_skipped": (sum(item_acc.values()) / denom) if denom else float("nan"),
        "per_run": {str(r): _mean(per_run[r]) for r in sorted(per_run)},
        "std_over_runs": float(np.std(run_accs)) if len(run_accs) > 1 else 0.0,
        "items": len(items),
        "items_scored": len(item_acc),
        "items_with_all_runs": complete,
        "responses": len(scored),
        "responses_missing": len(items) * protocol.runs - len(scored),
        "truncated": truncated,
        "score_details": dict(sorted(details.items())),
        "skipped": dict(sorted(skipped.items())),
        "breakdown": breakdown,
        "protocol": protocol.as_dict(),
    }


def _pct(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def results_markdown(res: dict) -> str:
    p = res["protocol"]
    lines = [
        f"# {res['benchmark']} ({res['split']}): pass@1 {_pct(res['pass@1'])}",
        "",
        f"pass@1 averaged over {p['runs']} run(s): temperature {p['temperature']}, top-p {p['top_p']}, "
        f"repetition penalty {p['repetition_penalty']}, up to {p['max_new_tokens']} new tokens, seed {p['seed']}.",
        f"Model `{p['model']}`, data `{p['data']}`.",
        "",
        f"- items: {res['items']} read, {res['items_scored']} scored ({res['items_with_all_runs']} with all runs); "
        f"left out: {sum(res['skipped'].values())} {res['skipped'] or ''}".rstrip(),
        f"- pass@1 counting left-out items as wrong: {_pct(res['pass@1_counting_skipped'])}",
        f"- responses: {res['responses']} ({res['truncated']} hit the token limit); "
        f"score details: {res['score_details'] or 'none'}",
        "- per run: "
        + (", ".join(f"{r}: {_pct(a)}" for r, a in res["per_run"].items()) or "none")
        + f" (std {_pct(res['std_over_runs'])})",
    ]
    for axis, cells in res["breakdown"].items():
        lines += ["", f"| {axis} | pass@1 | n |", "|---|---:|---:|"]
        lines += [f"| {v} | {_pct(c['pass@1'])} | {c['n']} |" for v, c in cells.items()]
    return "\n".join(lines) + "\n"


def write_results(out: str, res: dict, scored, items: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, SCORES), "w", encoding="utf-8") as f:
        for i, r, s, _ in scored:
            row = {"id": items[i]["id"], "run": r, "correct": s.correct, "extracted": s.extracted, "detail": s.detail}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(out, RESULTS_JSON), "w") as f:
        json.dump(res, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, RESULTS_MD), "w") as f:
        f.write(results_markdown(res))


def evaluate_benchmark(
    run: Run,
    params,
    bench: Benchmark,
    items: list[dict],
    protocol: Protocol,
    out: str,
    *,
    batch_size: int = 8,
    skips: SkipCounter | None = None,
    progress: bool = True,
    score_workers: int = 0,
) -> dict:
    """Generate what is missing, score everything, write the files; the results (every host)."""
    skips = skips if skips is not None else SkipCounter()
    if dist.is_main():
        os.makedirs(out, exist_ok=True)
        check_protocol(out, protocol)
    dist.barrier("benchmark-protocol")
    gens = generate(run, params, items, protocol, out, batch_size=batch_size, skips=skips, progress=progress)
    res = None
    if dist.is_main():
        scored = score_all(bench, items, gens, protocol.runs, progress=progress, workers=score_workers)
        res = summarize(items, scored, protocol, skips.as_dict())
        write_results(out, res, scored, items)
    return dist.allgather_json(res)[0]


# ---- re-scoring saved predictions ----


def read_predictions(path: str) -> dict[tuple[str, int], dict]:
    """Saved responses: our ``generations.jsonl`` (``id``, ``run``, ``response``) or a plain
    JSONL of ``{"id", "response"}`` (several lines of one id are its runs 0, 1, ...).
    A line that is not such an object is a ValueError naming ``file:line`` and the field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such predictions file")
    out: dict[tuple[str, int], dict] = {}
    next_run: dict[str, int] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}: not a JSON line ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected an object with 'id' and 'response'")
            for k in ("id", "response"):
                if k not in rec:
                    raise ValueError(f"{where}: field {k!r} is missing")
            if not isinstance(rec["response"], str):
                raise ValueError(f"{where}: field 'response' should be a string, got {type(rec['response']).__name__}")
            rid = str(rec["id"])
            run = rec.get("run", next_run.get(rid, 0))
            if not isinstance(run, int) or run < 0:
                raise ValueError(f"{where}: field 'run' should be an integer >= 0, got {run!r}")
            if (rid, run) in out:
                raise ValueError(f"{where}: id {rid!r} run {run} appears twice")
            next_run[rid] = max(next_run.get(rid, 0), run + 1)
            out[(rid, run)] = dict(rec, id=rid, run=run)
    if not out:
        raise ValueError(f"{path}: no predictions in it")
    return out


def score_predictions(
    bench: Benchmark,
    items: list[dict],
    preds: dict[tuple[str, int], dict],
    protocol: Protocol,
    skipped: dict,
    workers: int = 0,
) -> tuple[dict, list, int]:
    """(results, scored, predictions whose id is not an item of the split)."""
    ids = {it["id"] for it in items}
    unknown = sum(1 for k in preds if k[0] not in ids)
    scored = score_all(bench, items, preds, protocol.runs, progress=False, workers=workers)
    return summarize(items, scored, protocol, skipped), scored, unknown


def protocol_from(path: str) -> dict[str, Any] | None:
    """The ``protocol.json`` beside a generations file, when there is one."""
    p = os.path.join(os.path.dirname(os.path.abspath(path)), PROTOCOL)
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return None
