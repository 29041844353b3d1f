"""The Selective Sample Buffer (SSB): informative samples kept on device and mixed back in.

As GRPO trains, more groups are all-correct or all-wrong, their advantages are zero and they
give no gradient. The SSB keeps samples with |Â| > threshold from earlier rollouts and puts
them back into training batches so each update keeps a target share of informative samples.

Everything is a pure function of a :class:`SSBState` (arrays with a leading capacity axis C,
device resident, shardable over the batch axes) and runs under jit without host transfers:

* :func:`ssb_add`: age the entries, drop the expired/over-used ones, keep new samples with
  |Â| > threshold, and evict down to C by the configured policy (``lowest_abs_adv``: keep
  the largest |Â|; ``oldest``: keep the newest). One call per training step.
* :func:`ssb_sample`: k draws, with replacement, with probability ∝ |Â|^α over live entries.
* :func:`ssb_mix`: fill a training batch so at least ``target_share`` of it has |Â| > threshold,
  replacing zero-advantage samples by buffer draws.

The payload is any pytree of arrays with a leading sample axis (tokens, masks, sampling
log-probs, prompt/image references or cached image features...): the buffer stores it as is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from r1v2_jax.parallel.sharding import DEFAULT_RULES, logical_to_pspec

EVICTIONS = ("lowest_abs_adv", "oldest")
NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SSBConfig:
    capacity: int = 256
    threshold: float = 0.0  # a sample is informative when |Â| > threshold
    alpha: float = 1.0  # sampling probability ∝ |Â|^alpha
    eviction: str = "lowest_abs_adv"
    target_share: float = 0.6  # mix: wanted share of informative samples in a batch
    reuse_limit: int = 4  # an entry is dropped after being used this many times
    max_age: int = 16  # ... or after this many add() calls (training steps)

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {self.capacity}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction: expected one of {EVICTIONS}, got {self.eviction!r}")
        if not 0 <= self.target_share <= 1:
            raise ValueError(f"target_share: must be in [0, 1], got {self.target_share}")
        if self.reuse_limit < 1 or self.max_age < 1:
            raise ValueError("reuse_limit and max_age must be >= 1")
        if self.threshold < 0 or self.alpha < 0:
            raise ValueError("threshold and alpha must be >= 0")


@flax.struct.dataclass
class SSBState:
    """The buffer. Every array has the leading capacity axis C."""

    payload: Any  # pytree of [C, ...]
    advantage: jax.Array  # f32[C]
    reward: jax.Array  # f32[C]
    age: jax.Array  # i32[C]   add() calls since the entry was stored
    uses: jax.Array  # i32[C]  times mixed into a batch
    valid: jax.Array  # bool[C]

    @property
    def capacity(self) -> int:
        return self.valid.shape[0]


def ssb_init(capacity: int, example: Any) -> SSBState:
    """An empty buffer whose payload entries look like one item of ``example`` (a pytree of
    arrays with a leading sample axis, or of ShapeDtypeStructs)."""
    payload = jax.tree.map(lambda x: jnp.zeros((capacity,) + tuple(x.shape[1:]), x.dtype), example)
    return SSBState(
        payload=payload,
        advantage=jnp.zeros((capacity,), jnp.float32),
        reward=jnp.zeros((capacity,), jnp.float32),
        age=jnp.zeros((capacity,), jnp.int32),
        uses=jnp.zeros((capacity,), jnp.int32),
        valid=jnp.zeros((capacity,), bool),
    )


def _live(state: SSBState, cfg: SSBConfig) -> jax.Array:
    return state.valid & (state.age < cfg.max_age) & (state.uses < cfg.reuse_limit)


def ssb_add(
    state: SSBState, payload: Any, advantage: jax.Array, reward: jax.Array, cfg: SSBConfig
) -> tuple[SSBState, dict[str, jax.Array]]:
    """Age the buffer by one step, then insert the informative samples of a new batch.

    payload: pytree of [N, ...]; advantage, reward: f32[N]. Entries past ``max_age`` or
    ``reuse_limit`` are dropped; when more candidates than C remain, the eviction policy
    decides (ties: existing entries before new ones, then by position).
    """
    c = state.capacity
    aged = state.replace(age=state.age + state.valid.astype(jnp.int32))
    keep_old = _live(aged, cfg)
    new_ok = jnp.abs(advantage) > cfg.threshold
    n = advantage.shape[0]
    ok = jnp.concatenate([keep_old, new_ok])
    adv = jnp.concatenate([aged.advantage, advantage.astype(jnp.float32)])
    if cfg.eviction == "lowest_abs_adv":
        score = jnp.abs(adv)
    else:  # oldest goes first: keep the smallest age (new samples have age 0)
        score = -jnp.concatenate([aged.age, jnp.zeros((n,), jnp.int32)]).astype(jnp.float32)
    # Tie-break by position (earlier = higher) so the order is deterministic.
    pos = jnp.arange(c + n, dtype=jnp.float32)
    priority = jnp.where(ok, score, NEG)
    order = jnp.lexsort((pos, -priority))[:c]  # sort by priority desc, then position asc
    take = lambda old, new: jnp.take(jnp.concatenate([old, new.astype(old.dtype)]), order, axis=0)  # noqa: E731
    valid = jnp.take(ok, order)
    new_state = SSBState(
        payload=jax.tree.map(take, aged.payload, payload),
        advantage=take(aged.advantage, advantage),
        reward=take(aged.reward, reward),
        age=take(aged.age, jnp.zeros((n,), jnp.int32)),
        uses=take(aged.uses, jnp.zeros((n,), jnp.int32)),
        valid=valid,
    )
    stored_new = (order >= c) & valid
    metrics = dict(
        ssb_added=stored_new.sum(),
        ssb_candidates=new_ok.sum(),
        ssb_dropped=(keep_old.sum() + new_ok.sum() - valid.sum()),
        **ssb_metrics(new_state),
    )
    return new_state, metrics


def sampling_weights(state: SSBState, cfg: SSBConfig) -> jax.Array:
    """Unnormalised draw weights |Â|^α over live entries (0 elsewhere)."""
    w = jnp.abs(state.advantage) ** cfg.alpha
    return jnp.where(_live(state, cfg) & (jnp.abs(state.advantage) > cfg.threshold), w, 0.0)


def ssb_sample(state: SSBState, key: jax.Array, k: int, cfg: SSBConfig) -> tuple[jax.Array, jax.Array]:
    """Draw ``k`` entries with replacement, P(i) ∝ |Â_i|^α among live entries.

    Returns (indices i32[k], found bool[]) — ``found`` is False when the buffer has no live
    entry (the indices are then meaningless). Does not count uses: :func:`ssb_mix` does.
    """
    w = sampling_weights(state, cfg)
    total = w.sum()
    logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), NEG)
    idx = jax.random.categorical(key, logits, shape=(k,))
    return idx.astype(jnp.int32), total > 0


def ssb_mix(
    state: SSBState, payload: Any, advantage: jax.Array, key: jax.Array, cfg: SSBConfig
) -> tuple[Any, jax.Array, SSBState, dict[str, jax.Array]]:
    """Replace zero-advantage samples of a batch by buffer draws until ``target_share`` of the
    batch is informative (or the buffer runs dry).

    payload: pytree of [B, ...]; advantage: f32[B]. Returns (mixed payload, mixed advantage,
    state with use counts updated, metrics). Batch samples keep their positions; replaced
    slots are the zero-advantage ones, in order.
    """
    b = advantage.shape[0]
    informative = jnp.abs(advantage) > cfg.threshold
    n_eff = informative.sum()
    want = jnp.int32(math.ceil(cfg.target_share * b - 1e-9))
    draws, found = ssb_sample(state, key, b, cfg)
    need = jnp.where(found, jnp.clip(want - n_eff, 0, b - n_eff), 0)
    # The r-th zero-advantage slot (r < need) takes the r-th draw.
    rank = jnp.cumsum(~informative) - 1
    replace = (~informative) & (rank < need)
    src = jnp.take(draws, jnp.clip(rank, 0, b - 1))
    pick = lambda batch, buf: jnp.where(  # noqa: E731
        replace.reshape((b,) + (1,) * (batch.ndim - 1)), jnp.take(buf, src, axis=0).astype(batch.dtype), batch
    )
    mixed = jax.tree.map(pick, payload, state.payload)
    mixed_adv = pick(advantage.astype(jnp.float32), state.advantage)
    uses = state.uses.at[src].add(replace.astype(jnp.int32))
    new_state = state.replace(uses=uses)
    metrics = dict(
        effective_share_before=informative.mean(dtype=jnp.float32),
        effective_share_after=(jnp.abs(mixed_adv) > cfg.threshold).mean(dtype=jnp.float32),
        ssb_replaced=replace.sum(),
        **ssb_metrics(new_state),
    )
    return mixed, mixed_adv, new_state, metrics


def ssb_metrics(state: SSBState) -> dict[str, jax.Array]:
    v = state.valid.astype(jnp.float32)
    n = jnp.maximum(v.sum(), 1.0)
    return dict(
        ssb_fill=v.mean(),
        ssb_mean_age=(state.age * v).sum() / n,
        ssb_mean_uses=(state.uses * v).sum() / n,
        ssb_max_uses=jnp.max(jnp.where(state.valid, state.uses, 0)),
        ssb_mean_abs_adv=(jnp.abs(state.advantage) * v).sum() / n,
    )


def ssb_shardings(state: SSBState, mesh, rules=None):
    """NamedShardings putting every buffer array's capacity axis on the batch mesh axes."""

    rules = rules or DEFAULT_RULES

    def one(x):
        names = ("act_batch",) + (None,) * (x.ndim - 1)
        return NamedSharding(mesh, logical_to_pspec(names, rules, x.shape, mesh))

    return jax.tree.map(one, state)
