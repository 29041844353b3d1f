"""Stage runners (SFT, MPO, GRPO), evaluation, and checkpointed resumable loops.

Each stage owns ``run_dir/checkpoints/<stage>`` (an orbax ``CheckpointManager``: async saves
every ``checkpoint.every`` steps, keep-K) holding the whole :class:`TrainState` (parameters,
optimizer state, SSB, BCO δ, PRNG, step) plus the data iterator's state. Re-running the same
command resumes from the latest checkpoint; ``metrics.jsonl`` is cut back to that step, so
a resumed run's parameters and log equal an uninterrupted run's. A stage whose checkpoint
reached its last step is skipped (its parameters are loaded).

Several hosts: every host runs this same code on its own rows of each batch (see
:mod:`r1v2_jax.distributed`); per-row rewards and counts are all-gathered so every host sees
global metrics and takes the same decisions, process 0 writes the logs, and orbax writes
checkpoints collectively. Each host's data-iterator state is saved beside the train state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax import distributed as dist
from r1v2_jax.config import ModelConfig
from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.pipeline import PipelineConfig, rl_prompt_iterator, sequence_iterator
from r1v2_jax.data.prompt import PromptBuilder
from r1v2_jax.model import R1V2, R1V2Model
from r1v2_jax.rewards.format import FormatConfig, format_reward
from r1v2_jax.rewards.hybrid import HybridConfig, combine
from r1v2_jax.rewards.verifier import check
from r1v2_jax.rl.advantages import group_advantages, nonzero_variance_groups
from r1v2_jax.rl.losses import PolicyLossConfig
from r1v2_jax.rl.mpo import MPOConfig
from r1v2_jax.rl.ssb import SSBConfig, ssb_add, ssb_init, ssb_mix
from r1v2_jax.sampler import Sampler, SamplingParams
from r1v2_jax.train.logging import MetricsLog
from r1v2_jax.train.state import OptimConfig, TrainState, init_state, make_optimizer, step_key
from r1v2_jax.train.steps import make_train_step

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
    # the sampler's own mesh over the same devices (None: the learner's): e.g. data-parallel
    # replicas for decoding, which would otherwise all-gather FSDP-sharded weights every token
    sampler_mesh: Any = None
    checkpoint_every: int = 10
    checkpoint_dir: str = ""  # "" = run_dir/checkpoints; may be remote (gs://...): logs are kept there too
    keep: int = 2
    async_checkpoints: bool = True
    progress: bool = True
    pipeline: PipelineConfig = dataclasses.field(default_factory=lambda: PipelineConfig(batch_size=8))

    @property
    def module(self) -> R1V2:
        return R1V2(self.model_config)

    def sampler(self, params) -> Sampler:
        """A sampler on the sampler mesh, holding ``params`` resharded for it (:func:`rollout`
        reshards the parameters it is given again: a no-op for these)."""
        return Sampler(R1V2Model(self.model_config, self.for_sampler(params), self.sampler_mesh or self.mesh))

    def for_sampler(self, params):
        """``params`` resharded for the sampler mesh (as they are, without one)."""
        if self.sampler_mesh is None:
            return params
        from r1v2_jax.model import param_shardings

        return jax.device_put(params, param_shardings(self.model_config, self.sampler_mesh))

    def eos_ids(self) -> tuple[int, ...]:
        ids = [self.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return tuple(i for i in ids if i is not None)


# --- checkpoints ------------------------------------------------------------------------------

class StageCheckpoints:
    def __init__(self, run: Run, stage: str):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        root = run.checkpoint_dir or os.path.join(run.run_dir, "checkpoints")
        self.dir = root.rstrip("/") + "/" + stage if "://" in root else os.path.abspath(os.path.join(root, stage))
        opts = ocp.CheckpointManagerOptions(max_to_keep=run.keep, enable_async_checkpointing=run.async_checkpoints,
                                            create=True)
        self.manager = ocp.CheckpointManager(self.dir, options=opts)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict | None, force: bool = False) -> None:
        hosts = dist.allgather_json(data_state or {})  # each host's iterator state, in process order
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(state),
                                       data=self.ocp.args.JsonSave({"hosts": hosts}))
        self.manager.save(step, args=args, force=force)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                                if hasattr(x, "shape") else x, target)
        out = self.manager.restore(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract),
                                                                      data=self.ocp.args.JsonRestore()))
        hosts = out["data"].get("hosts", [out["data"]])
        if len(hosts) != jax.process_count():
            raise ValueError(f"{self.dir}/{step}: checkpoint written by {len(hosts)} host(s), resumed on "
                             f"{jax.process_count()}: the data iterators cannot be split differently (start a new "
                             "run_dir from these parameters instead)")
        return out["state"], hosts[jax.process_index()]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


LOG_FILES = ("metrics.jsonl", "timing.jsonl", "summary.json")


def sync_logs(run_dir: str, checkpoint_dir: str, pull: bool = False) -> None:
    """Keep a run's logs beside a separate ``checkpoint_dir`` (e.g. a bucket), so a run that
    resumes on a new machine from those checkpoints also continues its logs. ``pull`` copies
    them down when ``run_dir`` has none. Process 0 only; nothing without a ``checkpoint_dir``."""
    if not checkpoint_dir or not dist.is_main():
        return
    from etils import epath

    remote, local = epath.Path(checkpoint_dir) / "logs", epath.Path(run_dir)
    if pull and (local / "metrics.jsonl").exists():
        return
    for name in LOG_FILES:
        src, dst = (remote / name, local / name) if pull else (local / name, remote / name)
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.parent / (name + ".partial")
            tmp.write_bytes(src.read_bytes())
            tmp.rename(dst)


def _progress(run: Run, total: int, desc: str, initial: int):
    if not run.progress:
        return None
    import sys

    from tqdm import tqdm

    # A bar only on a terminal: redirected output gets the per-step metrics.jsonl instead.
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def _loop(run: Run, stage: str, state: TrainState, steps: int, data_iter, one_step, data_state_fn=None) -> TrainState:
    """The resumable loop every stage uses. ``one_step(state, batch) -> (state, metrics)``."""
    ckpt = StageCheckpoints(run, stage)
    start = 0
    latest = ckpt.latest()
    if latest is not None:
        state, data_state = ckpt.restore(latest, state)
        if data_state and data_iter is not None:
            data_iter.set_state(data_state)
        start = int(state.step)
        run.metrics.truncate(start, stage)
        log.info("%s: resumed from step %d", stage, start)
    bar = _progress(run, steps, stage, start)
    timing_path = os.path.join(run.run_dir, "timing.jsonl")
    try:
        while int(state.step) < steps:
            t0 = time.perf_counter()
            batch = next(data_iter) if data_iter is not None else None
            state, metrics = one_step(state, batch)
            step = int(state.step)
            timings = {k: metrics.pop(k) for k in list(metrics) if k.endswith("_seconds") or k.endswith("_per_s")}
            row = {"stage": stage, "step": step, **{k: v for k, v in metrics.items() if not k.startswith("_")}}
            run.metrics.write(row)
            if dist.is_main():
                with open(timing_path, "a") as f:
                    f.write(json.dumps({"stage": stage, "step": step, "seconds": time.perf_counter() - t0,
                                        **{k: float(v) for k, v in timings.items()}}) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{float(v):.3g}" for k, v in row.items()
                                 if k in ("loss", "accuracy", "reward_total")})
            if step % run.checkpoint_every == 0 or step == steps:
                ckpt.save(step, state, data_iter.get_state() if data_iter is not None else None, force=step == steps)
                sync_logs(run.run_dir, run.checkpoint_dir)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
    return state


# --- SFT ----------------------------------------------------------------------------------------

def run_sft(run: Run, params, records: list[dict], steps: int, optim: OptimConfig, n_micro: int = 1):
    opt = make_optimizer(optim, params)
    state = _init_state(run, params, opt)
    it = sequence_iterator(records, run.builder, dataclasses.replace(run.pipeline, seed=run.seed), kind="sft",
                           tile_size=run.model_config.tile_size, skips=SkipCounter())
    step_fn = make_train_step("sft", run.module, opt, n_micro=n_micro, mesh=run.mesh, trainable=optim.trainable)

    def one(state, batch):
        b = _device_batch(run, {k: batch[k] for k in ("response_ids", "response_mask", "response_loss_mask")},
                          _row_tiles(run, batch))
        state, m = step_fn(state, b, None)
        return state, {k: float(v) for k, v in m.items()} | {"skipped_samples": dist.total(it.skips.total)}

    return _loop(run, "sft", state, steps, it, one).params


def _per_row_tiles(batch, k: int | None = None) -> np.ndarray | None:
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
        out[i, :c] = pix[off:off + c]
        off += c
    return out


def _row_tiles(run: Run, batch, tiles: int | None = None) -> np.ndarray | None:
    """:func:`_per_row_tiles`, with the tiles-per-row count agreed by all hosts (their arrays
    must have one shape) when it is not fixed."""
    if tiles is None and run.mesh is not None:
        most = dist.agree_max(int(batch["num_tiles"].max(initial=0)))
        tiles = 1 << int(np.ceil(np.log2(most))) if most else None
    return _per_row_tiles(batch, tiles)


def _device_batch(run: Run, arrays: dict, pixel_values=None) -> dict:
    """This host's rows -> device arrays (global arrays sharded by rows, with a mesh)."""
    out = dict(arrays)
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return dist.global_batch(out, run.mesh)


