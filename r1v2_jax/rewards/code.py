"""Code rewards: the program in a completion, run against tests in the sandbox.

An ``rl`` record for a code prompt carries its tests in ``meta`` (our JSONL keeps unknown
fields, see :mod:`r1v2_jax.data.formats`)::

    {"question": "...", "answer": "",
     "meta": {"tests": [{"input": "1 2\\n", "output": "3\\n"}, ...],   # stdin/stdout form
              "fn_name": null}}                                        # or "twoSum": functional

With ``fn_name`` the tests are functional (LeetCode style): each input line is one JSON
argument of ``Solution().fn_name``, the output the JSON of the expected result. The reward is
1.0 when the program passes every test and 0.0 otherwise (no code block, a wrong answer, or
any sandbox verdict); :class:`~r1v2_jax.rewards.sandbox.CodeRunner` counts the verdicts.
"""

from __future__ import annotations

from typing import Sequence

from r1v2_jax.rewards.sandbox import CodeResult, CodeRunner
from r1v2_jax.rewards.verifier import after_thinking


def extract_code(completion: str) -> str:
    """LiveCodeBench's ``extract_code`` for chat models: the lines between the last two lines
    that contain a triple backtick (so the last fenced block, ```python or bare), "" when there
    are fewer than two. Read in the answer after the last ``</think>`` when there is one."""
    lines = after_thinking(completion).split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return ""
    return "\n".join(lines[fences[-2] + 1 : fences[-1]])


def tests_of(record: dict) -> tuple[list[dict], str | None]:
    """(tests, fn_name) of an ``rl`` record's ``meta`` (see the module docstring); ValueError
    naming the record when they are missing or malformed."""
    where = record.get("_where", record.get("id", "?"))
    meta = record.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("tests"), list) or not meta["tests"]:
        raise ValueError(f"{where}: a code prompt needs meta.tests, a non-empty list of {{input, output}}")
    for i, t in enumerate(meta["tests"]):
        if not (isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)):
            raise ValueError(f"{where}: meta.tests[{i}] should be {{'input': str, 'output': str}}")
    fn = meta.get("fn_name")
    if fn is not None and not (isinstance(fn, str) and fn.isidentifier()):
        raise ValueError(f"{where}: meta.fn_name should be a Python identifier or null, got {fn!r}")
    return meta["tests"], fn


def code_reward(
    completion: str, tests: Sequence[dict], fn_name: str | None, runner: CodeRunner
) -> tuple[float, CodeResult | None]:
    """(1.0 if the completion's program passes all tests else 0.0, the sandbox's result;
    None when the completion holds no code block)."""
    code = extract_code(completion)
    if not code.strip():
        return 0.0, None
    res = runner.run(code, tests, fn_name)
    return (1.0 if res.correct else 0.0), res


def code_rewards(
    completions: Sequence[str], records: Sequence[dict], runner: CodeRunner, workers: int = 2
) -> list[float]:
    """Rewards of many completions (``completions[i]`` answers ``records[i]``), ``workers``
    programs at a time; a completion without code scores 0 without running anything."""
    jobs, where = [], []
    for i, (c, r) in enumerate(zip(completions, records, strict=True)):
        code = extract_code(c)
        if code.strip():
            tests, fn = tests_of(r)
            jobs.append((code, tests, fn))
            where.append(i)
    out = [0.0] * len(completions)
    for i, res in zip(where, runner.run_many(jobs, workers=workers)):
        out[i] = 1.0 if res.correct else 0.0
    return out
