"""Which reward model a GRPO run scores rollouts with (config ``grpo.reward_model``).

``kind``: ``none`` (rule + format rewards only), ``ours`` (a reward model trained by our
``rm`` stage: the R1V2 backbone + value head, :mod:`r1v2_jax.rewards.reward_model`),
``skywork_vl`` (Skywork-VL-Reward, :mod:`r1v2_jax.rewards.vl_reward`; ``path`` the released
directory, or ``preset`` ``skywork_vl_reward_7b`` for its shapes without weights, e.g. to plan),
``remote`` (the HTTP scorer, :mod:`r1v2_jax.rewards.remote`). ``image_grid`` is the Qwen2.5-VL
patch grid ``(t, h, w)`` of each rollout's image the plan assumes (``(1, 32, 32)``: a 448×448
image, 256 image tokens). ``response``: what of a completion the model reads (``full``, or
the ``answer`` after ``</think>``); ``batch_size``: rows per scoring call (0: the whole
rollout at once; remote: items per request, default 16); ``url`` / ``timeout`` / ``retries``:
the remote scorer's. How each kind is run in training: :mod:`r1v2_jax.train.reward_scoring`.
Light: no JAX import.
"""

from __future__ import annotations

import dataclasses

RM_KINDS = ("none", "ours", "skywork_vl", "remote")
RM_PRESETS = ("", "skywork_vl_reward_7b")
RM_DTYPES = ("bfloat16", "float32")
RM_RESPONSES = ("full", "answer")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    kind: str = "none"
    path: str = ""
    preset: str = ""
    dtype: str = "bfloat16"
    image_grid: tuple[int, ...] = (1, 32, 32)
    response: str = "full"
    batch_size: int = 0
    url: str = ""
    timeout: float = 30.0
    retries: int = 3

    def __post_init__(self):
        if self.kind not in RM_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(RM_KINDS)}, got {self.kind!r}")
        if self.preset not in RM_PRESETS:
            raise ValueError(f"preset: expected one of {list(RM_PRESETS)}, got {self.preset!r}")
        if self.dtype not in RM_DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(RM_DTYPES)}, got {self.dtype!r}")
        if self.kind == "skywork_vl" and not (self.path or self.preset):
            raise ValueError("path / preset: kind 'skywork_vl' needs the released directory or a preset")
        if self.kind != "skywork_vl" and self.preset:
            raise ValueError(f"preset: {self.preset!r} is a Skywork-VL-Reward preset, but kind is {self.kind!r}")
        if self.response not in RM_RESPONSES:
            raise ValueError(f"response: expected one of {', '.join(RM_RESPONSES)}, got {self.response!r}")
        if self.batch_size < 0 or self.retries < 0 or not self.timeout > 0:
            raise ValueError(
                f"batch_size / retries / timeout: need >= 0, >= 0, > 0, got "
                f"{self.batch_size}, {self.retries}, {self.timeout}"
            )
        if self.kind == "remote" and not self.url:
            raise ValueError("url: kind 'remote' needs the reward server's http(s) url")
        g = tuple(self.image_grid)
        if len(g) != 3 or any(int(v) <= 0 for v in g) or g[1] % 2 or g[2] % 2:
            raise ValueError(f"image_grid: expected (t, h, w) > 0 with even h and w (2×2 merge), got {g}")
