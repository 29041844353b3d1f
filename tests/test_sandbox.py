"""The code sandbox (hostile programs, both test forms), the code reward, and LiveCodeBench
(a fixture in the published code_generation_lite schema with a table of known scores)."""

import base64
import dataclasses
import json
import os
import pickle
import time
import zlib

import pytest

import r1v2_jax
from r1v2_jax.benchmarks import livecodebench as lcb
from r1v2_jax.benchmarks import registry
from r1v2_jax.cli import main
from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.tokenizer import tiny_tokenizer
from r1v2_jax.model.config import model_config
from r1v2_jax.rewards.code import code_reward, code_rewards, extract_code
from r1v2_jax.rewards.code import tests_of as record_tests
from r1v2_jax.rewards.sandbox import CodeRunner, SandboxLimits, run_program, sandbox_description, stdout_matches

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=2.0, memory_bytes=256 << 20, output_bytes=1 << 20, problem_seconds=20)
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7", "output": "12"}]
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
TWO_SUM_TESTS = [{"input": "[2,7,11,15]\n9", "output": "[0, 1]"}, {"input": "[3,2,4]\n6", "output": "[1, 2]"}]
TWO_SUM = (
    "class Solution:\n"
    "    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
    "        print('debug output is ignored')\n"
    "        seen = {}\n"
    "        for i, x in enumerate(nums):\n"
    "            if target - x in seen:\n"
    "                return (seen[target - x], i)\n"
    "            seen[x] = i\n"
)


@pytest.fixture(scope="module")
def runner():
    return CodeRunner(FAST)


# ---- hostile programs: scored 0, the right verdict, within a wall-clock bound --------------

OUTSIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")  # a readable file outside
HOSTILE = [
    ("fork_bomb", "import os\nwhile True:\n    os.fork()\n", "killed"),
    ("subprocess", "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n", "killed"),
    ("infinite_loop", "while True:\n    pass\n", "timeout"),
    ("sleeper", "import time\ntime.sleep(600)\n", "timeout"),
    ("ignores_sigxcpu", "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
     "timeout"),  # the hard CPU limit's SIGKILL, told apart from others by the CPU time used
    ("no_exit", "import os\nos._exit = lambda code: None\nraise ValueError\n", "runtime_error"),
    ("huge_output", "while True:\n    print('x' * 10000)\n", "output_limit"),
    ("huge_stderr", "import sys\nwhile True:\n    sys.stderr.write('y' * 10000)\n", "output_limit"),
    ("memory_hog", "x = []\nwhile True:\n    x.append(bytearray(5 * 10**7))\n", "memory"),
    ("big_file", "with open('f', 'wb') as f:\n    f.write(b'0' * (64 << 20))\n", "output_limit"),
    ("read_passwd", "print(open('/etc/passwd').read())\n", "killed"),
    ("read_outside", f"print(open({OUTSIDE!r}).read())\n", "killed"),
    ("os_open_outside", "import os\nos.read(os.open('/etc/hostname', os.O_RDONLY), 10)\n", "killed"),
    ("list_root", "import os\nprint(os.listdir('/'))\n", "killed"),
    ("write_outside", "open('/tmp/r1v2-sandbox-escape', 'w').write('x')\n", "killed"),
    ("socket", "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n", "killed"),
    ("ctypes", "import ctypes\nctypes.CDLL(None).fork()\n", "killed"),
    ("kill_parent", "import os\nos.kill(os.getppid(), 9)\n", "killed"),
    ("raise_limits", "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (-1, -1))\n", "killed"),
    ("thread_bomb", "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(30,)).start()\n",
     "runtime_error"),  # RLIMIT_NPROC (under uid nobody) or RLIMIT_AS: "can't start new thread"
    ("segfault", "import faulthandler\nfaulthandler._sigsegv()\n", "runtime_error"),
]  # fmt: skip


