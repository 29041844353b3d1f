"""r1v2 plan: AOT compilation of the GRPO train step for an abstract TPU topology (libtpu)."""

import json

import pytest

from r1v2_jax.cli import main
from r1v2_jax.plan import parse_topology


def test_topology_names():
    t = parse_topology("v5p-128")
    assert (t.topology_name, t.chips) == ("v5p:4x4x4", 64) and t.hbm_bytes == 95 * 1024**3
    assert parse_topology("v5p-8").topology_name == "v5p:2x2x1"
    assert parse_topology("v6e-16").topology_name == "v6e:4x4"
    assert parse_topology("v4:2x2x2").chips == 8
    with pytest.raises(ValueError, match="expected e.g. v5p-128"):
        parse_topology("h100-8")


def test_plan_tiny_on_a_small_tpu_slice(tmp_path, capsys):
    pytest.importorskip("libtpu")
    out = tmp_path / "plan.json"
    rc = main(["plan", "--config", "configs/demo.py", "--topology", "v5p-8", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["fits"]
    assert r["argument_bytes"] > 0 and r["temp_bytes"] > 0 and r["flops_per_step"] > 0
    assert "fits" in capsys.readouterr().out
    # the same step on a chip with almost no memory: exit status 1, the largest buffers named
    rc = main(["plan", "--config", "configs/demo.py", "--topology", "v5p-8", "--hbm-gib", "0.001"])
    assert rc == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "['mlp']" in text
