"""LiveCodeBench code generation (``livecodebench/code_generation_lite`` on the HF Hub).

**Data as shipped**: a snapshot folder of JSON-lines files ``test.jsonl``, ``test2.jsonl`` ...
``test6.jsonl`` (one per release window), or any one of them, or the same rows as parquet /
a ``save_to_disk`` folder. Every field is a string: ``question_title``,
``question_content``, ``platform`` (``leetcode`` / ``atcoder`` / ``codeforces``),
``question_id``, ``contest_id``, ``contest_date`` (ISO 8601), ``starter_code``,
``difficulty`` (``easy`` / ``medium`` / ``hard``), ``public_test_cases`` (JSON: a list of
``{"input", "output", "testtype"}``), ``private_test_cases`` (the same list, in the lite
release as base64 of zlib of a pickle of the JSON text; plain JSON is read too) and
``metadata`` (JSON; ``func_name`` for LeetCode's functional tests).

**The private tests are never unpickled.** The pickle is read with :mod:`pickletools`
(which only parses opcodes): it must be a protocol header, one string (or bytes) and STOP,
nothing else (no globals, no calls); anything else is a skip (``bad_private_tests``). The
zlib stream is inflated at most ``MAX_TESTS_BYTES`` (a zip bomb is a skip too).

**Releases and dates**: the registered loader reads every ``test*.jsonl`` of a folder
(``release_latest``). :func:`load` takes ``release=`` (``release_v1`` ... ``release_v6``:
the files up to that one; ``v2``: that file only; ``v1_v3``: a range; as the data set's
loading script) and ``start_date=`` / ``end_date=`` (``YYYY-MM-DD``, inclusive, on
``contest_date``, as ``lcb_runner``'s ``--start_date``/``--end_date``).

**Prompt**: LiveCodeBench's prompt for QwQ / DeepSeek-R1 style reasoning models (the user
turn of ``get_qwen_qwq_question_template_answer``), with the starter code and its format line
when there is one, else the stdin/stdout format line; the chat template is ours.

**Score**: the code is the last fenced block (``lcb_runner.utils.extraction_utils``); pass@1
is 1 when it passes every public and private test (stdin/stdout, or functional when
``metadata.func_name`` is set), run in :mod:`r1v2_jax.rewards.sandbox`. Breakdown by
``difficulty`` and ``platform``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import glob
import json
import logging
import os
import pickletools
import threading
import zlib

from r1v2_jax.benchmarks.base import Benchmark, Score, item, register
from r1v2_jax.data.formats import BadSample, SkipCounter, iter_records
from r1v2_jax.rewards.code import extract_code
from r1v2_jax.rewards.sandbox import CodeRunner, SandboxLimits

log = logging.getLogger("r1v2_jax.benchmarks")

NAME = "livecodebench"
FIELDS = (
    "question_title",
    "question_content",
    "platform",
    "question_id",
    "contest_id",
    "contest_date",
    "starter_code",
    "difficulty",
    "public_test_cases",
    "private_test_cases",
    "metadata",
)
PLATFORMS = ("leetcode", "codeforces", "atcoder")
DIFFICULTIES = ("easy", "medium", "hard")
MAX_TESTS_BYTES = 1 << 30  # inflated private tests of one problem, at most

_FILES = ["test.jsonl"] + [f"test{i}.jsonl" for i in range(2, 7)]
RELEASES: dict[str, list[str]] = {f"release_v{i}": _FILES[:i] for i in range(1, 7)}
RELEASES["release_latest"] = list(_FILES)
for _i in range(1, 7):
    RELEASES[f"v{_i}"] = [_FILES[_i - 1]]
    for _j in range(_i + 1, 7):
        RELEASES[f"v{_i}_v{_j}"] = _FILES[_i - 1 : _j]

# lcb_runner/prompts/code_generation.py (the user turn of the QwQ and DeepSeek-R1 styles)
INSTRUCTION = (
    "You will be given a question (problem specification) and will generate a correct Python program "
    "that matches the specification and passes all tests."
)
FORMAT_WITH_STARTER = (
    "You will use the following starter code to write the solution to the problem and enclose your code "
    "within delimiters."
)
FORMAT_WITHOUT_STARTER = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on "
    "the sample inputs). Enclose your code within delimiters as follows. Ensure that when the python program "
    "runs, it reads the inputs, runs the algorithm and writes output to STDOUT."
)


def prompt(question_content: str, starter_code: str) -> str:
    text = f"{INSTRUCTION}\n\nQuestion: {question_content}\n\n"
    if starter_code:
        return text + f"{FORMAT_WITH_STARTER}\n```python\n{starter_code}\n```\n\n"
    return text + f"{FORMAT_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"


# ---- the private tests: base64 -> zlib -> a pickled string -> JSON, without unpickling -----

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
_HARMLESS_OPS = {"PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "STOP"}


def _pickled_string(data: bytes, where: str) -> str:
    """The one string a pickle holds, read by parsing its opcodes (nothing is executed)."""
    try:
        ops = [(op.name, arg) for op, arg, _pos in pickletools.genops(data)]
    except (ValueError, EOFError) as e:  # truncated data or an unknown opcode
        raise BadSample("bad_private_tests", f"{where}: private_test_cases is not a valid pickle ({e})") from None
    other = sorted({name for name, _ in ops if name not in _STRING_OPS | _HARMLESS_OPS})
    strings = [arg for name, arg in ops if name in _STRING_OPS]
    if other or len(strings) != 1:
        what = f"opcodes {', '.join(other)}" if other else f"{len(strings)} strings"
        raise BadSample(
            "bad_private_tests", f"{where}: private_test_cases pickle holds {what}; only one string is read"
        )
    value = strings[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("bad_private_tests", f"{where}: private_test_cases bytes are not UTF-8") from None
    return value


def decode_private_tests(blob: str, where: str = "?") -> list:
    """The private tests of one problem: plain JSON, or (lite) base64 of zlib of a pickled JSON
    string, read without unpickling (see the module docstring)."""
    s = blob.strip()
    if s.startswith("["):
        try:
            return json.loads(s)
        except ValueError as e:
            raise BadSample("bad_private_tests", f"{where}: private_test_cases is not JSON ({e})") from None
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise BadSample("bad_private_tests", f"{where}: private_test_cases is neither JSON nor base64 ({e})") from None
    d = zlib.decompressobj()
    try:
        data = d.decompress(raw, MAX_TESTS_BYTES)
    except zlib.error as e:
        raise BadSample("bad_private_tests", f"{where}: private_test_cases is not zlib data ({e})") from None
    if d.unconsumed_tail:
        raise BadSample("tests_too_large", f"{where}: private tests inflate past {MAX_TESTS_BYTES} bytes")
    text = _pickled_string(data, where)
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadSample("bad_private_tests", f"{where}: decoded private tests are not JSON ({e})") from None


def _check_tests(tests, field: str, where: str, functional: bool) -> list[dict]:
    if not isinstance(tests, list):
        raise BadSample("bad_tests", f"{where}: {field} should be a JSON list, got {type(tests).__name__}")
    out = []
    for i, t in enumerate(tests):
        if not (isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)):
            raise BadSample("bad_tests", f"{where}: {field}[{i}] should have string 'input' and 'output'")
        kind = t.get("testtype", "functional" if functional else "stdin")
        if kind not in ("stdin", "functional") or (kind == "functional") != functional:
            raise BadSample("bad_tests", f"{where}: {field}[{i}] testtype {kind!r} does not match metadata.func_name")
        if functional:
            try:
                [json.loads(line) for line in t["input"].split("\n")]
                json.loads(t["output"])
            except ValueError as e:
                raise BadSample("bad_tests", f"{where}: {field}[{i}] functional test is not JSON ({e})") from None
        out.append({"input": t["input"], "output": t["output"]})
    return out


def _date(s: str, where: str, field: str) -> datetime.datetime:
    try:
        return datetime.datetime.fromisoformat(s)
    except ValueError:
        raise BadSample("bad_field", f"{where}: {field} {s!r} is not an ISO date") from None


def to_item(row, where: str, root: str = "") -> dict:
    """One published row -> an item (private tests stay encoded in ``meta``, decoded at
    scoring: a full release inflates to many GB)."""
    if not isinstance(row, dict):
        raise BadSample("malformed_record", f"{where}: expected an object")
    for k in FIELDS:
        if not isinstance(row.get(k), str):
            got = "missing" if row.get(k) is None else type(row[k]).__name__
            raise BadSample("missing_field" if got == "missing" else "wrong_type", f"{where}: field {k!r} is {got}")
    if row["platform"] not in PLATFORMS:
        raise BadSample("bad_field", f"{where}: platform {row['platform']!r} not one of {PLATFORMS}")
    if row["difficulty"] not in DIFFICULTIES:
        raise BadSample("bad_field", f"{where}: difficulty {row['difficulty']!r} not one of {DIFFICULTIES}")
    date = _date(row["contest_date"], where, "contest_date")
    try:
        meta = json.loads(row["metadata"])
        public = json.loads(row["public_test_cases"])
    except ValueError as e:
        raise BadSample("malformed_json", f"{where}: metadata or public_test_cases is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_field", f"{where}: metadata should be a JSON object")
    fn = meta.get("func_name") or None
    if fn is not None and not (isinstance(fn, str) and fn.isidentifier()):
        raise BadSample("bad_field", f"{where}: metadata.func_name {fn!r} is not an identifier")
    public = _check_tests(public, "public_test_cases", where, fn is not None)
    private = _check_tests(
        decode_private_tests(row["private_test_cases"], where), "private_test_cases", where, fn is not None
    )
    if not public and not private:
        raise BadSample("bad_tests", f"{where}: the problem has no tests")
    return item(
        id=row["question_id"],
        question=prompt(row["question_content"], row["starter_code"]),
        answer="",
        category=row["difficulty"],
        meta={
            "public_tests": public,
            "private_test_cases": row["private_test_cases"],
            "num_tests": len(public) + len(private),
            "fn_name": fn,
            "platform": row["platform"],
            "contest_id": row["contest_id"],
            "contest_date": date.isoformat(),
            "question_title": row["question_title"],
        },
        breakdown={"difficulty": row["difficulty"], "platform": row["platform"]},
        root=root,
        where=where,
    )


def _sources(path: str, release: str) -> list[str]:
    """The files to read: a snapshot folder's ``test*.jsonl`` of the release, else ``path``."""
    if release not in RELEASES:
        raise ValueError(f"livecodebench: unknown release {release!r}; known: {', '.join(RELEASES)}")
    if os.path.isdir(path) and glob.glob(os.path.join(path, "test*.jsonl")):
        files = [os.path.join(path, f) for f in RELEASES[release] if os.path.exists(os.path.join(path, f))]
        if not files:
            raise FileNotFoundError(f"{path}: none of {RELEASES[release]} (release {release}) is there")
        missing = [f for f in RELEASES[release] if not os.path.exists(os.path.join(path, f))]
        if missing:
            log.warning("livecodebench: %s lacks %s of release %s; reading the rest", path, missing, release)
        return files
    if release != "release_latest":
        raise ValueError(f"{path}: release {release!r} selects files of a snapshot folder (test.jsonl ... test6.jsonl)")
    return [path]


