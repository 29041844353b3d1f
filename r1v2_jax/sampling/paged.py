"""Paged KV cache: a page pool per layer, page tables per decode slot, and decode attention
that reads only the pages a slot's table names.

Layout. Every layer has one pool ``[num_pages, page_size, 2·Hkv, hd]`` holding keys and values
interleaved on the head axis (key head h at ``2h``, value head h at ``2h + 1``): the layout of
the TPU ragged paged attention kernel (``jax.experimental.pallas.ops.tpu.ragged_paged_attention``),
so both attention implementations read the same pages. Page ``p`` means the same page in every
layer's pool, so one allocator (:class:`PagePool`, on the host) serves the whole stack. Page 0
is never handed out: it is where slots with nothing to store write (idle slots, finished
samples), and what unused table entries point at (masked, never attended).

A slot's table row lists its pages in token order: token ``i`` of the sequence (prompt
first) lives at page ``table[i // page_size]``, offset ``i % page_size``. The compiled step
receives only the first ``n`` columns of the tables, ``n`` the bucket (a power of two) that
covers the longest live sequence for the next K steps.

Attention (``impl``):

* ``xla``: the model's own :func:`r1v2_jax.model.attention.reference_attention` over the
  gathered ``n`` pages with a length mask: masked positions get exactly zero weight, so a
  sequence's logits equal those of the dense cache up to the order of float additions.
* ``ragged``: the Pallas TPU kernel (:func:`ragged_decode`), one query token per slot, each
  slot reading its own ``length`` tokens of its pages (``kv_lens``), no gather. TPU only:
  it compiles ahead of time for TPU on a CPU host (tests/test_engine.py), and its arguments
  are checked against the kernel's own reference implementation on CPU; jax 0.10.2's TPU
  interpreter cannot run it (it does not implement the kernel's ref reshapes).
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from r1v2_jax.model.attention import reference_attention as attention
from r1v2_jax.parallel.sharding import as_axes

IMPLS = ("xla", "ragged")


def interleave(k: jax.Array, v: jax.Array) -> jax.Array:
    """k, v f[..., H, d] -> f[..., 2H, d], key head h at 2h and value head h at 2h + 1."""
    return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def ragged_args(q: jax.Array, pages: jax.Array, length: jax.Array, table: jax.Array) -> tuple:
    """The kernel's positional arguments for one decode token per slot: q f[S, Hq, hd], the
    pool, kv_lens (tokens each slot attends to, the new one included), page_indices, cu_q_lens
    (0, 1, ..., S), num_seqs (S)."""
    s = q.shape[0]
    i32 = jnp.int32
    return q, pages, length.astype(i32), table.astype(i32), jnp.arange(s + 1, dtype=i32), jnp.full((1,), s, i32)


def ragged_decode(
    q: jax.Array, pages: jax.Array, length: jax.Array, table: jax.Array, *, pages_per_block: int, queries_per_block: int
) -> jax.Array:
    """Decode attention by the TPU ragged paged attention kernel: q f[S, Hq, hd] -> f[S, Hq, hd].

    Block sizes are explicit (a CPU host compiling for TPU has no tuned table to look up):
    ``pages_per_block`` KV pages per flash block (capped at the table's width),
    ``queries_per_block`` query tokens per block."""
    hd = q.shape[-1]
    args = ragged_args(q.astype(pages.dtype), pages, length, table)
    out = ragged_paged_attention(
        *args,
        sm_scale=float(hd**-0.5),
        num_kv_pages_per_block=min(pages_per_block, table.shape[1]),
        num_queries_per_block=queries_per_block,
    )
    return out.astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Where the engine's decode slots and page pools lie on a mesh.

    The slots are split over the mesh's batch axes (the rules' ``act_batch``, ``data`` x
    ``fsdp``) in contiguous blocks, and so is the page axis of every pool: each batch shard has
    a pool of its own, whose page ids are local to it (page 0 of each shard reserved), serving
    only its own slots, so a decode step never reads a page on another shard. KV heads are
    split over the head axes (``act_kv_heads``, ``tensor``); the interleaved head axis ``2·Hkv``
    splits into whole (key, value) pairs. Every pool operation (the decode step's write and
    attention, the prefill's writes, copy on write) runs per shard inside ``shard_map``, as the
    TPU kernel requires on a mesh. No mesh: one device, the operations called directly.
    """

    mesh: Mesh | None = None
    batch: tuple = ()
    heads: tuple = ()

    @classmethod
    def for_mesh(cls, mesh: Mesh | None, rules, *, slots: int, kv_heads: int) -> PoolLayout:
        if mesh is None:
            return cls()
        table = dict(rules)
        out = cls(mesh, as_axes(table.get("act_batch")), as_axes(table.get("act_kv_heads")))
        if slots % out.shards:
            raise ValueError(
                f"EngineConfig.slots: {slots} slots cannot be split over the mesh's batch axes "
                f"{out.batch} ({out.shards} shards); use a multiple of {out.shards}"
            )
        if kv_heads % out.head_ways:
            raise ValueError(
                f"the paged engine splits KV heads over mesh axes {out.heads}: {kv_heads} KV heads "
                f"do not divide into {out.head_ways}"
            )
        return out

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch) if self.mesh is not None else 1

    @property
    def head_ways(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.heads) if self.mesh is not None else 1

    def spec(self, *dims) -> P:
        """A PartitionSpec from "b" (the batch axes), "h" (the head axes) and None per dimension."""
        name = {"b": self.batch or None, "h": self.heads or None, None: None}
        return P(*(name[d] for d in dims))

    def sharding(self, *dims) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, self.spec(*dims))

    def per_shard(self, fn, in_dims: tuple, out_dims):
        """``fn`` on each shard's blocks (``shard_map``): per argument a dims tuple as :meth:`spec`
        takes it (``()``: replicated); ``out_dims`` one such tuple, or a list of them for several
        outputs. ``fn`` itself without a mesh."""
        if self.mesh is None:
            return fn
        out = [self.spec(*d) for d in out_dims] if isinstance(out_dims, list) else self.spec(*out_dims)
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=tuple(self.spec(*d) for d in in_dims),
            out_specs=tuple(out) if isinstance(out, list) else out,
            check_vma=False,
        )

    def shard_index(self) -> jax.Array:
        """Inside :meth:`per_shard`: this block's batch shard (0 without a mesh)."""
        return jax.lax.axis_index(self.batch) if self.mesh is not None and self.batch else jnp.int32(0)