# The caller's own uid and no network namespace: what a non-root machine without unshare gets
# (the audit hook and the rlimits alone).
PLAIN = dataclasses.replace(FAST, user="none", network_namespace="none")


@pytest.mark.parametrize("limits", [FAST, PLAIN], ids=["default", "same_uid_no_netns"])
@pytest.mark.parametrize("name,code,verdict", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_programs_score_zero_with_their_verdict(limits, name, code, verdict):
    t0 = time.monotonic()
    res = CodeRunner(limits).run(ADD + code, ADD_TESTS)
    took = time.monotonic() - t0
    assert not res.correct and res.verdict == verdict, (res, name)
    # every run ends within its wall limit plus the time to kill and reap it
    assert took < FAST.wall_seconds + 3.0, (name, took)
    if name == "write_outside":
        assert not os.path.exists("/tmp/r1v2-sandbox-escape")


def test_verdicts_are_counted_and_many_run_concurrently():
    r = CodeRunner(FAST)
    jobs = [(ADD, ADD_TESTS, None), ("while True: pass", ADD_TESTS, None), ("print(0)", ADD_TESTS, None)] * 2
    t0 = time.monotonic()
    res = r.run_many(jobs, workers=3)
    took = time.monotonic() - t0
    assert [x.verdict for x in res] == ["passed", "timeout", "wrong_answer"] * 2
    assert dict(r.counts) == {"passed": 2, "timeout": 2, "wrong_answer": 2}
    # two 1-CPU-second loops side by side, not one after the other plus everything else
    assert took < 2 * FAST.cpu_seconds + 4.0, took


def test_problem_wall_bound_stops_a_slow_program_across_tests():
    # Each test sleeps 1 s; the per-test wall bound (8 s) is far from it even on a loaded
    # machine, the problem's 4.5 s bound is not: it ends the run after a few tests, not 10.
    r = CodeRunner(dataclasses.replace(FAST, problem_seconds=4.5, wall_seconds=8.0))
    slow = "import time\ntime.sleep(1.0)\n" + ADD
    t0 = time.monotonic()
    res = r.run(slow, ADD_TESTS * 5)  # 10 tests x >= 1 s: the 4.5 s problem bound ends it
    took = time.monotonic() - t0
    assert res.verdict == "timeout" and 1 <= res.passed <= 4, res
    assert took < 4.5 + 3.0, took  # the bound, plus the time to kill and reap


# ---- the two test forms --------------------------------------------------------------------


@pytest.mark.parametrize(
    "code,verdict,passed",
    [
        (ADD, "passed", 2),
        ("a, b = map(int, input().split())\nprint(a - b)\n", "wrong_answer", 0),
        ("import sys\nd = sys.stdin.read().split()\nprint(int(d[0]) + int(d[1]))\n", "passed", 2),
        ("a, b = map(int, open(0).read().split())\nprint(a + b)\n", "passed", 2),
        ("a, b = map(int, open('/dev/stdin').read().split())\nprint(a + b)\n", "passed", 2),
        # LiveCodeBench's import_string: sqrt, sys, ... are there without an import
        ("a, b = map(int, input().split())\nprint(int(sqrt((a + b) ** 2)))\nsys.exit(0)\n", "passed", 2),
        ("def main():\n    a, b = map(int, input().split())\n    print(a + b)\nif __name__ == '__main__':\n    main()\n",
         "passed", 2),
        ("print(3)\n", "wrong_answer", 1),
        ("print(1/0)\n", "runtime_error", 0),
        ("", "wrong_answer", 0),
    ],
)  # fmt: skip
def test_stdin_form(runner, code, verdict, passed):
    res = runner.run(code, ADD_TESTS)
    assert (res.verdict, res.passed, res.total) == (verdict, passed, 2), res


@pytest.mark.parametrize(
    "code,verdict",
    [
        (TWO_SUM, "passed"),  # a tuple counts as a list, prints are ignored
        (TWO_SUM.replace("(seen[target - x], i)", "[i, seen[target - x]]"), "wrong_answer"),
        (TWO_SUM.replace("(seen[target - x], i)", "{seen[target - x], i}"), "wrong_answer"),  # a set is not a list
        (TWO_SUM.replace("def twoSum", "def two_sum"), "runtime_error"),  # no such method
        (TWO_SUM.replace("seen = {}", "seen = {}[0]"), "runtime_error"),
        ("def twoSum(nums, target):\n    return [0, 1] if target == 9 else [1, 2]\n", "passed"),  # no class Solution
    ],
)
def test_functional_form(runner, code, verdict):
    res = runner.run(code, TWO_SUM_TESTS, "twoSum")
    assert res.verdict == verdict, res


@pytest.mark.parametrize(
    "out,want,ok",
    [
        ("3\n", "3", True),
        ("  3  \n\n", "3\n", True),
        ("1 2\n3 4\n", "1 2\n3 4", True),
        ("1.50 2\n", "1.5 2.0", True),  # decimals compared as numbers
        ("1 2 3", "1 2", False),
        ("3\n4", "3", False),  # line counts differ
        ("YES", "yes", False),
        ("50000000000000000", "50000000000000001", False),  # exact decimals, not floats
        ("", "", True),
    ],
)
def test_stdout_comparison_is_livecodebench_s(out, want, ok):
    assert stdout_matches(out, want) is ok


# ---- the code reward --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,code",
    [
        ("<think>```python\nprint(0)\n```</think>Here:\n```python\nprint(1)\n```", "print(1)"),
        ("a\n```python\nx = 1\n```\nand\n```\ny = 2\n```\n", "y = 2"),  # the last fenced block, any language
        ("no code at all", ""),
        ("```python\nunclosed", ""),
    ],
)
def test_extract_code(completion, code):
    assert extract_code(completion) == code


