"""Rewards: verifier (>= 100 real-format cases, bounded time), format reward, JAX reward model
training, remote scorer against a local HTTP server, hybrid combination, calibration, monitor."""

import http.server
import json
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pool_workers
import pytest
from verifier_cases import CASES, CHOICE_CASES, CHOICES

from r1v2_jax.model.config import model_config
from r1v2_jax.rewards.calibration import (
    Candidate,
    HallucinationMonitor,
    MonitorConfig,
    build_pairs,
    contradicts_facts,
    format_report,
    threshold_report,
)
from r1v2_jax.rewards.format import FormatConfig, format_reward
from r1v2_jax.rewards.hybrid import HybridConfig, combine
from r1v2_jax.rewards.remote import RemoteScorer
from r1v2_jax.rewards.reward_model import RewardModel, bradley_terry_loss, init_reward_params, make_scorer
from r1v2_jax.rewards.verifier import VerifierPool, check, extract_answer, extract_choice, last_boxed


def _choices(gold):
    return CHOICES if len(gold) == 1 and gold.isalpha() else []


def test_verifier_over_100_real_format_cases():
    assert len(CASES) >= 100
    wrong = [(c, g, want) for c, g, want in CASES if check(c, g, _choices(g)) != want]
    assert not wrong, wrong


def test_multiple_choice_forms_table():
    assert len(CHOICE_CASES) >= 40
    wrong = [(c, want, extract_choice(c, CHOICES)) for c, want in CHOICE_CASES if extract_choice(c, CHOICES) != want]
    assert not wrong, wrong
    # check() scores them against the gold letter
    for c, want in CHOICE_CASES:
        if want is not None:
            assert check(c, want, CHOICES) == 1.0 and check(c, "A" if want != "A" else "B", CHOICES) == 0.0, c


def test_extraction_details():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("<think>x</think>The answer is 3/4.") == "3/4"


def test_pool_scores_and_bounds_pathological_answers():
    with VerifierPool(num_workers=2, timeout=3.0) as pool:
        items = [(c, g, _choices(g)) for c, g, _ in CASES[:12]]
        assert pool.score(items) == [float(w) for _, _, w in CASES[:12]]
        t = time.monotonic()
        # power towers that sympy would try to evaluate exactly
        evil = [("\\boxed{9^{9^{9^{9^{9^{9}}}}}}", "1", []), ("\\boxed{(10^{10^{10}})!}", "2", [])]
        scores = pool.score(evil)
        assert scores == [0.0, 0.0]
        assert time.monotonic() - t < 3.0 + 2.0  # bounded: the two run side by side, one bound each
    with VerifierPool(num_workers=1, timeout=1.0, fn=pool_workers.hang_forever, warm_up=None) as hung:
        hung.score([])  # nothing to score
        t = time.monotonic()
        assert hung.score([("x", "1", [])]) == [0.0]
        assert time.monotonic() - t < 1.0 + 5.0 and hung.errors["timeout"] == 1
        assert len(hung._workers) == 1 and not hung._workers[0].ready  # the stuck worker was replaced


def test_cold_pool_scores_correct_answers():
    """A pool's first answers wait (uncharged) for warm workers instead of timing out to 0."""
    with VerifierPool(num_workers=2, timeout=0.5) as pool:
        items = [("\\boxed{\\frac{1}{2}}", "0.5", []), ("so</think>the answer is 0.25", "1/4", [])] * 3
        assert pool.score(items) == [1.0] * 6 and not pool.errors


def test_a_batch_after_a_bad_answer_does_not_pay_a_timeout_per_answer():
    with VerifierPool(num_workers=2, timeout=1.0, fn=pool_workers.hang_on_marker, warm_up=None) as pool:
        t = time.monotonic()
        assert pool.score([("hang", "1", [])] + [("ok", "1", [])] * 6) == [0.0] + [1.0] * 6
        assert time.monotonic() - t < 1.0 + 10.0 and pool.errors["timeout"] == 1
        t = time.monotonic()
        assert pool.score([("ok", "1", [])] * 8) == [1.0] * 8  # no timeouts while the worker is replaced
        assert pool.errors["timeout"] == 1 and time.monotonic() - t < 10.0
        assert pool.score([("hang", "1", [])] * 2 + [("ok", "1", [])] * 3) == [0.0, 0.0, 1.0, 1.0, 1.0]
        assert pool.errors["timeout"] == 3


