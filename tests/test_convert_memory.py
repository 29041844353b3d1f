"""Acceptance: converting a checkpoint with the real 38B tensor widths (2 layers per tower,
embedding 152064x5120, ~5.7 GB of bfloat16) keeps the converter's peak RSS below 3x the
largest tensor plus a fixed overhead, in both directions, and round-trips bit for bit."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from r1v2_jax.convert.keymap import key_entries
from r1v2_jax.convert.safetensors_io import SafetensorsDir, write_safetensors_dir
from r1v2_jax.convert.transformers_format import released_config_dict
from r1v2_jax.model.config import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RSS = (
    "import resource, sys; from r1v2_jax.convert.cli import {fn}; rc = {fn}(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)


pytestmark = pytest.mark.slow  # the fast lane (-m "not slow") skips this module


def wide_config():
    c = model_config("r1v2_38b")
    return c.replace(
        vision=c.vision.__class__(**{**c.vision.__dict__, "num_layers": 2}),
        text=c.text.__class__(**{**c.text.__dict__, "num_layers": 2}),
    )


def write_synthetic_released(config, out_dir, max_shard_bytes=2 * 1000**3):
    """A released-format checkpoint of ``config`` with cheap, distinct, finite bf16 values,
    written one tensor at a time."""
    import ml_dtypes

    base = ((np.arange(1_000_003, dtype=np.uint32) * 2654435761) >> 18).astype(np.uint16) & 0x3FFF
    base = base.view(ml_dtypes.bfloat16)
    entries = key_entries(config)
    specs = [(e.key, e.shape, np.dtype(ml_dtypes.bfloat16)) for e in entries]
    arrays = (np.resize(base[i % 97 :], e.shape) for i, e in enumerate(entries))
    write_safetensors_dir(
        specs,
        arrays,
        out_dir,
        config_json=released_config_dict(config),
        max_shard_bytes=max_shard_bytes,
        extra_json={
            "tokenizer_config.json": {
                "added_tokens_decoder": {str(config.image_token_id): {"content": "<IMG_CONTEXT>"}}
            }
        },
    )
    return max(int(np.prod(e.shape)) * 2 for e in entries)


def run_measured(fn, *args):
    r = subprocess.run(
        [sys.executable, "-c", _RSS.format(fn=fn), *args, "--quiet"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("MAXRSS_KB")][0]
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_peak_rss_at_38b_widths(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < 24 * 1000**3:
        pytest.skip(f"needs ~18 GB of free disk for three copies of the checkpoint, {free / 1e9:.1f} GB free")
    # The fixed overhead: the same converters on the tiny model (interpreter, jax, tensorstore).
    tiny_src, tiny_ours = str(tmp_path / "tiny_src"), str(tmp_path / "tiny_ours")
    write_synthetic_released(model_config("tiny"), tiny_src)
    overhead = max(
        run_measured("main_hf_to_jax", tiny_src, tiny_ours),
        run_measured("main_jax_to_hf", tiny_ours, str(tmp_path / "tiny_back")),
    )

    config = wide_config()
    src, ours, back = str(tmp_path / "src"), str(tmp_path / "ours"), str(tmp_path / "back")
    largest = write_synthetic_released(config, src)
    assert largest == 152064 * 5120 * 2
    total = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    assert total > 5 * 1000**3  # several GB
    budget = 3 * largest + overhead
    rss_in = run_measured("main_hf_to_jax", src, ours)
    rss_out = run_measured("main_jax_to_hf", ours, back, "--shard-size", "2GB")
    print(
        f"\nlargest tensor {largest / 1e9:.2f} GB, checkpoint {total / 1e9:.2f} GB, fixed overhead "
        f"{overhead / 1e9:.2f} GB; peak RSS hf_to_jax {rss_in / 1e9:.2f} GB, jax_to_hf {rss_out / 1e9:.2f} GB, "
        f"budget {budget / 1e9:.2f} GB"
    )
    assert rss_in < budget and rss_out < budget
    shutil.rmtree(ours)
    a, b = SafetensorsDir(src), SafetensorsDir(back)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        assert a.get(k).tobytes() == b.get(k).tobytes(), k
