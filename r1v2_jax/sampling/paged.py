"""Paged KV cache: a page pool per layer, page tables per decode slot, and decode attention in
XLA that reads only the pages a slot's table names.

Layout. Every layer has a key pool and a value pool ``[num_pages, page_size, Hkv, hd]``; page
``p`` means the same page in every layer's pool, so one allocator (:class:`PagePool`, on the
host) serves the whole stack. Page 0 is never handed out: it is where slots with nothing to
store write (idle slots, finished samples), and what unused table entries point at (masked,
never attended).

A slot's table row lists its pages in token order: token ``i`` of the sequence (prompt
first) lives at page ``table[i // page_size]``, offset ``i % page_size``. The compiled step
receives only the first ``n`` columns of the tables, ``n`` the bucket (a power of two) that
covers the longest live sequence for the next K steps, so attention gathers ``n`` pages per
slot, not the whole maximum length (on TPU this is where ragged paged attention goes: see
``../shared/kernels/snippet_rpa.py``).

Attention is the model's own :func:`r1v2_jax.model.attention.reference_attention` over the gathered pages
with a length mask: masked positions get exactly zero weight, so a sequence's logits equal
those of the dense cache up to the order of float additions.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.model.attention import reference_attention as attention


@flax.struct.dataclass
class PagedKV:
    """One layer's pools and this step's addressing, passed to the attention as its cache.

    k_pages, v_pages: f[P, page_size, Hkv, hd]; table: i32[S, n] (each slot's first n pages);
    write_page, write_offset: i32[S] where each slot's new token goes (page 0: nowhere);
    length: i32[S] tokens each slot attends to (including the one written now).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    table: jax.Array
    write_page: jax.Array
    write_offset: jax.Array
    length: jax.Array

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, PagedKV]:
        """q: f[S, 1, Hq, hd]; k, v: f[S, 1, Hkv, hd] (this step's token per slot) -> (attention
        output f[S, 1, Hq, hd], the cache with k, v stored)."""
        kp = self.k_pages.at[self.write_page, self.write_offset].set(k[:, 0].astype(self.k_pages.dtype))
        vp = self.v_pages.at[self.write_page, self.write_offset].set(v[:, 0].astype(self.v_pages.dtype))
        s, n = self.table.shape
        ps = kp.shape[1]
        keys = kp[self.table].reshape(s, n * ps, *kp.shape[2:]).astype(q.dtype)
        values = vp[self.table].reshape(s, n * ps, *vp.shape[2:]).astype(q.dtype)
        mask = (jnp.arange(n * ps)[None, :] < self.length[:, None])[:, None, None, None, :]
        out = attention(q, keys, values, mask)
        return out, self.replace(k_pages=kp, v_pages=vp)


def init_pools(num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype) -> list:
    """Zeroed per-layer pools [(k, v)] each [num_pages, page_size, Hkv, hd]."""
    shape = (num_pages, page_size, kv_heads, head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


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