def test_boxed_scan_is_linear():
    t = time.monotonic()
    assert last_boxed("\\boxed{" * 20_000) is None  # was one scan to the end per opening
    assert last_boxed("\\boxed{" * 20_000 + "\\boxed{7}") == "7"
    assert time.monotonic() - t < 2.0
    assert last_boxed("\\boxed{a} \\boxed{b") == "a" and last_boxed("} \\boxed {x{y}} }") == "x{y}"
    assert last_boxed("\\boxed{ \\fbox{x} ") == "x"


def test_training_scores_through_the_bounded_pool(tmp_path):
    """GRPO / MPO / evaluation rewards (score_completions): a pathological completion costs at
    most the configured bound and scores 0; the others are scored as usual."""
    from types import SimpleNamespace

    from r1v2_jax.data.tokenizer import tiny_tokenizer
    from r1v2_jax.rewards.verifier import VerifierConfig
    from r1v2_jax.train.rollout import score_completions
    from r1v2_jax.train.run import Run

    tok = tiny_tokenizer(255)
    texts = [
        "ok</think>\\boxed{\\frac{1}{2}}<|im_end|>",
        "ok</think>\\boxed{9^{9^{9^{9^{9^{9}}}}}}<|im_end|>",
        "ok</think>\\boxed{1.0}<|im_end|>",
        "ok</think>\\boxed{2}<|im_end|>",
    ]
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    m = max(map(len, ids))
    tokens = np.zeros((4, 3 + m), np.int32)
    for i, x in enumerate(ids):
        tokens[i, 3 : 3 + len(x)] = x
    out = SimpleNamespace(tokens=tokens, lengths=np.asarray([len(x) for x in ids]), logprobs=np.zeros((4, m)))
    run = Run(None, tok, None, str(tmp_path), None, verifier=VerifierConfig(timeout=1.5, num_workers=2))
    run.verifier_pool().score([("\\boxed{1}", "1", [])])  # warm (a cold pool is tested above)
    t = time.monotonic()
    total, rule, got, metrics, _ = score_completions(
        run, out, ["0.5", "1"], [[], []], 2, HybridConfig(), FormatConfig()
    )
    assert time.monotonic() - t < 1.5 + 3.0
    assert got == texts and rule.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert metrics["verifier_failures"] == 1.0  # this batch's
    _, rule, *_ = score_completions(run, out, ["0.5", "1"], [[], []], 2, HybridConfig(), FormatConfig())
    assert rule.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="verifier.timeout"):
        VerifierConfig(timeout=float("inf"))


@pytest.mark.parametrize(
    "text,prefilled,want",
    [
        ("reasoning here</think>The answer is 4<|im_end|>", True, 1.0),
        ("<think>reasoning</think>The answer is 4", True, 0.0),  # <think> repeated after the pre-fill
        ("<think>reasoning</think>The answer is 4", False, 1.0),
        ("reasoning</think>", True, 0.0),  # no answer
        ("reasoning</think>  <|im_end|>", True, 0.0),
        ("a</think>b</think>c", True, 0.0),  # two closing tags
        ("</think>answer", True, 0.0),  # empty reasoning
        ("no tags at all", True, 0.0),
        ("reasoning</think>4", False, 0.0),  # without pre-fill the completion must open the block
    ],
)
def test_format_reward(text, prefilled, want):
    assert format_reward(text, FormatConfig(prefilled=prefilled)) == want


def test_format_answer_pattern():
    cfg = FormatConfig(answer_pattern=r"\\boxed\{")
    assert format_reward("r</think>\\boxed{3}", cfg) == 1.0 and format_reward("r</think>3", cfg) == 0.0


def test_hybrid_combination_and_gate():
    rule, fmt, rm = np.array([1, 1, 0, 0.0]), np.array([1, 0, 1, 0.0]), np.array([0.5, -1, 2, 0])
    total, m = combine(rule, fmt, rm)
    np.testing.assert_allclose(total, [2.5, 0, 3, 0])
    total, m = combine(rule, fmt, rm, HybridConfig(gate_rule_on_format=True, w_rm=0.5))
    np.testing.assert_allclose(total, [2.25, -0.5, 2, 0])
    assert m["accuracy"] == 0.5 and m["reward_rule_gated"] == 0.25
    total, m = combine(rule, fmt, None)
    assert "reward_rm" not in m and total.tolist() == [2, 1, 1, 0]