def _init_state(run: Run, params, opt, ssb=None) -> TrainState:
    """A fresh TrainState; with a mesh, everything but the (already sharded) parameters and
    their optimizer moments is replicated on it."""
    state = init_state(params, opt, run.seed, ssb=ssb)
    if run.mesh is None:
        return state
    from jax.sharding import NamedSharding

    def place(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == run.mesh:
            return x
        return dist.replicated(x, run.mesh)

    return jax.tree.map(place, state)


def _synced(it):
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


# --- rollouts and rewards ------------------------------------------------------------------------

def rollout(run: Run, sampler: Sampler, params, batch: dict, sp: SamplingParams, group: int, key: jax.Array,
            tiles: int | None = None):
    """Sample ``group`` completions per prompt (this host's prompts); returns the sampler
    output (this host's rows, numpy) and this host's per-row tiles."""
    sampler.model.params = run.for_sampler(params)
    pix = _row_tiles(run, batch, tiles)
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    out = sampler(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pix, sp=sp,
                  num_samples=group, seed=seed)
    return out.host_local(), pix


def score_completions(run: Run, out, answers, choices, group: int, hybrid: HybridConfig, fmt: FormatConfig):
    """Rule and format rewards of this host's completions (``out``: host-local numpy rows),
    combined over all hosts' rows -> (total, rule: global f32[N]; texts: this host's; metrics
    over the global batch; this host's slice of the global rows)."""
    tokens = np.asarray(out.tokens)
    lengths = np.asarray(out.lengths)
    m = out.logprobs.shape[1]
    texts = [run.tokenizer.decode(tokens[i, tokens.shape[1] - m:tokens.shape[1] - m + lengths[i]].tolist(),
                                  skip_special_tokens=False) for i in range(len(tokens))]
    gold = [a for a in answers for _ in range(group)]
    ch = [c for c in choices for _ in range(group)]
    rule = np.asarray([check(t, g, c) for t, g, c in zip(texts, gold, ch)], np.float32)
    fr = np.asarray([format_reward(t, fmt) for t in texts], np.float32)
    both, mine = dist.gather_rows(np.stack([rule, fr], axis=1))
    total, metrics = combine(both[:, 0], both[:, 1], None, hybrid)
    return total, both[:, 0], texts, metrics, mine


def grpo_batch(out, pix, group: int) -> dict:
    """The learner's view of a rollout: full sequences, masks, sampling log-probs at each token."""
    tokens = np.asarray(out.tokens)
    n, total = tokens.shape
    m = out.logprobs.shape[1]
    p = total - m
    lengths = np.asarray(out.lengths)
    plen = np.asarray(out.prompt_lengths)
    pos = np.arange(total)[None]
    attn = (pos >= p - plen[:, None]) & (pos < p + lengths[:, None])
    comp = (pos >= p) & (pos < p + lengths[:, None])
    old = np.zeros((n, total), np.float32)
    old[:, p:] = np.asarray(out.ref_logprobs)
    b = {"tokens": tokens.astype(np.int32), "attention_mask": attn, "completion_mask": comp, "old_logp": old}
    if pix is not None:
        b["pixel_values"] = np.repeat(pix, group, axis=0)
    return b


# --- GRPO ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    micro_batches: int = 1
    advantage: str = "grpo"
    std_ddof: int = 1
    adv_eps: float = 1e-6
    use_ssb: bool = True
    dynamic_sampling: bool = False
    kl_coef: float = 0.0


def run_grpo(run: Run, params, records, steps: int, optim: OptimConfig, cfg: GRPOConfig, policy: PolicyLossConfig,
             ssb_cfg: SSBConfig, hybrid: HybridConfig = HybridConfig(), fmt: FormatConfig = FormatConfig(),
             ref_params=None):
    opt = make_optimizer(optim, params)
    # Static shapes across steps (the SSB stores whole examples): one prompt length, one tile count.
    prompt_len, tiles = grpo_shapes(run, records)
    pipe = dataclasses.replace(run.pipeline, seed=run.seed, length_buckets=(prompt_len,))
    it = rl_prompt_iterator(records, run.builder, pipe, tile_size=run.model_config.tile_size, skips=SkipCounter())
    sampler = run.sampler(params)
    sp = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        eos_ids=run.eos_ids(), pad_id=run.eos_ids()[0] if run.eos_ids() else 0)
    step_fn = make_train_step("grpo", run.module, opt, n_micro=cfg.micro_batches, policy_cfg=policy, mesh=run.mesh,
                              trainable=optim.trainable)
    add = jax.jit(lambda s, p, a, r: ssb_add(s, p, a, r, ssb_cfg))
    mix = jax.jit(lambda s, p, a, k: ssb_mix(s, p, a, k, ssb_cfg))
    ssb = ssb_init(ssb_cfg.capacity, _grpo_example(run, prompt_len, tiles, sp)) if cfg.use_ssb else None
    state = _init_state(run, params, opt, ssb=ssb)

    def one(state, batch):
        t0 = time.perf_counter()
        out, pix = rollout(run, sampler, state.params, batch, sp, cfg.group_size, step_key(state, 1), tiles)
        t_roll = time.perf_counter() - t0
        total, rule, texts, rmetrics, mine = score_completions(run, out, batch["answer"], batch["choices"],
                                                               cfg.group_size, hybrid, fmt)
        # groups never straddle hosts (a prompt's G samples are consecutive rows of its host)
        adv_all = np.asarray(group_advantages(jnp.asarray(total), cfg.group_size, mode=cfg.advantage,
                                              std_ddof=cfg.std_ddof, eps=cfg.adv_eps))
        b = grpo_batch(out, pix, cfg.group_size)
        if pix is None:
            b.pop("pixel_values", None)
        if cfg.dynamic_sampling:  # DAPO: zero-variance groups leave the batch (and its loss normaliser)
            keep = np.asarray(nonzero_variance_groups(jnp.asarray(total), cfg.group_size))[mine]
            b["completion_mask"] = b["completion_mask"] & keep[:, None]
        b["_advantages"], b["_total"] = adv_all[mine], np.asarray(total, np.float32)[mine]
        dev = _device_batch(run, b)
        adv, total_d = dev.pop("_advantages"), dev.pop("_total")
        metrics = {}
        if state.ssb is not None:
            dev_mixed, adv_mixed, ssb_state, mm = mix(state.ssb, dev, adv, step_key(state, 2))
            ssb_state, ma = add(ssb_state, dev, adv, total_d)
            metrics.update({k: float(v) for k, v in {**mm, **ma}.items()})
            dev, adv = dev_mixed, adv_mixed
            state = state.replace(ssb=ssb_state)
        else:
            metrics["effective_share_before"] = float((jnp.abs(adv) > 0).mean())
        dev["advantages"] = adv
        t1 = time.perf_counter()
        state, m = step_fn(state, dev, ref_params)
        jax.block_until_ready(state.params)
        t_upd = time.perf_counter() - t1
        lengths, _ = dist.gather_rows(np.asarray(out.lengths))
        metrics.update({k: float(v) for k, v in m.items()})
        metrics.update(rmetrics, response_length=float(lengths.mean()), rollout_seconds=t_roll,
                       update_seconds=t_upd, tokens_per_s=float(lengths.sum() / max(t_roll, 1e-9)),
                       skipped_samples=dist.total(it.skips.total))
        return state, metrics

    return _loop(run, "grpo", state, steps, it, one).params