POOL = ("b", None, "h", None)  # a pool [P, page_size, 2·Hkv, hd]: pages by batch shard, heads split
SLOTS = ("b",)


@flax.struct.dataclass
class PagedKV:
    """One layer's pool and this step's addressing, passed to the attention as its cache.

    pages: f[P, page_size, 2·Hkv, hd] (keys and values interleaved); table: i32[S, n] (each
    slot's first n pages); write_page, write_offset: i32[S] where each slot's new token goes
    (page 0: nowhere); length: i32[S] tokens each slot attends to (including the one written
    now); impl: ``xla`` or ``ragged`` (the TPU kernel), with its block sizes; layout: where
    slots and pages lie (:class:`PoolLayout`; page ids are local to the slot's batch shard).
    """

    pages: jax.Array
    table: jax.Array
    write_page: jax.Array
    write_offset: jax.Array
    length: jax.Array
    impl: str = flax.struct.field(pytree_node=False, default="xla")
    pages_per_block: int = flax.struct.field(pytree_node=False, default=16)
    queries_per_block: int = flax.struct.field(pytree_node=False, default=32)
    layout: PoolLayout = flax.struct.field(pytree_node=False, default=PoolLayout())

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, PagedKV]:
        """q: f[S, 1, Hq, hd]; k, v: f[S, 1, Hkv, hd] (this step's token per slot) -> (attention
        output f[S, 1, Hq, hd], the cache with k, v stored)."""
        heads = ("b", None, "h", None)
        dims = (heads, heads, heads, POOL, ("b", None), SLOTS, SLOTS, SLOTS)
        fn = self.layout.per_shard(self._attend_local, dims, [heads, POOL])
        out, kv = fn(q, k, v, self.pages, self.table, self.write_page, self.write_offset, self.length)
        return out, self.replace(pages=kv)

    def _attend_local(self, q, k, v, pages, table, write_page, write_offset, length):
        kv = pages.at[write_page, write_offset].set(interleave(k[:, 0], v[:, 0]).astype(pages.dtype))
        if self.impl == "ragged":
            out = ragged_decode(
                q[:, 0],
                kv,
                length,
                table,
                pages_per_block=self.pages_per_block,
                queries_per_block=self.queries_per_block,
            )[:, None]
            return out, kv
        s, n = table.shape
        ps = kv.shape[1]
        both = kv[table].reshape(s, n * ps, *kv.shape[2:]).astype(q.dtype)
        keys, values = both[:, :, 0::2], both[:, :, 1::2]
        mask = (jnp.arange(n * ps)[None, :] < length[:, None])[:, None, None, None, :]
        return attention(q, keys, values, mask), kv