def test_sigmoid_rm_term_never_outweighs_the_verifier():
    """rm_transform='sigmoid': σ(score) by hand; with w_rm <= w_rule a wrong answer the RM loves
    never totals above a right one it hates (below, when w_rm < w_rule); NaN stays NaN (the group is dropped, never zero)."""
    rule, fmt = np.array([1, 0, 1, 0.0]), np.ones(4)
    rm = np.array([0.0, 2.0, -1000.0, np.nan])
    total, m = combine(rule, fmt, rm, HybridConfig(rm_transform="sigmoid"))
    s = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(total[:3], [2.5, 1 + s, 2.0], rtol=1e-6)
    assert np.isnan(total[3])
    fin = combine(rule[:3], fmt[:3], rm[:3], HybridConfig(rm_transform="sigmoid"))[1]
    assert fin["reward_rm"] == pytest.approx((0 + 2 - 1000) / 3)  # the raw scores' mean
    assert fin["reward_rm_term"] == pytest.approx((0.5 + s + 0) / 3)  # what entered the total
    one_each = (np.array([1, 0.0]), np.ones(2), np.array([-50.0, 50.0]))  # right but hated, wrong but loved
    right, wrong = combine(*one_each, HybridConfig(rm_transform="sigmoid"))[0]
    assert right >= wrong  # equal only where float32 saturates σ to 0 and 1
    right, wrong = combine(*one_each, HybridConfig(rm_transform="sigmoid", w_rm=0.5))[0]
    assert right > wrong
    raw = combine(np.array([1, 0.0]), np.ones(2), np.array([-50.0, 50.0]))[0]
    assert raw[0] < raw[1]  # raw scores can: what the transform is for
    with pytest.raises(ValueError, match="rm_transform"):
        HybridConfig(rm_transform="tanh")


def test_reward_model_bradley_terry_training():
    """On an easy synthetic preference set (the chosen response ends in a 'good' token),
    held-out pairwise accuracy rises from chance to >= 0.9."""
    cfg = model_config("tiny")
    rng = np.random.default_rng(0)

    def pairs(n):
        base = rng.integers(0, 200, (n, 12))
        pos, neg = base.copy(), base.copy()
        pos[:, -1] = rng.integers(200, 220, n)  # good endings
        neg[:, -1] = rng.integers(220, 240, n)  # bad endings
        return jnp.asarray(pos, jnp.int32), jnp.asarray(neg, jnp.int32)

    train, held = pairs(128), pairs(64)
    params = init_reward_params(cfg, jax.random.key(0))
    score = make_scorer(cfg)
    mask = jnp.ones((64, 12), bool)
    acc0 = float((score(params, held[0], None, mask) > score(params, held[1], None, mask)).mean())
    module = RewardModel(cfg)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s, pos, neg):
        def loss_fn(p_):
            both = module.apply({"params": p_}, jnp.concatenate([pos, neg]))
            return bradley_terry_loss(both[: len(pos)], both[len(pos) :])[0].value

        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    for i in range(120):
        sl = slice((i % 8) * 16, (i % 8 + 1) * 16)
        params, state, loss = step(params, state, train[0][sl], train[1][sl])
    acc = float((score(params, held[0], None, mask) > score(params, held[1], None, mask)).mean())
    assert acc >= 0.9 and acc > acc0 + 0.2, (acc0, acc)
    # the backbone slot takes a policy's parameters as they are
    from r1v2_jax.model.vlm import init_params

    policy = init_params(cfg, jax.random.key(1))
    rm = init_reward_params(cfg, jax.random.key(2), backbone_params=policy)
    assert rm["backbone"] is policy and rm["value_head"]["kernel"].shape == (cfg.text.hidden_size, 1)


# --- remote scorer against a real local server ----------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "ok"
    calls = 0
    raw_scores = ""

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        scores = [float(len(x["response"])) for x in body["inputs"]]
        out = json.dumps({"scores": scores}).encode()
        if self.mode == "raw":  # a body with one score spelled as given (NaN, Infinity, true...)
            out = ('{"scores": [' + ", ".join([self.raw_scores] + ["1.0"] * (len(scores) - 1)) + "]}").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Handler.mode, _Handler.calls = "ok", 0
    yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()
    srv.server_close()


def _groups():
    return [
        [{"prompt": "p", "response": "a" * k, "images": []} for k in (1, 2, 3)],
        [{"prompt": "q", "response": "b" * k, "images": []} for k in (4, 5)],
    ]