def grpo_shapes(run: Run, records) -> tuple[int, int]:
    """(prompt length, tiles per prompt) of every GRPO batch: the smallest length bucket that
    holds max_prompt_len (a multiple of the sampler's bucket), and the most tiles a prompt can
    have with this run's tiling settings."""
    pc = run.pipeline
    fits = [b for b in pc.length_buckets if b >= run.builder.max_prompt_len]
    prompt_len = fits[0] if fits else -(-run.builder.max_prompt_len // 32) * 32
    per_image = (pc.max_tiles + (1 if pc.use_thumbnail and pc.max_tiles > 1 else 0)) if pc.dynamic_tiling else 1
    images = max((len(r["images"]) for r in records), default=0)
    return prompt_len, per_image * images


def _grpo_example(run: Run, prompt_len: int, tiles: int, sp: SamplingParams):
    """ShapeDtypeStructs of one GRPO training example (the SSB's payload layout)."""
    t = prompt_len + sp.max_new_tokens
    ex = {"tokens": jax.ShapeDtypeStruct((1, t), jnp.int32), "attention_mask": jax.ShapeDtypeStruct((1, t), bool),
          "completion_mask": jax.ShapeDtypeStruct((1, t), bool), "old_logp": jax.ShapeDtypeStruct((1, t), jnp.float32)}
    if tiles:
        s = run.model_config.tile_size
        ex["pixel_values"] = jax.ShapeDtypeStruct((1, tiles, 3, s, s), jnp.float32)
    return ex


# --- MPO ---------------------------------------------------------------------------------------------

def make_preference_records(run: Run, params, records, *, candidates: int, threshold: float, sp: SamplingParams,
                            batch_size: int, hybrid: HybridConfig = HybridConfig(), fmt: FormatConfig = FormatConfig(),
                            seed: int = 0) -> tuple[list[dict], dict]:
    """Sample candidates with the policy, score them, and pair chosen (reward >= threshold)
    with rejected (< threshold): the R1V2 MPO data recipe."""
    from r1v2_jax.rewards.calibration import Candidate, build_pairs

    sampler = run.sampler(params)
    cfg = dataclasses.replace(run.pipeline, batch_size=batch_size, num_epochs=1, seed=seed, drop_remainder=False)
    it = rl_prompt_iterator(records, run.builder, cfg, tile_size=run.model_config.tile_size)
    by_where = {r["_where"]: r for r in records}
    mine, n_prompts = [], 0
    key = jax.random.key(seed)
    for batch in _synced(it):
        key, k = jax.random.split(key)
        out, _ = rollout(run, sampler, sampler.model.params, batch, sp, candidates, k)  # already resharded
        total, rule, texts, _, rows = score_completions(run, out, batch["answer"], batch["choices"], candidates,
                                                        hybrid, fmt)
        total, rule = total[rows], rule[rows]
        groups = [[Candidate(texts[i * candidates + j], float(total[i * candidates + j]),
                             float(rule[i * candidates + j])) for j in range(candidates)]
                  for i in range(len(batch["answer"]))]
        real = [i for i, pad in enumerate(batch["pad"]) if not pad]
        for p, c, r in build_pairs([groups[i] for i in real], threshold, "absolute"):
            p = real[p]
            src = by_where[batch["where"][p]]
            mine.append({"images": src["images"], "prompt": src["question"], "chosen": groups[p][c].text,
                         "rejected": groups[p][r].text, "_root": src["_root"], "_where": src["_where"]})
        n_prompts += len(real)
    # every host trains on all pairs (the MPO iterator shards them again), in process order
    out_records = [r for host in dist.allgather_json(mine) for r in host]
    return out_records, {"prompts": int(dist.total(n_prompts)), "pairs": len(out_records)}


def run_mpo(run: Run, params, ref_params, pref_records, steps: int, optim: OptimConfig, cfg: MPOConfig,
            n_micro: int = 1):
    opt = make_optimizer(optim, params)
    state = _init_state(run, params, opt)
    it = sequence_iterator(pref_records, run.builder, dataclasses.replace(run.pipeline, seed=run.seed),
                           kind="preference", tile_size=run.model_config.tile_size, skips=SkipCounter())
    step_fn = make_train_step("mpo", run.module, opt, n_micro=n_micro, mpo_cfg=cfg, mesh=run.mesh,
                              trainable=optim.trainable)
    keys = [f"{n}_{s}" for n in ("chosen", "rejected") for s in ("ids", "mask", "loss_mask")]

    def one(state, batch):
        state, m = step_fn(state, _device_batch(run, {k: batch[k] for k in keys}, _row_tiles(run, batch)), ref_params)
        return state, {k: float(v) for k, v in m.items()}

    return _loop(run, "mpo", state, steps, it, one).params


# --- evaluation --------------------------------------------------------------------------------------

def evaluate(run: Run, params, records, *, k: int = 1, temperature: float = 0.0, max_new_tokens: int = 32,
             batch_size: int = 8, seed: int = 0) -> dict:
    """pass@1 averaged over ``k`` samples per question, overall and per category."""
    sampler = run.sampler(params)
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=run.eos_ids(),
                        pad_id=run.eos_ids()[0] if run.eos_ids() else 0)
    cfg = dataclasses.replace(run.pipeline, batch_size=batch_size, num_epochs=1, seed=seed, drop_remainder=False)
    it = rl_prompt_iterator(records, run.builder, cfg, tile_size=run.model_config.tile_size)
    mine = []  # (category, mean rule reward over the k samples) of this host's real prompts
    key = jax.random.key(seed)
    for batch in _synced(it):
        key, kk = jax.random.split(key)
        out, _ = rollout(run, sampler, sampler.model.params, batch, sp, k, kk)  # already resharded
        _, rule, _, _, rows = score_completions(run, out, batch["answer"], batch["choices"], k, HybridConfig(),
                                                FormatConfig())
        rule = rule[rows]
        mine += [(cat or "all", float(rule[i * k:(i + 1) * k].mean()))
                 for i, (cat, pad) in enumerate(zip(batch["category"], batch["pad"])) if not pad]
    per_cat: dict[str, list[float]] = {}
    for cat, v in (x for host in dist.allgather_json(mine) for x in host):
        per_cat.setdefault(cat, []).append(v)
    allv = [v for vs in per_cat.values() for v in vs]
    return {"pass@1": float(np.mean(allv)) if allv else float("nan"), "n": len(allv),
            "per_category": {c: (float(np.mean(v)), len(v)) for c, v in sorted(per_cat.items())}}
