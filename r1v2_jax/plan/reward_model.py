"""The reward model's scoring program in a GRPO plan: one prefill-only forward of the RM over
the whole rollout batch (``batch_size x group_size`` rows) on the sampler's mesh, compiled
ahead of time like the other programs (config ``grpo.reward_model``).

* ``skywork_vl``: Skywork-VL-Reward (:class:`r1v2_jax.rewards.vl_reward.VLRewardModel`) with
  the preset's shapes or the released directory's ``config.json``, in ``reward_model.dtype``;
  every row carries one image of ``reward_model.image_grid`` patches (run as a batch of images,
  all of one grid), and its sequence is the policy's prompt + completion with the policy's
  image tokens replaced by the RM's (``t·h·w / 4`` pads).
* ``ours``: our reward model (the policy's architecture + value head) over the policy's rows.
* ``remote`` / ``none``: nothing runs on the chips.

Memory per chip is XLA's analysis plus what stays resident while it runs (the optimizer state
and the sampler's copy of the policy). Time is a roofline at ``plan.assumed_mfu`` of analytic
FLOPs (:func:`rm_forward_flops`); XLA's own estimate is not computed for it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1v2_jax.convert.skywork_vl import read_skywork_config
from r1v2_jax.model.attention import attention_flops
from r1v2_jax.model.qwen2_5_vl import QwenVLConfig, skywork_vl_reward_7b
from r1v2_jax.parallel.sharding import tree_shardings, use_mesh_rules
from r1v2_jax.plan.flops import forward_flops
from r1v2_jax.plan.programs import compile_program, pixels, sds
from r1v2_jax.rewards.reward_model import RewardModel, abstract_reward_params
from r1v2_jax.rewards.rm_config import RewardModelConfig
from r1v2_jax.rewards.vl_reward import VLRewardModel, abstract_vl_reward_params

ROW = ("data", "fsdp")


def skywork_config(rm: RewardModelConfig) -> QwenVLConfig:
    """The planned Skywork-VL-Reward config: the preset's shapes or the directory's config.json."""
    run = dict(dtype=rm.dtype, param_dtype=rm.dtype, scan_layers=True, attention_impl="auto")
    if rm.preset == "skywork_vl_reward_7b":
        return skywork_vl_reward_7b(**run)
    return read_skywork_config(rm.path, **run).replace(lm_head=False)


def rm_forward_flops(c: QwenVLConfig, rows: int, seq: int, grid: tuple[int, int, int]) -> float:
    """Analytic forward FLOPs of Skywork-VL-Reward over ``rows`` sequences of ``seq`` tokens,
    each with one image of ``grid`` patches: the LLM (2 x matmul weights per token, no LM head,
    + attention), the ViT (2 x block weights per patch, window attention in the window blocks,
    full attention per image in the others) and the merger."""
    t, v = c.text, c.vision
    hd = t.resolved_head_dim
    text_w = t.num_layers * (
        t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd
        + t.num_heads * hd * t.hidden_size
        + 3 * t.hidden_size * t.intermediate_size
    )
    text = 2.0 * text_w * rows * seq + t.num_layers * rows * seq * 4.0 * seq * t.num_heads * hd
    n = grid[0] * grid[1] * grid[2]
    win = (v.window_size // v.patch_size) ** 2
    block_w = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size
    n_full = len(v.fullatt_block_indexes)
    attn = n_full * attention_flops(1, n, v.num_heads, v.head_dim, False, False)
    attn += (v.depth - n_full) * (n / win) * attention_flops(1, win, v.num_heads, v.head_dim, False, False)
    merger_w = (v.hidden_size * v.merge_unit) ** 2 + v.hidden_size * v.merge_unit * v.out_hidden_size
    vision = 2.0 * (v.depth * block_w + v.patch_dim * v.hidden_size) * n + attn + 2.0 * merger_w * n / v.merge_unit
    return text + rows * vision


def _specs(boxed, mesh):
    values, shard = nn.unbox(boxed), nn.unbox(tree_shardings(boxed, mesh))
    return jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), values, shard)


def reward_model_program(job, rm: RewardModelConfig, mc, mesh, rows: int, seq: int):
    """Lower the RM's scoring forward for ``rows`` rollouts of ``seq`` policy tokens. Returns
    (compiled or OutOfMemory, info: kind, rows, seq_len, image_tokens, flops, params)."""
    row = NamedSharding(mesh, P(ROW))
    if rm.kind == "skywork_vl":
        c = skywork_config(rm)
        grid = tuple(int(v) for v in rm.image_grid)
        img_tokens = grid[0] * grid[1] * grid[2] // c.vision.merge_unit
        policy_img = job.tiles * mc.tokens_per_tile()
        t = max(seq - policy_img + img_tokens, img_tokens + 1)
        params = _specs(abstract_vl_reward_params(c), mesh)
        module, grids = VLRewardModel(c), (grid,) * rows

        def fwd(p, ids, pix, pos, mask):
            with use_mesh_rules(mesh):
                return module.apply({"params": p}, ids, pix, grids, pos, mask)

        n_patch = rows * grid[0] * grid[1] * grid[2]
        args = (
            params,
            sds((rows, t), jnp.int32, row),
            sds((n_patch, c.vision.patch_dim), jnp.float32, row),
            sds((3, rows, t), jnp.int32, NamedSharding(mesh, P(None, ROW))),
            sds((rows, t), jnp.int32, row),
        )
        flops = rm_forward_flops(c, rows, t, grid)
    elif rm.kind == "ours":
        t, img_tokens = seq, job.tiles * mc.tokens_per_tile()
        rc = mc.replace(remat_policy="none")
        params = _specs(abstract_reward_params(rc), mesh)
        module = RewardModel(rc)

        def fwd(p, ids, pix, mask):
            with use_mesh_rules(mesh):
                return module.apply({"params": p}, ids, pix, mask)

        args = (params, sds((rows, t), jnp.int32, row), pixels(job, mc, rows, row) if job.tiles else None)
        args += (sds((rows, t), bool, row),)
        flops = forward_flops(mc, rows * t, t)
    else:
        raise ValueError(f"reward_model.kind: {rm.kind!r} runs nothing on the chips")
    compiled = compile_program(jax.jit(fwd).lower(*args))
    info = {"kind": rm.kind, "rows": rows, "seq_len": t, "image_tokens": img_tokens, "flops": flops}
    return compiled, info, params