def test_remote_success_batches(server):
    sc = RemoteScorer(server, batch_size=2, timeout=2.0)
    assert sc.score_groups(_groups()) == [[1.0, 2.0, 3.0], [4.0, 5.0]]
    assert sc.stats["requests"] == 3 and _Handler.calls == 3 and sc.stats["skipped_groups"] == 0


def test_remote_slow_server_times_out(server):
    _Handler.mode = "slow"
    sc = RemoteScorer(server, batch_size=8, timeout=0.2, retries=1, backoff=0.01)
    out = sc.score_groups(_groups())
    assert out == [None, None]
    assert sc.stats["timeouts"] == 2 and sc.stats["retries"] == 1 and sc.stats["skipped_groups"] == 2
    assert sc.stats["items"] == 5 and sc.stats["items_failed"] == 5  # nothing lost from the bookkeeping


def test_remote_server_error_retries_then_skips(server):
    _Handler.mode = "error"
    sc = RemoteScorer(server, batch_size=3, timeout=2.0, retries=2, backoff=0.01)
    out = sc.score_groups(_groups())
    # first batch (group 0) fails; second batch holds group 1's two items and fails too
    assert out == [None, None] and sc.stats["server_errors"] == 6 and sc.stats["failed_batches"] == 2


def test_remote_server_down():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    sc = RemoteScorer(f"http://127.0.0.1:{port}/score", timeout=0.5, retries=2, backoff=0.01)
    t = time.monotonic()
    assert sc.score_groups(_groups()) == [None, None]
    assert time.monotonic() - t < 5 and sc.stats["connection_errors"] == 3 and sc.stats["skipped_groups"] == 2


class _RawServer:
    """A one-behaviour TCP server on 127.0.0.1 for transport faults http.server cannot make:
    ``trickle`` sends a valid response one byte every ``interval`` seconds, ``short`` promises
    a longer body than it sends and closes. Started and stopped by the test."""

    def __init__(self, mode: str, interval: float = 0.25):
        self.mode, self.interval = mode, interval
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/score"

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            conn.settimeout(5)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                body = json.dumps({"scores": [1.0] * 5}).encode()
                head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                if self.mode == "short":
                    conn.sendall((head + f"{len(body) + 100}\r\n\r\n").encode() + body)
                    return
                for b in (head + f"{len(body)}\r\n\r\n").encode() + body:
                    if self.stop.wait(self.interval):
                        return
                    conn.sendall(bytes([b]))
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_remote_total_deadline_against_a_trickling_server():
    srv = _RawServer("trickle", interval=0.25)  # ~100 bytes at 4 bytes/s: 25 s to answer, each byte in time
    try:
        sc = RemoteScorer(srv.url, batch_size=8, timeout=1.0, deadline=1.5, retries=1, backoff=0.01)
        t = time.monotonic()
        assert sc.score_groups(_groups()) == [None, None]
        assert time.monotonic() - t < 2 * 1.5 + 2.0  # two attempts, each cut at its deadline
        assert sc.stats["deadline_exceeded"] == 2 and sc.stats["timeouts"] == 2 and sc.stats["failed_batches"] == 1
    finally:
        srv.close()


def test_remote_incomplete_read_is_a_retried_failure():
    srv = _RawServer("short")
    try:
        sc = RemoteScorer(srv.url, batch_size=8, timeout=2.0, retries=2, backoff=0.01)
        assert sc.score_groups(_groups()) == [None, None]  # nothing raised
        assert sc.stats["connection_errors"] == 3 and sc.stats["retries"] == 2 and sc.stats["skipped_groups"] == 2
    finally:
        srv.close()


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "true", '"1.0"'])
def test_remote_non_finite_or_non_numeric_scores_are_refused(server, bad):
    _Handler.mode, _Handler.raw_scores = "raw", bad
    sc = RemoteScorer(server, batch_size=8, timeout=2.0, retries=2, backoff=0.01)
    assert sc.score_groups(_groups()) == [None, None]
    assert _Handler.calls == 1  # a bad body is not retried
    assert sc.stats["non_finite" if bad in ("NaN", "Infinity", "-Infinity") else "malformed"] == 1


