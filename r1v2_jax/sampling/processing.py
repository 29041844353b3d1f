"""What a sampler is asked for and what it returns, and how one token is drawn:
:class:`SamplingParams` (static settings), :class:`SampleOutput`, the logit processing in
transformers' order (repetition penalty, temperature, top-k, top-p) and one sampling step
that returns the token with its log-probs under the sampling distribution and under the
unmodified model. Shared by the static :mod:`~r1v2_jax.sampling.sampler` and the paged
:mod:`~r1v2_jax.sampling.engine`."""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from r1v2_jax.parallel.multihost import local_rows

NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (part of the compiled program's cache key)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@flax.struct.dataclass
class SampleOutput:
    """What :func:`generate` returns (a pytree of arrays).

    tokens:       i32[N, T + max_new]  prompt (as given, left-padded) + generated tokens
                  (``pad_id`` after a sample finished); N = B * num_samples, sample g of
                  prompt b at row b * num_samples + g.
    logprobs:     f32[N, max_new]  log-prob of each generated token under the sampling
                  distribution (0 for greedy and after finishing).
    ref_logprobs: f32[N, max_new]  log-prob under the unmodified model (log_softmax of the
                  logits at temperature 1); 0 after finishing.
    lengths:      i32[N]  generated tokens, counting the eos token.
    finished:     bool[N]  whether an eos id was produced.
    prompt_lengths: i32[N]  real (unpadded) prompt tokens.
    """

    tokens: jax.Array
    logprobs: jax.Array
    ref_logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array
    prompt_lengths: jax.Array
    # With a mesh the rows are global (sharded by rows, hosts' blocks padded to whole shards):
    # how many leading rows of this host's block are real. None: all rows are real.
    host_rows: int | None = flax.struct.field(pytree_node=False, default=None)

    def host_local(self) -> SampleOutput:
        """This host's real rows as numpy arrays (everything, on one host without a mesh)."""

        n = self.host_rows
        arrays = {
            f: local_rows(getattr(self, f))
            for f in ("tokens", "logprobs", "ref_logprobs", "lengths", "finished", "prompt_lengths")
        }
        return SampleOutput(**{k: v if n is None else v[:n] for k, v in arrays.items()})

    @property
    def completion_mask(self) -> jax.Array:
        """bool[N, max_new]: True at generated tokens (up to and including eos)."""
        return jnp.arange(self.logprobs.shape[1])[None] < self.lengths[:, None]


# --- logits processing (pure functions) ----------------------------------------------------


def process_logits(logits: jax.Array, presence: jax.Array | None, sp: SamplingParams) -> jax.Array:
    """Repetition penalty -> temperature -> top-k -> top-p, as transformers applies them.

    logits: f32[B, V]; presence: bool[B, V] (tokens seen so far) or None -> f32[B, V] with
    removed tokens at -1e30. For greedy decoding only the penalty applies.
    """
    x = logits.astype(jnp.float32)
    if sp.repetition_penalty != 1.0 and presence is not None:
        pen = jnp.where(x > 0, x / sp.repetition_penalty, x * sp.repetition_penalty)
        x = jnp.where(presence, pen, x)
    if sp.greedy:
        return x
    x = x / sp.temperature
    if sp.top_k and sp.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sp.top_k)[0][:, -1:]
        x = jnp.where(x < kth, NEG, x)
    if sp.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each token
        keep_sorted = before < sp.top_p
        keep_sorted = keep_sorted.at[:, 0].set(True)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, NEG)
    return x


def fast_argmax(x: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (first index on ties), as a max and a min reduction:
    several times faster than XLA CPU's variadic argmax reduction over a 152k vocabulary."""
    v = x.shape[-1]
    hit = x == x.max(axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(idx, v - 1)


def sample_step(
    logits: jax.Array, presence: jax.Array | None, keys: jax.Array, sp: SamplingParams
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row. logits: f32[B, V]; keys: [B] PRNG keys ->
    (tokens i32[B], sampling log-probs f32[B], model log-probs f32[B])."""
    processed = process_logits(logits, presence, sp)
    if sp.greedy:
        tokens = fast_argmax(processed)
        lp = jnp.zeros(tokens.shape, jnp.float32)
    else:  # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, processed.shape[-1:], jnp.float32))(keys)
        tokens = fast_argmax(processed + noise)
        lp = jnp.take_along_axis(jax.nn.log_softmax(processed, -1), tokens[:, None], -1)[:, 0]
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), tokens[:, None], -1)[:, 0]
    return tokens, lp, ref


# --- the sampler ------------------------------------------------------------------------------
