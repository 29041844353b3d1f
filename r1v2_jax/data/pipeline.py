"""grain input pipelines: shuffled, sharded per host, preprocessed in worker processes,
batched to static shapes, and resumable from a checkpointed iterator state.

    it = rl_prompt_iterator(records, builder, PipelineConfig(batch_size=8, seed=0), tile_size=448)
    batch = next(it)        # dict of numpy arrays (see collate_prompts)
    state = it.get_state()  # JSON-able: save it with the train state
    it.set_state(state)     # ... and resume exactly there

Order of operations: records -> shuffle (seeded, reshuffled each epoch) -> repeat -> this
host's share of every global batch (``batch_size`` is the global batch; host ``p`` of ``P``
takes its ``batch_size / P`` consecutive items of each, so the global batches are the same
whatever the number of hosts, and each host only loads its own) -> per-example
preprocessing (images tiled, prompt tokenised; in ``worker_count`` processes) -> drop and
count bad samples (in the main process, so counts survive) -> batch. No record stops the
iteration: any failure to prepare one (a bad image, a prompt error, or an unexpected
exception, counted as ``preprocess_error``) is a counted skip; an empty record list is
:class:`EmptyDataset`, and ``max_consecutive_skips`` unusable samples in a row stop with
:class:`TooManySkips` and the counts by reason. Batches have static
shapes: prompts are left-padded to the smallest length bucket that fits the longest
prompt of the batch, and tiles are padded to a multiple of ``tiles_bucket`` (the extra
tiles are zeros that no ``<IMG_CONTEXT>`` token refers to).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from r1v2_jax.data.formats import BadSample, EmptyDataset, SkipCounter, open_image
from r1v2_jax.data.image import ALPHA_MODES, DEFAULT_MAX_MEGAPIXELS, preprocess
from r1v2_jax.data.prompt import PromptBuilder, PromptError


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int  # global: summed over hosts
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    worker_count: int = 0  # 0: preprocess in the main process
    worker_buffer_size: int = 2
    length_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
    tiles_bucket: int = 8
    max_tiles: int = 6  # dynamic tiling: tiles per image (the thumbnail comes on top)
    use_thumbnail: bool = True
    dynamic_tiling: bool = True
    process_index: int | None = None  # None: jax.process_index()
    process_count: int | None = None  # None: jax.process_count()
    drop_remainder: bool = True
    max_image_megapixels: float = DEFAULT_MAX_MEGAPIXELS  # larger images are a counted skip (image_too_large)
    max_consecutive_skips: int = 1000  # this many unusable samples in a row stop with TooManySkips (0: never)
    # Packing of sft / preference batches (collate_packed): 0 = off (one sequence per row,
    # right-padded to a length bucket); > 0 = rows of this many tokens holding several
    # sequences each (segment ids, positions restarting per sequence), the number of rows
    # rounded up to a multiple of pack_rows_multiple (few distinct shapes).
    pack_length: int = 0
    pack_rows_multiple: int = 1
    # transparency: "drop" (PIL convert("RGB"), as the released pipeline) or "white" (composited)
    alpha: str = "drop"

    def __post_init__(self):
        if not self.max_image_megapixels > 0:
            raise ValueError(f"data.max_image_megapixels: must be > 0, got {self.max_image_megapixels!r}")
        if self.max_consecutive_skips < 0:
            raise ValueError(f"data.max_consecutive_skips: must be >= 0, got {self.max_consecutive_skips!r}")
        if self.pack_length < 0 or self.pack_rows_multiple < 1:
            raise ValueError(
                f"PipelineConfig: pack_length must be >= 0 and pack_rows_multiple >= 1, got "
                f"{self.pack_length} and {self.pack_rows_multiple}"
            )
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"pipeline alpha: expected one of {ALPHA_MODES}, got {self.alpha!r}")


def host_shard(cfg: PipelineConfig) -> tuple[int, int]:
    if cfg.process_index is not None and cfg.process_count is not None:
        return cfg.process_index, cfg.process_count

    return jax.process_index(), jax.process_count()


class HostSlice(grain.MapDataset):
    """Host ``index``'s share of every global batch of ``parent``: items
    ``[k*B + index*b, k*B + (index+1)*b)`` for global batch ``k`` (``B = global_batch``,
    ``b = B / count``). A partial last global batch is dropped (``drop_remainder``) or padded by
    wrapping around (``pad``, so every host gets the same number of batches; callers drop the
    repeats by their ``where``)."""

    def __init__(
        self, parent: grain.MapDataset, global_batch: int, index: int, count: int, *, drop_remainder: bool, pad: bool
    ):
        super().__init__(parent)
        if global_batch % count:
            raise ValueError(f"data.batch_size: the global batch {global_batch} must be divisible by the {count} hosts")
        self._n, self._big, self._b, self._index = len(parent), global_batch, global_batch // count, index
        full, rem = divmod(self._n, global_batch)
        if drop_remainder or rem == 0:
            self._len = full * self._b
        elif pad:
            self._len = (full + 1) * self._b
        else:
            self._len = full * self._b + max(0, min(self._b, rem - index * self._b))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        k, j = divmod(i, self._b)
        g = k * self._big + self._index * self._b + j
        if g < self._n:
            return self._parent[g]
        return dict(self._parent[g % self._n], _pad=True)  # a repeat that only fills the last batch


def load_tiles(record: dict, tile_size: int, cfg: PipelineConfig) -> list[np.ndarray]:
    """Each image of a record as f32[n_tiles, 3, S, S] (raises BadSample for unusable images)."""
    return [
        preprocess(
            open_image(record, im, cfg.max_image_megapixels),
            tile_size=tile_size,
            max_num=cfg.max_tiles,
            use_thumbnail=cfg.use_thumbnail,
            dynamic=cfg.dynamic_tiling,
            alpha=cfg.alpha,
        )
        for im in record["images"]
    ]


def _skip(record: dict, e: Exception) -> dict:
    """The skip marker for a record that could not be prepared (BadSample details name the record)."""
    if isinstance(e, BadSample):
        return {"_skip": e.reason, "_detail": str(e)}
    reason = e.reason if isinstance(e, PromptError) else "preprocess_error"
    return {"_skip": reason, "_detail": f"{record.get('_where', '?')}: {type(e).__name__}: {e}"}


class PreparePrompt(grain.transforms.Map):
    """record -> example dict (or a ``_skip`` marker with the reason); picklable for workers."""

    def __init__(self, builder: PromptBuilder, tile_size: int, cfg: PipelineConfig):
        self.builder, self.tile_size, self.cfg = builder, tile_size, cfg

    def map(self, record: dict) -> dict:
        try:
            tiles = load_tiles(record, self.tile_size, self.cfg)
            ids = self.builder.encode_prompt(record["question"], [len(t) for t in tiles])
        except Exception as e:  # noqa: BLE001 - one bad record never stops training
            return _skip(record, e)
        pix = np.concatenate(tiles) if tiles else np.zeros((0, 3, self.tile_size, self.tile_size), np.float32)
        return {
            "input_ids": np.asarray(ids, np.int32),
            "pixel_values": pix.astype(np.float32),
            "answer": record["answer"],
            "choices": list(record.get("choices") or []),
            "category": record.get("category") or "",
            "facts": record.get("facts") or [],
            "where": record["_where"],
            "pad": bool(record.get("_pad", False)),
        }


class PrepareSequences(grain.transforms.Map):
    """``sft`` / ``preference`` record -> prompt + completion ids with loss masks."""

    def __init__(self, builder: PromptBuilder, tile_size: int, cfg: PipelineConfig, kind: str):
        self.builder, self.tile_size, self.cfg, self.kind = builder, tile_size, cfg, kind

    def map(self, record: dict) -> dict:
        try:
            tiles = load_tiles(record, self.tile_size, self.cfg)
            n_tiles = [len(t) for t in tiles]
            names = ("response",) if self.kind == "sft" else ("chosen", "rejected")
            seqs = {n: self.builder.encode_pair(record["prompt"], record[n], n_tiles) for n in names}
        except Exception as e:  # noqa: BLE001 - one bad record never stops training
            return _skip(record, e)
        pix = np.concatenate(tiles) if tiles else np.zeros((0, 3, self.tile_size, self.tile_size), np.float32)
        out = {
            "pixel_values": pix.astype(np.float32),
            "where": record["_where"],
            "pad": bool(record.get("_pad", False)),
        }
        for n, (ids, mask, truncated) in seqs.items():
            out[n] = (ids, mask, truncated)
        return out


def collate_sequences(
    examples: list[dict], cfg: PipelineConfig, tile_size: int, names: tuple[str, ...], pad_id: int = 0
) -> dict[str, Any]:
    """Right-padded sequences per name: ``{name}_ids`` i32[B, L], ``{name}_mask`` (1 = real
    token), ``{name}_loss_mask`` (1 = completion token), ``{name}_truncated``; plus the
    tiles as in :func:`collate_prompts` (each example's images serve all its sequences)."""
    b = len(examples)
    longest = max(len(e[n][0]) for e in examples for n in names)
    length = _bucket(longest, cfg.length_buckets)
    out: dict[str, Any] = {}
    for n in names:
        ids = np.full((b, length), pad_id, np.int32)
        real = np.zeros((b, length), bool)
        loss = np.zeros((b, length), bool)
        for i, e in enumerate(examples):
            x, m, _ = e[n]
            ids[i, : len(x)], real[i, : len(x)], loss[i, : len(x)] = x, True, m
        out.update(
            {
                f"{n}_ids": ids,
                f"{n}_mask": real,
                f"{n}_loss_mask": loss,
                f"{n}_truncated": np.asarray([e[n][2] for e in examples]),
            }
        )
    out.update(_collate_tiles(examples, cfg, tile_size))
    out["where"] = [e["where"] for e in examples]
    out["pad"] = [e["pad"] for e in examples]
    return out


def pack_rows(lengths: list[int], length: int) -> list[list[int]]:
    """First-fit decreasing bin packing: the example indices of each row (ascending), every
    row's total <= ``length``. Deterministic (ties keep input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > length:
            raise ValueError(f"data.pack_length: a sequence of {lengths[i]} tokens does not fit rows of {length}")
        r = next((r for r, f in enumerate(free) if lengths[i] <= f), None)
        if r is None:
            rows.append([])
            free.append(length)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return [sorted(r) for r in rows]


def collate_packed(
    examples: list[dict], cfg: PipelineConfig, tile_size: int, names: tuple[str, ...], pad_id: int = 0
) -> dict[str, Any]:
    """Several examples per row of ``cfg.pack_length`` tokens. An example's sequences (``names``:
    ``response``, or ``chosen`` then ``rejected``) sit side by side in one row, each its own
    segment. Keys, with ``p`` = the name for one name (``response_ids`` ...), else ``packed``:
    ``p_ids`` i32[R, L]; ``p_mask`` i32[R, L] segment ids (1, 2, ... per sequence in its row,
    0 = padding: what the model takes as attention mask); ``p_positions`` i32[R, L] (restarting
    at 0 per sequence); ``p_loss_mask`` (completion tokens); ``p_example`` i32[R, L] (the
    example's index in this batch, -1 = padding) and ``p_name`` i32[R, L] (index into
    ``names``); ``p_slot`` i32[R, L] (the example's place among its row's examples, -1 =
    padding) and ``p_valid`` bool[R, K] (row r holds an example in slot k), K =
    ``pack_length // len(names)`` (the most a row can hold, fixed so shapes do not depend on
    the data): the losses sum an example's tokens into its slot; ``pixel_values`` /
    ``num_tiles`` per row (a row's tiles are its sequences' tiles in order, once per
    sequence, so the per-row image merge fills each sequence's slots with its own); ``where``
    / ``pad`` per example (batch order)."""
    length = cfg.pack_length
    units = [sum(len(e[n][0]) for n in names) for e in examples]
    rows = pack_rows(units, length)
    r_total = -(-len(rows) // cfg.pack_rows_multiple) * cfg.pack_rows_multiple
    ids = np.full((r_total, length), pad_id, np.int32)
    seg, pos, ex, nm, slot = (np.zeros((r_total, length), np.int32) for _ in range(5))
    ex[:], nm[:], slot[:] = -1, -1, -1
    valid = np.zeros((r_total, length // len(names)), bool)
    loss = np.zeros((r_total, length), bool)
    empty = np.zeros((0, 3, tile_size, tile_size), np.float32)
    row_tiles = [empty] * r_total
    for r, members in enumerate(rows):
        at, k, tiles = 0, 0, []
        valid[r, : len(members)] = True
        for s, i in enumerate(members):
            for j, n in enumerate(names):
                x, m, _ = examples[i][n]
                k += 1
                sl = slice(at, at + len(x))
                ids[r, sl], seg[r, sl], pos[r, sl], loss[r, sl] = x, k, np.arange(len(x)), m
                ex[r, sl], nm[r, sl], slot[r, sl] = i, j, s
                at += len(x)
                tiles.append(examples[i]["pixel_values"])
        row_tiles[r] = np.concatenate(tiles) if tiles else empty
    p = names[0] if len(names) == 1 else "packed"
    out = {
        f"{p}_ids": ids,
        f"{p}_mask": seg,
        f"{p}_positions": pos,
        f"{p}_loss_mask": loss,
        f"{p}_example": ex,
        f"{p}_name": nm,
        f"{p}_slot": slot,
        f"{p}_valid": valid,
    }
    out.update(_collate_tiles([{"pixel_values": t} for t in row_tiles], cfg, tile_size))
    out["where"] = [e["where"] for e in examples]
    out["pad"] = [e["pad"] for e in examples]
    return out


def padding_stats(real_tokens: int, rows: int, length: int) -> dict:
    """Share of a batch's token slots that hold real tokens."""
    return {"real": real_tokens, "slots": rows * length, "real_share": real_tokens / max(rows * length, 1)}


def _collate_tiles(examples, cfg, tile_size):
    tiles = [e["pixel_values"] for e in examples]
    total = sum(len(t) for t in tiles)
    padded = max(cfg.tiles_bucket, -(-total // cfg.tiles_bucket) * cfg.tiles_bucket)
    pix = np.zeros((padded, 3, tile_size, tile_size), np.float32)
    if total:
        pix[:total] = np.concatenate(tiles)
    return {"pixel_values": pix, "num_tiles": np.asarray([len(t) for t in tiles], np.int32)}


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def collate_prompts(examples: list[dict], cfg: PipelineConfig, tile_size: int, pad_id: int = 0) -> dict[str, Any]:
    """A static-shape batch: input_ids i32[B, P] left-padded, attention_mask bool[B, P],
    pixel_values f32[T, 3, S, S] (tiles in prompt order, zero-padded), num_tiles i32[B], and
    the answers/choices/categories/facts as Python lists."""
    b = len(examples)
    p = _bucket(max(len(e["input_ids"]) for e in examples), cfg.length_buckets)
    ids = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, p - n :], mask[i, p - n :] = e["input_ids"], True
    return {
        "input_ids": ids,
        "attention_mask": mask,
        **_collate_tiles(examples, cfg, tile_size),
        "answer": [e["answer"] for e in examples],
        "choices": [e["choices"] for e in examples],
        "category": [e["category"] for e in examples],
        "facts": [e["facts"] for e in examples],
        "where": [e["where"] for e in examples],
        "pad": [e["pad"] for e in examples],
    }


class DataIterator:
    """A grain iterator plus the skip counts, with one checkpointable state."""

    def __init__(self, dataset: grain.IterDataset, skips: SkipCounter):
        self._dataset, self.skips = dataset, skips
        self._it = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "skips": self.skips.as_dict()}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["grain"])
        self.skips.counts.clear()
        self.skips.counts.update(state.get("skips", {}))
        self.skips.consecutive = 0


