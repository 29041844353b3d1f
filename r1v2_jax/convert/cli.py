"""The converters' command lines (``tools/convert_weights/*.py``, console scripts
``r1v2-hf-to-jax`` / ``r1v2-jax-to-hf``): argument parsing around
:func:`r1v2_jax.convert.converters.hf_to_jax` and :func:`~r1v2_jax.convert.converters.jax_to_hf`."""

from __future__ import annotations

import argparse
import sys
import time

from r1v2_jax.convert.converters import hf_to_jax, jax_to_hf
from r1v2_jax.convert.keymap import key_entries


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    if unit not in units or not num:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    return int(float(num) * units[unit])


def _parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"mesh {text!r}: expected DATA,FSDP,TENSOR, e.g. 1,16,4")
    return parts


def main_hf_to_jax(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hf_to_jax.py", description="Released R1V2 safetensors -> r1v2-jax checkpoint.")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="target parameter dtype (default: as stored)",
    )
    p.add_argument(
        "--mesh",
        type=_parse_mesh,
        default=None,
        metavar="DATA,FSDP,TENSOR",
        help="align chunks with the shards of this mesh for a sharded restore",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--image-token-id", type=int, default=None, help="<IMG_CONTEXT> id if no tokenizer file has it")
    p.add_argument("--no-strict", action="store_true", help="ignore unknown config.json keys")
    p.add_argument("--strict-finite", action="store_true", help="refuse weights with NaN/inf values")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    report: dict = {}
    cfg = _or_exit_2(
        "hf_to_jax",
        lambda: hf_to_jax(
            a.hf_dir,
            a.out_dir,
            dtype=a.dtype,
            mesh_shape=a.mesh,
            overwrite=a.overwrite,
            strict=not a.no_strict,
            image_token_id=a.image_token_id,
            quiet=a.quiet,
            strict_finite=a.strict_finite,
            report=report,
        ),
    )
    if cfg is None:
        return 2
    print(
        f"hf_to_jax: wrote {a.out_dir} ({cfg.param_dtype}, {len(key_entries(cfg))} tensors{_nonfinite_note(report)}) "
        f"in {time.perf_counter() - t0:.1f}s; restore with r1v2_jax.load_checkpoint({a.out_dir!r})"
    )
    return 0


def _or_exit_2(prog: str, convert):
    """``convert()``'s result, or None after printing ``prog: error: ...`` for a conversion
    error (bad input files, keys, shapes, an existing output): the command then exits 2."""
    try:
        return convert()
    except (ValueError, KeyError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None


def _nonfinite_note(report: dict) -> str:
    bad = report.get("nonfinite") or {}
    return f"; WARNING: {sum(bad.values())} non-finite values in {len(bad)} tensors" if bad else ""


def main_jax_to_hf(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jax_to_hf.py", description="r1v2-jax checkpoint -> HF safetensors.")
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", dest="fmt", choices=["released", "transformers"], default="released")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--shard-size", type=_parse_size, default=5 * 1000**3, help="max bytes per shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--strict-finite", action="store_true", help="refuse weights with NaN/inf values")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    report: dict = {}
    names = _or_exit_2(
        "jax_to_hf",
        lambda: jax_to_hf(
            a.ckpt_dir,
            a.out_dir,
            fmt=a.fmt,
            dtype=a.dtype,
            max_shard_bytes=a.shard_size,
            overwrite=a.overwrite,
            quiet=a.quiet,
            strict_finite=a.strict_finite,
            report=report,
        ),
    )
    if names is None:
        return 2
    print(
        f"jax_to_hf: wrote {a.out_dir} ({a.fmt}, {len(names)} shard(s){_nonfinite_note(report)}) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0
