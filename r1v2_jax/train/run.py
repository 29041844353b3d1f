"""What every stage of a run shares (:class:`Run`), and the host-to-device batch helpers."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from r1v2_jax.data.pipeline import PipelineConfig
from r1v2_jax.data.prompt import PromptBuilder
from r1v2_jax.model.config import ModelConfig
from r1v2_jax.model.vlm import R1V2, R1V2Model, param_shardings
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.rewards.verifier import VerifierConfig, VerifierPool
from r1v2_jax.rl.ssb import SSBState, ssb_init, ssb_shardings
from r1v2_jax.sampling.engine import EngineConfig, PagedEngine
from r1v2_jax.sampling.sampler import Sampler
from r1v2_jax.train.metrics_log import MetricsLog
from r1v2_jax.train.state import TrainState, init_state

log = logging.getLogger("r1v2_jax.train")


@dataclasses.dataclass
class Run:
    """What every stage shares."""

    model_config: ModelConfig
    tokenizer: Any
    builder: PromptBuilder
    run_dir: str
    metrics: MetricsLog
    seed: int = 0
    mesh: Any = None
    # the sampler's own mesh (None: the learner's): over the same devices, e.g. data-parallel
    # replicas for decoding, which would otherwise all-gather FSDP-sharded weights every token;
    # or over devices of its own (``sampler_devices``; GRPO's rollout_ahead=1 needs that)
    sampler_mesh: Any = None
    checkpoint_every: int = 10
    checkpoint_dir: str = ""  # "" = run_dir/checkpoints; may be remote (gs://...): logs are kept there too
    keep: int = 2
    async_checkpoints: bool = True
    progress: bool = True
    progress_seconds: float = 30.0  # off a terminal: a progress line this often
    pipeline: PipelineConfig = dataclasses.field(default_factory=lambda: PipelineConfig(batch_size=8))
    # rule rewards (GRPO, MPO pair mining, evaluation) are checked in this bounded pool
    verifier: VerifierConfig = dataclasses.field(default_factory=VerifierConfig)
    _verifier_pool: VerifierPool | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def close(self) -> None:
        """End what the run started: the answer-checking pool's worker processes."""
        if self._verifier_pool is not None:
            self._verifier_pool.close()
            self._verifier_pool = None

    def verifier_pool(self) -> VerifierPool:
        """This run's answer-checking pool: started on first use (its workers warm up while the
        sampler compiles), then kept for every stage; its processes end with it."""
        if self._verifier_pool is None:
            self._verifier_pool = VerifierPool.from_config(self.verifier)
        return self._verifier_pool

    # the paged rollout engine for rollouts, MPO candidates and evaluation (None: the static
    # Sampler); it samples the same tokens for the same seed, on the sampler mesh
    engine: EngineConfig | None = None

    @property
    def module(self) -> R1V2:
        return R1V2(self.model_config)

    def sampler(self, params) -> Sampler | PagedEngine:
        """A sampler on the sampler mesh, holding ``params`` resharded for it (:func:`rollout`
        reshards the parameters it is given again: a no-op for these); the paged engine when
        ``engine`` is set."""
        model = R1V2Model(self.model_config, self.for_sampler(params), self.sampler_mesh or self.mesh)
        return Sampler(model) if self.engine is None else PagedEngine(model, self.engine)

    def for_sampler(self, params):
        """``params`` resharded for the sampler mesh (as they are, without one)."""
        if self.sampler_mesh is None:
            return params

        return jax.device_put(params, param_shardings(self.model_config, self.sampler_mesh))

    def logged(self, stage: str) -> dict | None:
        """The last logged row of ``stage`` (process 0's log decides, so every host skips the same work)."""
        return dist.allgather_json(self.metrics.find(stage))[0]

    def eos_ids(self) -> tuple[int, ...]:
        ids = [self.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return tuple(i for i in ids if i is not None)


def per_row_tiles(batch, k: int | None = None) -> np.ndarray | None:
    """Flat batch tiles + counts -> f32[B, K, 3, S, S] (K given, or padded to a power of two)."""
    n = batch["num_tiles"]
    if n.sum() == 0 and not k:
        return None
    if k is None:
        k = 1 << int(np.ceil(np.log2(max(int(n.max()), 1))))
    if int(n.max()) > k:
        raise ValueError(f"a prompt has {int(n.max())} tiles, more than the {k} this run allows")
    pix = batch["pixel_values"]
    out = np.zeros((len(n), k) + pix.shape[1:], np.float32)
    off = 0
    for i, c in enumerate(n):
        out[i, :c] = pix[off : off + c]
        off += c
    return out


def row_tiles(run: Run, batch, tiles: int | None = None) -> np.ndarray | None:
    """:func:`per_row_tiles`, with the tiles-per-row count agreed by all hosts (their arrays
    must have one shape) when it is not fixed."""
    if tiles is None and run.mesh is not None:
        most = dist.agree_max(int(batch["num_tiles"].max(initial=0)))
        tiles = 1 << int(np.ceil(np.log2(most))) if most else None
    return per_row_tiles(batch, tiles)


def device_batch(run: Run, arrays: dict, pixel_values=None) -> dict:
    """This host's rows -> device arrays (global arrays sharded by rows, with a mesh)."""
    out = dict(arrays)
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return dist.global_batch(out, run.mesh)


def init_ssb(run: Run, capacity: int, example) -> SSBState:
    """An empty SSB for ``example``'s payload layout; with a mesh, made directly with its
    capacity axis split over the batch axes (:func:`~r1v2_jax.rl.ssb.ssb_shardings`): at 38B
    a buffer of 12k-token examples with their image tiles, replicated, would cost every chip
    several GiB, and made whole on one device first, that device the whole buffer."""
    make = lambda: ssb_init(capacity, example)  # noqa: E731
    if run.mesh is None:
        return make()
    return jax.jit(make, out_shardings=ssb_shardings(jax.eval_shape(make), run.mesh))()


def init_run_state(run: Run, params, opt, ssb=None) -> TrainState:
    """A fresh TrainState; with a mesh, everything but the (already sharded) parameters, their
    optimizer moments and the SSB (:func:`init_ssb`) is replicated on it."""
    state = init_state(params, opt, run.seed, ssb=ssb)
    if run.mesh is None:
        return state

    def place(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == run.mesh:
            return x
        return dist.replicated(x, run.mesh)

    return jax.tree.map(place, state)


def synced(it):
    """Iterate a finite per-host iterator in lockstep with the other hosts: a host that runs
    out while others still have batches repeats its last batch, marked as padding."""
    last = None
    while True:
        batch = next(it, None)
        if not dist.agree_max(batch is not None):
            return
        if batch is None:
            if last is None:
                raise ValueError("data: this host received no batch at all (fewer records than hosts)")
            batch = dict(last, pad=[True] * len(last["pad"]))
        last = batch
        yield batch