def _iterator(records, prepare, collate, cfg: PipelineConfig, skips: SkipCounter | None) -> DataIterator:
    skips = skips if skips is not None else SkipCounter()
    skips.max_consecutive, skips.consecutive = cfg.max_consecutive_skips, 0
    if not records:
        raise EmptyDataset(
            f"data: no usable records to iterate (the dataset is empty or every record was "
            f"skipped when reading it; skipped by reason: {skips.as_dict()})"
        )
    index, count = host_shard(cfg)
    ds = grain.MapDataset.source(records).shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
    if count > 1:
        ds = HostSlice(ds, cfg.batch_size, index, count, drop_remainder=cfg.drop_remainder, pad=True)
    it = ds.to_iter_dataset().map(prepare)
    if cfg.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size)
        )

    def keep(e):
        if "_skip" in e:
            skips.skip(e["_skip"], e["_detail"])  # raises TooManySkips past the bound
            return False
        skips.kept()
        return True

    it = it.filter(keep).batch(
        cfg.batch_size // count, drop_remainder=cfg.drop_remainder, batch_fn=lambda xs: collate(list(xs))
    )
    return DataIterator(it, skips)


def rl_prompt_iterator(
    records: list[dict],
    builder: PromptBuilder,
    cfg: PipelineConfig,
    *,
    tile_size: int,
    pad_id: int = 0,
    skips: SkipCounter | None = None,
) -> DataIterator:
    """Batches of RL prompts (``rl`` records from :func:`r1v2_jax.data.formats.load_records`)."""
    return _iterator(
        records,
        PreparePrompt(builder, tile_size, cfg),
        lambda xs: collate_prompts(xs, cfg, tile_size, pad_id),
        cfg,
        skips,
    )


def sequence_iterator(
    records: list[dict],
    builder: PromptBuilder,
    cfg: PipelineConfig,
    *,
    kind: str,
    tile_size: int,
    pad_id: int = 0,
    skips: SkipCounter | None = None,
) -> DataIterator:
    """Batches of ``sft`` (``response_*``) or ``preference`` (``chosen_*``, ``rejected_*``) sequences."""
    if kind not in ("sft", "preference"):
        raise ValueError(f"sequence_iterator: kind must be 'sft' or 'preference', got {kind!r}")
    names = ("response",) if kind == "sft" else ("chosen", "rejected")
    collate = collate_packed if cfg.pack_length else collate_sequences
    return _iterator(
        records,
        PrepareSequences(builder, tile_size, cfg, kind),
        lambda xs: collate(xs, cfg, tile_size, names, pad_id),
        cfg,
        skips,
    )