def test_code_reward_from_an_rl_record(runner):
    rec = {"question": "add", "answer": "", "meta": {"tests": ADD_TESTS, "fn_name": None}}
    tests, fn = record_tests(rec)
    assert code_reward(f"```python\n{ADD}```", tests, fn, runner)[0] == 1.0
    r, res = code_reward("```python\nprint(0)\n```", tests, fn, runner)
    assert r == 0.0 and res.verdict == "wrong_answer"
    assert code_reward("I cannot", tests, fn, runner) == (0.0, None)
    fn_rec = {"question": "two sum", "answer": "", "meta": {"tests": TWO_SUM_TESTS, "fn_name": "twoSum"}}
    got = code_rewards([f"```python\n{TWO_SUM}```", "```python\nwhile 1: pass\n```", "none"], [fn_rec] * 3, runner)
    assert got == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="meta.tests"):
        record_tests({"question": "q", "answer": "", "_where": "f.jsonl:3"})


# ---- LiveCodeBench in the published schema ---------------------------------------------------


def lite_blob(tests) -> str:
    """private_test_cases as code_generation_lite encodes them: base64(zlib(pickle(json)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("ascii")


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/r1v2-unpickled-evil", "w"))


def lcb_row(qid, *, date="2024-09-01T00:00:00", platform="atcoder", difficulty="easy", functional=False, **over):
    if functional:
        public = [dict(t, testtype="functional") for t in TWO_SUM_TESTS[:1]]
        private = [dict(t, testtype="functional") for t in TWO_SUM_TESTS[1:]]
        meta = {"func_name": "twoSum"}
        starter = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        "
    else:
        public = [dict(t, testtype="stdin") for t in ADD_TESTS[:1]]
        private = [dict(t, testtype="stdin") for t in ADD_TESTS[1:]]
        meta, starter = {}, ""
    row = {
        "question_title": f"Problem {qid}",
        "question_content": "Add two numbers." if not functional else "Return indices of two numbers adding to target.",
        "platform": "leetcode" if functional else platform,
        "question_id": qid,
        "contest_id": "c1",
        "contest_date": date,
        "starter_code": starter,
        "difficulty": difficulty,
        "public_test_cases": json.dumps(public),
        "private_test_cases": lite_blob(private),
        "metadata": json.dumps(meta),
    }
    row.update(over)
    return row


@pytest.fixture
def lcb_snapshot(tmp_path):
    """A code_generation_lite snapshot: test.jsonl (v1) and test2.jsonl (v2), with bad rows."""
    good1 = [lcb_row("abc001_a", date="2023-06-01T00:00:00"), lcb_row("2999", functional=True, difficulty="medium")]
    bad = [
        lcb_row("bad_pickle", private_test_cases=base64.b64encode(zlib.compress(pickle.dumps(_Evil()))).decode()),
        lcb_row("bad_b64", private_test_cases="%%% not base64"),
        lcb_row("bad_platform", platform="topcoder"),
        {k: v for k, v in lcb_row("no_meta").items() if k != "metadata"},
        lcb_row("bad_functional", functional=True, public_test_cases=json.dumps([{"input": "[1,", "output": "1"}])),
    ]
    good2 = [lcb_row("abc300_b", date="2024-10-05T00:00:00", difficulty="hard")]
    with open(tmp_path / "test.jsonl", "w") as f:
        for r in good1 + bad:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    with open(tmp_path / "test2.jsonl", "w") as f:
        for r in good2 + [lcb_row("abc001_a")]:  # a duplicate id
            f.write(json.dumps(r) + "\n")
    return tmp_path


def test_livecodebench_loads_the_published_schema_and_counts_bad_rows(lcb_snapshot):
    assert registry.get("livecodebench") is lcb.BENCHMARK
    skips = SkipCounter()
    items = lcb.BENCHMARK.load(str(lcb_snapshot), "test", skips)
    assert [it["id"] for it in items] == ["abc001_a", "2999", "abc300_b"]
    assert skips.as_dict() == {
        "bad_private_tests": 2,
        "bad_field": 1,
        "missing_field": 1,
        "bad_tests": 1,
        "malformed_json": 1,
        "duplicate_id": 1,
    }
    assert not os.path.exists("/tmp/r1v2-unpickled-evil")  # the hostile pickle was never unpickled
    it = items[1]
    assert it["breakdown"] == {"difficulty": "medium", "platform": "leetcode"} and it["images"] == []
    assert it["meta"]["fn_name"] == "twoSum" and it["meta"]["num_tests"] == 2
    assert lcb.tests_of(it) == TWO_SUM_TESTS
    # the reference prompt: with starter code, and without it
    assert it["question"].startswith(lcb.INSTRUCTION + "\n\nQuestion: Return indices")
    assert f"{lcb.FORMAT_WITH_STARTER}\n```python\nclass Solution:" in it["question"]
    assert it["question"].endswith("```\n\n")
    assert f"{lcb.FORMAT_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n" in items[0]["question"]


def test_livecodebench_release_and_date_window(lcb_snapshot):
    ids = lambda **kw: [it["id"] for it in lcb.load(str(lcb_snapshot), "test", SkipCounter(), **kw)]  # noqa: E731
    assert ids(release="release_v1") == ["abc001_a", "2999"]
    assert ids(release="v2") == ["abc300_b", "abc001_a"]  # only test2.jsonl: its copy of abc001_a is new there
    assert ids(start_date="2024-08-01", end_date="2025-02-01") == ["2999", "abc300_b"]
    assert ids(end_date="2023-06-01") == ["abc001_a"]  # inclusive
    with pytest.raises(ValueError, match="release"):
        lcb.load(str(lcb_snapshot), "test", SkipCounter(), release="release_v9")
    with pytest.raises(ValueError, match="split"):
        lcb.load(str(lcb_snapshot), "validation", SkipCounter())


def test_livecodebench_plain_json_private_tests(tmp_path):
    row = lcb_row("p1", private_test_cases=json.dumps([dict(ADD_TESTS[1], testtype="stdin")]))
    (tmp_path / "one.jsonl").write_text(json.dumps(row) + "\n")
    items = lcb.load(str(tmp_path / "one.jsonl"), "test", SkipCounter())
    assert lcb.tests_of(items[0]) == ADD_TESTS


def test_livecodebench_scores_a_table_of_responses(lcb_snapshot, monkeypatch):
    monkeypatch.setattr(lcb, "_RUNNER", None)  # restored afterwards
    lcb.set_runner(CodeRunner(FAST))
    items = {it["id"]: it for it in lcb.load(str(lcb_snapshot), "test", SkipCounter())}
    table = [
        ("abc001_a", f"<think>easy</think>\n```python\n{ADD}```", 1.0, ""),
        ("abc001_a", f"```python\n{ADD}```\nor faster:\n```python\nprint(3)\n```", 0.0, "wrong_answer"),  # last block
        ("abc001_a", "The answer is to add them.", 0.0, "no_code"),
        ("abc001_a", "```python\nwhile True: pass\n```", 0.0, "timeout"),
        ("abc001_a", "```python\nimport os\nos.fork()\n```", 0.0, "killed"),
        ("abc300_b", "```\na, b = map(int, input().split())\nprint(a + b)\n```", 1.0, ""),  # bare fence
        ("2999", f"```python\n{TWO_SUM}```", 1.0, ""),
        ("2999", "```python\nclass Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n```", 0.0,
         "wrong_answer"),  # passes the public test only
    ]  # fmt: skip
    for qid, response, want, detail in table:
        s = lcb.BENCHMARK.score(items[qid], response)
        assert (s.correct, s.detail) == (want, detail), (qid, response, s)
    batch = lcb.score_many([(items[q], r) for q, r, _, _ in table], workers=2)
    assert [(s.correct, s.detail) for s in batch] == [(w, d) for _, _, w, d in table]
    assert lcb.runner().counts["passed"] == 6 and lcb.runner().counts["killed"] == 2


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_private_tests_decode_every_pickle_protocol_without_unpickling(protocol, monkeypatch):
    tests = [{"input": "1 2\n" * 50, "output": "3\n", "testtype": "stdin"}]
    blob = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests), protocol=protocol))).decode()
    monkeypatch.setattr(pickle, "loads", None)  # nothing may unpickle
    monkeypatch.setattr(pickle, "Unpickler", None)
    assert lcb.decode_private_tests(blob) == tests
    as_bytes = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests).encode(), protocol=protocol))).decode()
    if protocol >= 3:  # bytes are an opcode of their own from protocol 3
        assert lcb.decode_private_tests(as_bytes) == tests
    else:  # before, a call of codecs.encode: refused, never run
        with pytest.raises(lcb.BadSample, match="GLOBAL"):
            lcb.decode_private_tests(as_bytes)


def test_private_tests_refuse_pickled_objects_and_zip_bombs(monkeypatch):
    evil = base64.b64encode(zlib.compress(pickle.dumps(_Evil()))).decode()
    with pytest.raises(lcb.BadSample, match="opcodes"):
        lcb.decode_private_tests(evil, "f.jsonl:1")
    two = base64.b64encode(zlib.compress(pickle.dumps(("[]", "[]")))).decode()
    with pytest.raises(lcb.BadSample, match="TUPLE"):
        lcb.decode_private_tests(two)
    monkeypatch.setattr(lcb, "MAX_TESTS_BYTES", 1000)
    bomb = base64.b64encode(zlib.compress(pickle.dumps("[" + " " * 10**6 + "]"))).decode()
    with pytest.raises(lcb.BadSample) as e:
        lcb.decode_private_tests(bomb)
    assert e.value.reason == "tests_too_large"
    assert not os.path.exists("/tmp/r1v2-unpickled-evil")


def test_problem_bound_defaults_to_livecodebench_s_global_timeout():
    assert CodeRunner(SandboxLimits(cpu_seconds=6)).problem_bound(10) == 75.0  # (6 + 1) * 10 + 5
    assert CodeRunner(FAST).problem_bound(10) == 20.0
    with pytest.raises(ValueError, match="problem_seconds"):
        SandboxLimits(problem_seconds=float("inf"))
    with pytest.raises(ValueError, match="cpu_seconds"):
        SandboxLimits(cpu_seconds=1.5)


def test_isolation_this_machine_provides(runner):
    """What sandbox_description claims holds inside a run (uid nobody under root; a network
    namespace with only the loopback when unshare works)."""
    desc = sandbox_description(FAST)
    code = "import os, socket\nprint(os.getuid(), os.getgid(), os.getgroups())\nprint(sorted(n for _, n in socket.if_nameindex()))\n"
    out = run_program(code, "", FAST)
    assert out.status == "ok", out
    ids, names = out.stdout.decode().splitlines()
    if os.geteuid() == 0:
        assert desc["uid"] == 65534 and ids == "65534 65534 []"
    else:
        assert ids.split()[0] == str(os.geteuid())
    if desc["network_namespace"]:
        assert names == "['lo']"
    else:
        pytest.skip("unshare --net does not work here: the network is guarded by the audit hook alone")


def test_odd_program_text_is_a_verdict_not_an_exception(runner):
    assert runner.run("print('\ud800')\n", ADD_TESTS).verdict == "wrong_answer"  # a lone surrogate
    assert runner.run("print(1)\x00\n", ADD_TESTS).verdict == "runtime_error"  # a NUL byte
    assert runner.run("def f(:\n", ADD_TESTS).verdict == "runtime_error"  # a syntax error
    assert runner.run("class Solution:\n    pass\n", TWO_SUM_TESTS, "twoSum").verdict == "runtime_error"


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC is set only under the sandbox's own uid (needs root)")
def test_process_limit_holds_under_the_sandbox_uid():
    code = (
        "import threading, time\nn = 0\ntry:\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n        n += 1\n"
        "except RuntimeError:\n    print(n)\n"
    )
    out = run_program(code, "", dataclasses.replace(FAST, max_processes=8, memory_bytes=2 << 30))
    assert out.status == "ok" and int(out.stdout) <= 7, out  # 8 tasks of uid nobody at most, this one included


def test_eval_and_score_livecodebench_end_to_end(lcb_snapshot, tmp_path, capsys):
    """`r1v2 eval --benchmark livecodebench` on a tiny model, then `r1v2 score` of right programs."""
    cfg = model_config("tiny")
    r1v2_jax.save_released(r1v2_jax.init_model(cfg, seed=4), str(tmp_path / "model"))
    tiny_tokenizer(cfg.image_token_id).save(str(tmp_path / "model" / "tokenizer.json"))
    out = tmp_path / "out"
    argv = ["eval", "--benchmark", "livecodebench", "--data", str(lcb_snapshot), "--model", str(tmp_path / "model")]
    argv += ["--out", str(out), "--max-new-tokens", "3", "--max-tiles", "1", "--batch-size", "4", "--runs", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    items = {it["id"]: it for it in lcb.load(str(lcb_snapshot), "test", SkipCounter())}
    res = json.loads((out / "results.json").read_text())
    assert res["items_scored"] == len(items) == 3 and res["pass@1"] == 0.0  # 3 tokens hold no program
    preds = tmp_path / "preds.jsonl"
    right = {"abc001_a": ADD, "abc300_b": ADD, "2999": TWO_SUM}
    preds.write_text("".join(json.dumps({"id": i, "response": f"```python\n{right[i]}```"}) + "\n" for i in items))
    assert main(["score", "--benchmark", "livecodebench", "--data", str(lcb_snapshot), "--predictions", str(preds),
                 "--out", str(tmp_path / "rescored")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "rescored" / "results.json").read_text())["pass@1"] == 1.0