def write_prompts(layout: PoolLayout, pages: jax.Array, kv: jax.Array, table: jax.Array, shard: jax.Array) -> jax.Array:
    """Store prompts' K/V: kv f[A, n, page_size, 2·Hkv, hd] into pages table i32[A, n] (local
    ids; 0: nowhere) of batch shard shard i32[A]; other shards write their row to page 0."""

    def local(pages, kv, table, shard):
        mine = shard[:, None] == layout.shard_index()
        return pages.at[jnp.where(mine, table, 0)].set(kv.astype(pages.dtype))

    return layout.per_shard(local, (POOL, (None, None, None, "h", None), (), ()), POOL)(pages, kv, table, shard)


def copy_pages(layout: PoolLayout, pages: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    """Each slot's page src[s] copied to dst[s] (i32[S], local to the slot's shard; 0 -> 0: none)."""
    return layout.per_shard(lambda x, a, b: x.at[b].set(x[a]), (POOL, SLOTS, SLOTS), POOL)(pages, src, dst)


def init_pools(
    num_layers: int,
    num_pages: int,
    page_size: int,
    kv_heads: int,
    head_dim: int,
    dtype,
    layout: PoolLayout = PoolLayout(),
) -> list:
    """Zeroed per-layer pools, each [shards · num_pages, page_size, 2·Hkv, hd] (keys and values
    interleaved; ``num_pages`` per batch shard of ``layout``), laid out on its mesh."""
    shape = (layout.shards * num_pages, page_size, 2 * kv_heads, head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=layout.sharding(*POOL))
    return [zeros() for _ in range(num_layers)]


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def page_bucket(pages: int, max_pages: int) -> int:
    """The table width compiled for ``pages`` live pages: the next power of two, at most max_pages."""
    n = 1
    while n < pages:
        n *= 2
    return min(n, max_pages)


class PagePool:
    """The host's page allocator with reference counts (prompt pages are shared by samples).

    Allocation takes the lowest free page ids first, so the same sequence of requests gives the
    same pages on every host. ``peak`` is the most pages ever in use at once.
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages: need at least 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.refs = np.zeros(num_pages, np.int32)
        self.refs[0] = 1  # reserved
        self.peak = 0

    @property
    def free(self) -> int:
        return int((self.refs == 0).sum())

    @property
    def in_use(self) -> int:
        return self.num_pages - 1 - self.free

    def alloc(self, n: int) -> list[int]:
        ids = np.flatnonzero(self.refs == 0)[:n]
        if len(ids) < n:
            raise RuntimeError(f"page pool exhausted: {n} pages requested, {len(ids)} free of {self.num_pages}")
        self.refs[ids] = 1
        self.peak = max(self.peak, self.in_use)
        return ids.tolist()

    def share(self, ids) -> None:
        """One more holder of pages ``ids``."""
        self.refs[np.asarray(ids, np.int64)] += 1

    def release(self, ids) -> None:
        ids = np.asarray(ids, np.int64)
        if (self.refs[ids] <= 0).any() or (ids == 0).any():
            raise RuntimeError(f"page pool: releasing pages not held: {ids.tolist()}")
        np.subtract.at(self.refs, ids, 1)