def test_remote_circuit_breaker(server):
    _Handler.mode = "error"
    sc = RemoteScorer(server, batch_size=1, timeout=2.0, retries=1, backoff=0.01, breaker_after=2, breaker_cooldown=0.5)
    assert sc.score([{"prompt": "p", "response": "r", "images": []}] * 5) == [None] * 5
    # two batches of one item failed (2 attempts each), then the breaker opened: no more calls
    assert _Handler.calls == 4 and sc.stats["short_circuited"] == 3 and sc.breaker_open
    _Handler.mode = "ok"
    assert sc.score([{"prompt": "p", "response": "rr", "images": []}]) == [None]  # still open
    time.sleep(0.6)
    assert sc.score([{"prompt": "p", "response": "rr", "images": []}]) == [2.0]  # a trial batch, then closed
    assert not sc.breaker_open and sc.score([{"prompt": "p", "response": "r", "images": []}] * 2) == [1.0, 1.0]


# --- calibration ----------------------------------------------------------------------------


def _cands(scores, correct):
    return [Candidate(f"r{i}", s, c) for i, (s, c) in enumerate(zip(scores, correct))]


def test_build_pairs_absolute_and_gap():
    g = [_cands([8.0, -3.0, 5.0, -12.0], [1, 0, 1, 0]), _cands([1.0, 2.0], [0, 1])]
    assert build_pairs(g, 0.0, "absolute", 2) == [(0, 0, 3), (0, 2, 1)]
    assert build_pairs(g, 5.0, "absolute") == [(0, 0, 3)]
    assert build_pairs(g, 15.0, "gap", 2) == [
        (0, 0, 3),
    ]
    assert build_pairs(g, 1.0, "gap", 2) == [(0, 0, 3), (0, 2, 1), (1, 1, 0)]


def test_threshold_report_agreement():
    g = [_cands([8.0, -3.0], [1, 0]), _cands([6.0, 1.0], [0, 1]), _cands([9.0, 2.0], [1, 1])]
    rows = threshold_report(g, [0.0, 1.5, 7.0])
    assert [r["pairs"] for r in rows] == [1, 2, 2]
    # t=1.5: prompt 0 agrees (correct over wrong), prompt 1 disagrees (its RM prefers the wrong one)
    assert (rows[1]["agree"], rows[1]["disagree"], rows[1]["undecided"], rows[1]["agreement"]) == (1, 1, 0, 0.5)
    # t=7: prompt 0 agrees, prompt 2's pair is two correct answers: undecided
    assert (rows[2]["agree"], rows[2]["disagree"], rows[2]["undecided"], rows[2]["agreement"]) == (1, 0, 1, 1.0)
    assert "threshold" in format_report(rows)


def test_contradiction_check():
    facts = [{"kind": "count", "color": "red", "shape": "circle", "count": 2}]
    assert contradicts_facts("I see 3 red circles", facts)
    assert not contradicts_facts("There are 2 red circles and no blue squares.", facts)
    assert contradicts_facts("There is one blue square", facts)
    assert not contradicts_facts("The sum is 12", facts)


@pytest.mark.parametrize("action", ["raise_threshold", "stop"])
def test_monitor_triggers_at_the_right_step(action):
    facts = [[{"kind": "count", "color": "red", "shape": "circle", "count": 2}]] * 10
    mon = HallucinationMonitor(
        MonitorConfig(max_contradiction_rate=0.25, patience=2, action=action, threshold_step=2.5), threshold=10.0
    )
    decisions = []
    for step, n_bad in enumerate([0, 1, 2, 3, 4, 5, 6]):  # rising contradiction rate: 0%..60%
        answers = ["3 red circles"] * n_bad + ["2 red circles"] * (10 - n_bad)
        decisions.append(mon.evaluate(step * 100, answers, facts))
    acts = [d.action for d in decisions]
    # 30% at step 300 is the first bad evaluation; patience 2 -> act at step 400, then again at 600
    assert acts == ["continue", "continue", "continue", "continue", action, "continue", action]
    assert "contradiction rate 40.0% > 25.0%" in decisions[4].reason
    assert mon.threshold == (15.0 if action == "raise_threshold" else 10.0)


def test_monitor_reward_model_high_on_wrong():
    mon = HallucinationMonitor(MonitorConfig(max_rm_high_on_wrong=0.5, rm_high=5.0, action="stop"), threshold=7.0)
    d = mon.evaluate(1, ["a"] * 4, [[]] * 4, correct=[0, 0, 0, 1], rm_scores=[6, 7, 1, 9])
    assert d.action == "stop" and abs(d.rm_high_on_wrong - 2 / 3) < 1e-9
