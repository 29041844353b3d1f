"""Padding waste of SFT / preference batches, one sequence per row (right-padded to the smallest
length bucket that fits the batch) against packed rows (r1v2_jax.data.pipeline.collate_packed:
first-fit decreasing into rows of ``pack_length`` tokens).

    python bench/packing_waste.py

Two length mixes: the synthetic visual task as the demo builds its SFT sequences (tiny
tokenizer, one 56-px tile, cold-start responses; short and nearly uniform), and a long-tailed
mix (log-normal lengths, median 600 tokens, clipped to [64, 8192], as reasoning traces are).
Batches are consecutive slices of a seeded shuffle, as the pipeline draws them. Prints the share
of token slots holding real tokens.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1v2_jax.data.formats import load_records  # noqa: E402
from r1v2_jax.data.pipeline import PipelineConfig, _bucket, pack_rows  # noqa: E402
from r1v2_jax.data.prompt import PromptBuilder  # noqa: E402
from r1v2_jax.data.synthetic import make_synthetic  # noqa: E402
from r1v2_jax.data.tokenizer import tiny_tokenizer  # noqa: E402
from r1v2_jax.train.experiment import cold_start_response  # noqa: E402


def synthetic_lengths(n: int = 600) -> list[int]:
    with tempfile.TemporaryDirectory() as d:
        make_synthetic(d, n, seed=0, image_size=56, categories=("count", "arith", "compare", "color"))
        records = load_records(os.path.join(d, "train.jsonl"), "rl")
        builder = PromptBuilder(tiny_tokenizer(255, 256), tokens_per_tile=4, max_prompt_len=192, max_completion_len=32)
        return [
            len(builder.encode_pair(r["question"], cold_start_response(r), [1] * len(r["images"]))[0]) for r in records
        ]


def long_tailed_lengths(n: int = 4096, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(np.log(600), 1.0, n), 64, 8192)]


def waste(lengths: list[int], batch: int, pack_length: int, buckets, rows_multiple: int = 1, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(lengths))
    real = slots_plain = slots_packed = 0
    for start in range(0, len(order) - batch + 1, batch):
        ls = [lengths[i] for i in order[start : start + batch]]
        real += sum(ls)
        slots_plain += batch * _bucket(max(ls), buckets)
        rows = -(-len(pack_rows(ls, pack_length)) // rows_multiple) * rows_multiple
        slots_packed += rows * pack_length
    return real / slots_plain, real / slots_packed


def main() -> None:
    default = PipelineConfig(batch_size=1).length_buckets
    syn = synthetic_lengths()
    cases = [
        ("synthetic task (demo SFT)", syn, 8, 256, (64, 128, 256)),
        ("synthetic task (demo SFT)", syn, 32, 448, (64, 128, 256)),
        ("synthetic task (demo SFT)", syn, 64, 384, (64, 128, 256)),
        ("long-tailed, median 600", long_tailed_lengths(), 64, 8192, default),
        ("long-tailed, median 600", long_tailed_lengths(), 256, 8192, default),
    ]
    print("| length mix | mean length | batch | pack_length | real slots, one per row | real slots, packed |")
    print("|---|---|---|---|---|---|")
    for name, lengths, batch, pack, buckets in cases:
        plain, packed = waste(lengths, batch, pack, buckets)
        print(f"| {name} | {np.mean(lengths):.0f} | {batch} | {pack} | {plain:.1%} | {packed:.1%} |")


if __name__ == "__main__":
    main()