def _day(s: str | None, name: str) -> datetime.datetime | None:
    if s is None:
        return None
    try:
        return datetime.datetime.strptime(s, "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"livecodebench: {name} {s!r} should be YYYY-MM-DD") from None


def load(
    path: str,
    split: str,
    skips: SkipCounter,
    *,
    release: str = "release_latest",
    start_date: str | None = None,
    end_date: str | None = None,
) -> list[dict]:
    """The problems of ``split`` (``test``, the only one shipped); bad rows skipped and
    counted; optional release and contest-date window (see the module docstring)."""
    if split != "test":
        raise ValueError(f"livecodebench: split {split!r}; the data set ships only 'test'")
    lo, hi = _day(start_date, "start_date"), _day(end_date, "end_date")
    out, seen = [], set()
    for src in _sources(path, release):
        root = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
        for where, row in iter_records(src):
            if isinstance(row, BadSample):
                skips.skip(row.reason, str(row))
                continue
            try:
                it = to_item(row, where, root)
            except BadSample as e:
                skips.skip(e.reason, str(e))
                continue
            if it["id"] in seen:
                skips.skip("duplicate_id", f"{where}: question_id {it['id']!r} seen before")
                continue
            seen.add(it["id"])
            date = datetime.datetime.fromisoformat(it["meta"]["contest_date"])
            if (lo is not None and date < lo) or (hi is not None and date > hi):
                continue  # outside the window: not a bad row
            out.append(it)
            skips.kept()
    return out


# ---- scoring ------------------------------------------------------------------------------

_RUNNER: CodeRunner | None = None
_RUNNER_LOCK = threading.Lock()


def runner() -> CodeRunner:
    """The sandbox runner scoring uses (default limits; its ``counts`` are the verdicts)."""
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is None:
            _RUNNER = CodeRunner(SandboxLimits())
        return _RUNNER


def set_runner(r: CodeRunner) -> None:
    """Score with ``r`` (other limits, or a runner shared with training)."""
    global _RUNNER
    with _RUNNER_LOCK:
        _RUNNER = r


@functools.lru_cache(maxsize=16)
def _private(blob: str) -> tuple[dict, ...]:
    return tuple({"input": t["input"], "output": t["output"]} for t in decode_private_tests(blob))


def tests_of(it: dict) -> list[dict]:
    """All tests of an item, public then private (as LiveCodeBench's ``get_evaluation_sample``)."""
    return list(it["meta"]["public_tests"]) + list(_private(it["meta"]["private_test_cases"]))


def score(it: dict, response: str) -> Score:
    """1.0 when the response's last code block passes every test (never raises)."""
    code = extract_code(response)
    if not code.strip():
        return Score(0.0, None, "no_code")
    try:
        tests = tests_of(it)
    except BadSample as e:  # cannot happen for a loaded item; scored 0 and said why
        return Score(0.0, code, f"bad_tests: {e}")
    res = runner().run(code, tests, it["meta"]["fn_name"])
    return Score(1.0 if res.correct else 0.0, code, "" if res.correct else res.verdict)


def score_many(pairs: list[tuple[dict, str]], workers: int = 4) -> list[Score]:
    """:func:`score` for many (item, response) pairs, ``workers`` programs at a time."""
    jobs, idx, out = [], [], [Score(0.0, None, "no_code")] * len(pairs)
    for i, (it, resp) in enumerate(pairs):
        code = extract_code(resp)
        if code.strip():
            jobs.append((code, tests_of(it), it["meta"]["fn_name"]))
            idx.append(i)
    for i, (job, res) in zip(idx, zip(jobs, runner().run_many(jobs, workers=workers))):
        out[i] = Score(1.0 if res.correct else 0.0, job[0], "" if res.correct else res.verdict)
    return out


BENCHMARK = register(
    Benchmark(
        name=NAME,
        splits=("test",),
        default_split="test",
        load=load,
        score=score,
        description="LiveCodeBench code generation (code_generation_lite), pass@1 over public+private tests",
    )
)
