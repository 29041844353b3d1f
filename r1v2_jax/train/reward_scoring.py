"""Reward-model scores of rollouts, for GRPO's hybrid reward and MPO's pair mining.

:func:`make_rollout_rm` builds, from a stage's :class:`~r1v2_jax.rewards.rm_config.RewardModelConfig`,
an object whose ``score(out, pix, batch, texts, group)`` returns the score of every row of the
**global** batch (f32[N], all hosts' rows in process order, as the rule rewards are gathered),
NaN where a row could not be scored, and counters. Three kinds:

* ``ours``: the reward model the ``rm`` stage trained earlier in the same experiment
  (``stages`` must name ``rm`` before the stage that scores; a resumed run restores it from the
  ``rm`` stage's checkpoint). It reads the rollout's own tokens (prompt with its
  ``<IMG_CONTEXT>`` tokens + completion) and tiles: the policy's tokenizer and image tiling,
  as it was trained on. Runs on the learner's mesh, where its parameters were trained, rows
  sharded over the batch axes.
* ``skywork_vl``: Skywork-VL-Reward loaded from ``path`` (the released Qwen2.5-VL directory
  with ``value_head.safetensors``, :func:`~r1v2_jax.convert.skywork_vl.load_skywork_vl`),
  placed on the learner's mesh (tensor / fsdp sharded). Each row is re-rendered as Qwen2.5-VL
  sees it: the record's question and images through its chat template and image processor,
  and the completion's text (``response``: ``full`` or only the ``answer`` after
  ``</think>``), tokenised with the directory's ``tokenizer.json``. All hosts score all rows
  (the items are gathered first), so the program is the same on every host.
* ``remote``: :class:`~r1v2_jax.rewards.remote.RemoteScorer` at ``url``; each host scores its
  own groups; a group whose batch failed scores NaN (counted, then dropped by the caller).

A row whose score is NaN or infinite is never given a zero reward: GRPO drops its whole group
from the update (``rm_dropped_groups``), MPO mines no pair from its prompt. ``rm_failed``
counts such rows per call.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from r1v2_jax.convert.skywork_vl import load_skywork_vl
from r1v2_jax.data.formats import open_image, resolve_under
from r1v2_jax.data.prompt import without_eos
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.parallel.sharding import use_mesh_rules
from r1v2_jax.rewards.remote import RemoteScorer
from r1v2_jax.rewards.reward_model import RewardModel
from r1v2_jax.rewards.rm_config import RewardModelConfig
from r1v2_jax.rewards.verifier import after_thinking
from r1v2_jax.rewards.vl_reward import make_vl_scorer, score_texts, vl_reward_shardings
from r1v2_jax.train.rollout import grpo_batch
from r1v2_jax.train.run import Run, device_batch


def response_text(text: str, which: str) -> str:
    """The part of a completion the reward model reads: ``full`` (without a trailing
    end-of-turn token) or ``answer`` (what follows the last ``</think>``, as the verifier reads
    it; all of it when there is none)."""
    return after_thinking(text) if which == "answer" else without_eos(text)


@dataclasses.dataclass
class RMScores:
    """Global per-row scores (NaN: not scored) and what went wrong in this call."""

    scores: np.ndarray  # f32[N]
    failed: int = 0


def _batched(cfg: RewardModelConfig, n: int, multiple: int = 1):
    """Row ranges of ``cfg.batch_size`` rows (rounded up to a multiple of ``multiple``: the
    mesh's row shards on this host); 0: all ``n`` at once."""
    step = -(-(cfg.batch_size or n) // multiple) * multiple
    return [(i, min(i + step, n)) for i in range(0, n, step)]


class OursRM:
    """The ``rm`` stage's reward model on the learner's mesh, reading the rollout's tokens."""

    def __init__(self, run: Run, cfg: RewardModelConfig, params):
        self.run, self.cfg, self.params = run, cfg, params
        module = RewardModel(run.model_config)

        def apply(p, ids, pix, mask):
            with use_mesh_rules(run.mesh):
                return module.apply({"params": p}, ids, pix, mask)

        self._fwd = jax.jit(apply)

    def score(self, out, pix, batch, texts, group: int) -> RMScores:
        b = grpo_batch(out, pix, group)
        n_local = len(b["tokens"])
        parts = []
        # every host runs the same chunks: the local row count is the same on every host
        shards = 1 if self.run.mesh is None else dist.local_row_shards(self.run.mesh)
        for lo, hi in _batched(self.cfg, n_local, shards):
            arrays = {"ids": b["tokens"][lo:hi], "mask": b["attention_mask"][lo:hi]}
            px = None if pix is None else b["pixel_values"][lo:hi]
            dev = device_batch(self.run, arrays, px)
            s = self._fwd(self.params, dev["ids"], dev.get("pixel_values"), dev["mask"])
            parts.append(dist.local_rows(s).astype(np.float32))
        local = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
        scores, _ = dist.gather_rows(local)
        return RMScores(scores, failed=int((~np.isfinite(scores)).sum()))


def _record_images(src: dict) -> list:
    return [open_image(src, im) for im in src.get("images") or []]


class SkyworkRM:
    """Skywork-VL-Reward (converted from the released directory) on the learner's mesh."""

    def __init__(self, run: Run, cfg: RewardModelConfig, records):
        self.run, self.cfg = run, cfg
        self.by_where = {r["_where"]: r for r in records}
        tok_file = os.path.join(cfg.path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise FileNotFoundError(f"{tok_file}: Skywork-VL-Reward's tokenizer is missing (grpo.reward_model.path)")
        self.tokenizer = Tokenizer.from_file(tok_file)
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        config, params = load_skywork_vl(cfg.path, dtype=np.dtype(dtype))
        if run.mesh is not None:
            params = jax.device_put(params, vl_reward_shardings(config, run.mesh))
        else:
            params = jax.tree.map(jnp.asarray, params)
        self.config, self.params = config, params
        self.pad_id = self.tokenizer.token_to_id("<|endoftext|>") or 0
        self._score = make_vl_scorer(config, run.mesh)

    def score(self, out, pix, batch, texts, group: int) -> RMScores:
        mine = [
            {"where": batch["where"][i // group], "response": response_text(t, self.cfg.response)}
            for i, t in enumerate(texts)
        ]
        items = [x for host in dist.allgather_json(mine) for x in host]  # all hosts score all rows
        encode = lambda s: self.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
        scores = np.full((len(items),), np.nan, np.float32)
        images: dict[str, list] = {}
        for lo, hi in _batched(self.cfg, len(items)):
            chunk = []
            for x in items[lo:hi]:
                src = self.by_where[x["where"]]
                if x["where"] not in images:
                    images[x["where"]] = _record_images(src)
                chunk.append((src["question"], x["response"], images[x["where"]]))
            scores[lo:hi] = score_texts(self._score, self.params, encode, chunk, pad_id=self.pad_id)
        return RMScores(scores, failed=int((~np.isfinite(scores)).sum()))


class RemoteRM:
    """The HTTP scorer; each host sends its own groups, failures score NaN."""

    def __init__(self, run: Run, cfg: RewardModelConfig, records):
        self.run, self.cfg = run, cfg
        self.by_where = {r["_where"]: r for r in records}
        self.scorer = RemoteScorer(
            cfg.url, batch_size=cfg.batch_size or 16, timeout=cfg.timeout, retries=cfg.retries, deadline=cfg.timeout
        )

    def _images(self, src: dict) -> list[str]:
        out = []
        for im in src.get("images") or []:
            label = im.get("path") if isinstance(im, dict) else im
            out.append(resolve_under(src["_root"], label) if isinstance(label, str) else "")
        return out

    def score(self, out, pix, batch, texts, group: int) -> RMScores:
        failed_before = self.scorer.stats["items_failed"]
        groups = []
        for p in range(len(texts) // group):
            src = self.by_where[batch["where"][p]]
            groups.append(
                [
                    {
                        "prompt": src["question"],
                        "response": response_text(texts[p * group + j], self.cfg.response),
                        "images": self._images(src),
                    }
                    for j in range(group)
                ]
            )
        res = self.scorer.score_groups(groups)
        local = np.asarray([s for g in res for s in (g if g is not None else [np.nan] * group)], np.float32).reshape(-1)
        scores, _ = dist.gather_rows(local)
        failed = int(dist.total(self.scorer.stats["items_failed"] - failed_before))
        return RMScores(scores, failed=failed)


def make_rollout_rm(cfg: RewardModelConfig, run: Run, records, reward_params=None, where: str = "grpo.reward_model"):
    """The scorer ``cfg`` names (None for ``kind="none"``); ``reward_params``: the ``rm``
    stage's result (needed by ``kind="ours"``)."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "ours":
        if reward_params is None:
            raise ValueError(
                f"{where}.kind: 'ours' scores with the reward model the rm stage trains: put 'rm' in "
                "stages before this stage"
            )
        return OursRM(run, cfg, reward_params)
    if cfg.kind == "skywork_vl":
        if not cfg.path:
            raise ValueError(f"{where}.path: kind 'skywork_vl' trains with the released weights; a preset only plans")
        return SkyworkRM(run, cfg, records)
    return RemoteRM(run, cfg, records)
