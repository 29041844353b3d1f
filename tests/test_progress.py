"""Progress off a terminal: periodic lines with stage, step, metrics and an ETA, and the last step."""

import io

from r1v2_jax.train.progress import Progress


def test_progress_lines_when_not_a_terminal(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 100.0])
    monkeypatch.setattr("r1v2_jax.train.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()  # not a tty: no bar
    p = Progress("grpo", total=10, initial=0, every_s=30.0, stream=out)
    p.update(1, {"loss": 0.5})  # t=1: too soon
    p.update(2, {"loss": 0.25, "accuracy": 0.5, "other": 3})  # t=2: too soon
    p.update(3, {"loss": 0.125})  # t=40: a line
    p.update(4, {"loss": 0.1})  # t=41: too soon again
    p.update(10, {"loss": 0.05})  # the last step: always a line
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[grpo] step 3/10 (30%) loss 0.125 | 13.33 s/step, ETA 1m33s"), lines[0]
    assert lines[1].startswith("[grpo] step 10/10 (100%) loss 0.05 |") and lines[1].endswith("ETA 0m00s")


def test_progress_disabled_prints_nothing():
    out = io.StringIO()
    p = Progress("sft", total=2, initial=0, stream=out, enabled=False)
    p.update(2, {"loss": 1.0})
    assert out.getvalue() == ""
