"""Model configuration: typed, validated dataclasses and ml-collections presets.

Two faces of one thing:

* :class:`ModelConfig` (with :class:`VisionConfig` and :class:`TextConfig`) is the frozen,
  hashable, validated object the Flax modules take.
* :func:`get_preset` returns an ``ml_collections.ConfigDict`` for the named preset
  (``tiny``, ``small``, ``r1v2_38b``); experiment files under ``configs/`` embed it and may
  override single fields. :func:`ModelConfig.from_config_dict` turns it back into the typed
  object, rejecting unknown fields.

Released checkpoints are read by :mod:`r1v2_jax.convert.hf_config`, which builds a ModelConfig from
``config.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from r1v2_jax.model.attention import IMPLS, AttentionOptions

VISION_NORM_TYPES = ("rms_norm", "layer_norm")
PS_VERSIONS = ("v1", "v2")
# Named remat policies for the scanned layer body; r1v2_jax.model.layers.remat_policy maps them to
# jax.checkpoint_policies. "none" runs without remat.
REMAT_POLICIES = ("none", "full", "dots", "save_qkv_attn")
DTYPES = ("float32", "bfloat16", "float16")
# Attention over full sequences (training, scoring, ViT), see r1v2_jax.model.attention: auto (splash on
# TPU; elsewhere the reference below 4096 tokens, chunked from there) | xla (the materialised reference)
# | chunked (online softmax over KV chunks in XLA) | splash (the Pallas TPU kernel).
ATTENTION_IMPLS = IMPLS


class ConfigError(ValueError):
    """A configuration value is unknown, missing or inconsistent."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT encoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "rms_norm"
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = True
    layer_scale_init: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the pretrained position-embedding grid."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1

    def validate(self, where: str = "vision") -> None:
        for f in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "num_channels",
        ):
            _check(int(getattr(self, f)) > 0, f"{where}.{f}", f"must be a positive integer, got {getattr(self, f)!r}")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"{where}.hidden_size",
            f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )
        _check(
            self.image_size % self.patch_size == 0,
            f"{where}.image_size",
            f"{self.image_size} is not divisible by patch_size={self.patch_size}",
        )
        _check(
            self.norm_type in VISION_NORM_TYPES,
            f"{where}.norm_type",
            f"expected one of {VISION_NORM_TYPES}, got {self.norm_type!r}",
        )
        _check(self.norm_eps > 0, f"{where}.norm_eps", f"must be > 0, got {self.norm_eps}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self, where: str = "text") -> None:
        for f in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _check(int(getattr(self, f)) > 0, f"{where}.{f}", f"must be a positive integer, got {getattr(self, f)!r}")
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_heads == 0,
                f"{where}.hidden_size",
                f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
            )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"{where}.num_heads",
            f"{self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads} (GQA)",
        )
        _check(self.rope_theta > 0, f"{where}.rope_theta", f"must be > 0, got {self.rope_theta}")
        _check(self.resolved_head_dim % 2 == 0, f"{where}.head_dim", "RoPE needs an even head_dim")
        _check(
            not self.tie_word_embeddings,
            f"{where}.tie_word_embeddings",
            "R1V2's lm_head is not tied to the embedding; tied heads are not supported",
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole vision-language model plus how it is run (dtype, scan, remat)."""

    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    projector_norm_eps: float = 1e-5
    # The tile size images are cut to (InternVL's force_image_size); None: the ViT's image_size.
    # The position embedding keeps the ViT's pretrained grid and is interpolated when they differ.
    force_image_size: int | None = None
    # How the model runs (not part of the released architecture):
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; the KV-cache decode path always uses the reference
    attention_chunk_size: int = 512  # KV chunk of the chunked implementation
    attention_interpret: bool = False  # run the splash kernel in Pallas interpret mode (CPU tests)
    # Positions per LM-head chunk when the learner computes log-probs / entropies
    # (r1v2_jax.train.logprobs: no [T, V] float32 logits of a whole sequence)
    logprob_chunk_size: int = 512
    # Sequence parallelism: the decoder's residual stream between layers (what full remat keeps
    # for the backward pass) is split over ``tensor`` along the sequence; XLA all-gathers it
    # before each block's projections and reduce-scatters after (Megatron-style). Same math.
    sequence_parallel: bool = False

    def __post_init__(self):
        self.validate()

    # --- derived sizes ---------------------------------------------------------------
    @property
    def shuffle_factor(self) -> int:
        """1 / downsample_ratio (2 for R1V2)."""
        return int(round(1 / self.downsample_ratio))

    @property
    def projector_in_features(self) -> int:
        return self.vision.hidden_size * self.shuffle_factor**2

    @property
    def vision_layers_used(self) -> int:
        """How many ViT layers feed the adapter (``select_layer`` as in InternVL)."""
        n = self.vision.num_layers
        return n + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    @property
    def tile_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    def tokens_per_tile(self, image_size: int | None = None) -> int:
        """``<IMG_CONTEXT>`` tokens per tile of ``image_size`` (default: :attr:`tile_size`)."""
        grid = (image_size or self.tile_size) // self.vision.patch_size
        return (grid // self.shuffle_factor) ** 2

    def validate(self) -> None:
        _check(
            isinstance(self.vision, VisionConfig), "vision", f"expected VisionConfig, got {type(self.vision).__name__}"
        )
        _check(isinstance(self.text, TextConfig), "text", f"expected TextConfig, got {type(self.text).__name__}")
        self.vision.validate()
        self.text.validate()
        _check(
            0 <= self.image_token_id < self.text.vocab_size,
            "image_token_id",
            f"{self.image_token_id} is outside the vocabulary [0, {self.text.vocab_size})",
        )
        r = self.downsample_ratio
        _check(
            r > 0 and abs(1 / r - round(1 / r)) < 1e-9 and round(1 / r) >= 1,
            "downsample_ratio",
            f"must be 1/k for a positive integer k, got {r}",
        )
        _check(
            self.vision.grid_size % self.shuffle_factor == 0,
            "downsample_ratio",
            f"the {self.vision.grid_size}x{self.vision.grid_size} patch grid is not divisible by "
            f"1/downsample_ratio={self.shuffle_factor}",
        )
        if self.force_image_size is not None:
            _check(
                self.force_image_size > 0 and self.force_image_size % self.vision.patch_size == 0,
                "force_image_size",
                f"must be a positive multiple of patch_size={self.vision.patch_size}, got {self.force_image_size}",
            )
            _check(
                (self.force_image_size // self.vision.patch_size) % self.shuffle_factor == 0,
                "force_image_size",
                f"its patch grid must be divisible by 1/downsample_ratio={self.shuffle_factor}",
            )
        _check(self.ps_version in PS_VERSIONS, "ps_version", f"expected one of {PS_VERSIONS}, got {self.ps_version!r}")
        n = self.vision.num_layers
        _check(
            -n <= self.select_layer <= n and self.select_layer != 0,
            "select_layer",
            f"must be in [-{n}, -1] or [1, {n}] for a {n}-layer ViT, got {self.select_layer}",
        )
        _check(self.dtype in DTYPES, "dtype", f"expected one of {DTYPES}, got {self.dtype!r}")
        _check(self.param_dtype in DTYPES, "param_dtype", f"expected one of {DTYPES}, got {self.param_dtype!r}")
        _check(
            self.remat_policy in REMAT_POLICIES,
            "remat_policy",
            f"expected one of {tuple(REMAT_POLICIES)}, got {self.remat_policy!r}",
        )
        _check(
            self.attention_impl in ATTENTION_IMPLS,
            "attention_impl",
            f"expected one of {ATTENTION_IMPLS}, got {self.attention_impl!r}",
        )
        _check(
            int(self.attention_chunk_size) > 0,
            "attention_chunk_size",
            f"must be a positive integer, got {self.attention_chunk_size!r}",
        )
        _check(
            int(self.logprob_chunk_size) > 0,
            "logprob_chunk_size",
            f"must be a positive integer, got {self.logprob_chunk_size!r}",
        )

    def attention_options(self):
        """The :class:`r1v2_jax.model.attention.AttentionOptions` the towers run with."""
        return AttentionOptions(self.attention_impl, int(self.attention_chunk_size), bool(self.attention_interpret))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # --- ml-collections round trip --------------------------------------------------------
    def to_config_dict(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dataclasses.asdict(self))

    @classmethod
    def from_config_dict(cls, cd: ml_collections.ConfigDict | Mapping[str, Any]) -> "ModelConfig":
        d = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
        return cls(
            vision=_build(VisionConfig, d.pop("vision", None), "vision"),
            text=_build(TextConfig, d.pop("text", None), "text"),
            **_fields(cls, d, "model", skip=("vision", "text")),
        )


def _fields(cls, d: Mapping[str, Any], where: str, skip=()) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    return dict(d)


def _build(cls, d, where: str):
    if d is None:
        raise ConfigError(f"{where}: missing section")
    try:
        return cls(**_fields(cls, d, where))
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------


def _tiny() -> ModelConfig:
    """A few-thousand-parameter model for CPU tests: every code path, none of the size."""
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=56, patch_size=14
        ),
        text=TextConfig(
            vocab_size=256,
            hidden_size=48,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=96,
            max_position_embeddings=4096,
        ),
        image_token_id=255,
    )


def _small() -> ModelConfig:
    """~150M parameters with the real vocabulary and tile size: for benchmarks on one host."""
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, image_size=448, patch_size=14
        ),
        text=TextConfig(
            vocab_size=152064,
            hidden_size=384,
            num_layers=8,
            num_heads=6,
            num_kv_heads=2,
            intermediate_size=1024,
            max_position_embeddings=32768,
        ),
        image_token_id=151667,
    )


def _r1v2_38b() -> ModelConfig:
    """The released Skywork-R1V2-38B sizes (../shared/REFERENCE.md §1).

    ``ps_version`` and ``image_token_id`` are not confirmed by the paper: a real checkpoint's
    values come from its own config.json / tokenizer via :func:`r1v2_jax.convert.hf_config.read_config`.
    """
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=3200,
            num_layers=45,
            num_heads=25,
            intermediate_size=12800,
            image_size=448,
            patch_size=14,
            norm_type="rms_norm",
            norm_eps=1e-6,
            qkv_bias=False,
            qk_norm=True,
        ),
        text=TextConfig(
            vocab_size=152064,
            hidden_size=5120,
            num_layers=64,
            num_heads=40,
            num_kv_heads=8,
            intermediate_size=27648,
            rms_norm_eps=1e-5,
            rope_theta=1_000_000.0,
            max_position_embeddings=32768,
        ),
        image_token_id=151667,
        downsample_ratio=0.5,
        ps_version="v2",
        dtype="bfloat16",
        param_dtype="bfloat16",
        remat_policy="full",
    )


PRESETS = {"tiny": _tiny, "small": _small, "r1v2_38b": _r1v2_38b}


def _preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()


def get_preset(name: str) -> ml_collections.ConfigDict:
    """The named model preset as a ConfigDict (``tiny``, ``small`` or ``r1v2_38b``)."""
    return _preset(name).to_config_dict()


def model_config(name_or_cd: str | ml_collections.ConfigDict | ModelConfig) -> ModelConfig:
    """Resolve a preset name, a ConfigDict or a ModelConfig to a validated ModelConfig."""
    if isinstance(name_or_cd, ModelConfig):
        return name_or_cd
    if isinstance(name_or_cd, str):
        return _preset(name_or_cd)
    return ModelConfig.from_config_dict(name_or_cd)
