"""The experiment schema: the one typed description of an experiment.

An experiment is a tree of frozen dataclasses (:class:`Experiment`). Its leaves are the pure
configs of the code that uses them — :class:`~r1v2_jax.train.state.OptimConfig`,
:class:`~r1v2_jax.rl.losses.PolicyLossConfig`, :class:`~r1v2_jax.rl.mpo.MPOConfig`,
:class:`~r1v2_jax.rl.ssb.SSBConfig`, the reward configs — so a field added to one of them is
settable from a config file and from ``--config.a.b=v`` with no copy to keep in step.

Config files (``configs/*.py``) return an ``ml_collections.ConfigDict`` made from the schema
(:func:`default_config` / :func:`to_config_dict`), locked, so a misspelt key fails where it is
set. :func:`from_config_dict` turns a ConfigDict back into an :class:`Experiment`, checking
every key (unknown keys with the closest suggestion), every type, and every value (each
dataclass's own ``__post_init__`` plus the checks here), and raising :class:`ExperimentError`
naming the field. ``r1v2 train``, ``demo``, ``plan`` and ``eval`` all load through here, before
any device work.

Stage sections (``sft``, ``rm``, ``mpo``, ``grpo``) come from the stage registry
(:data:`r1v2_jax.train.stages.STAGES`): a new stage brings its own section dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

import ml_collections

from r1v2_jax.data.image import ALPHA_MODES, DEFAULT_MAX_MEGAPIXELS
from r1v2_jax.data.synthetic import ALL_CATEGORIES
from r1v2_jax.model.config import ATTENTION_IMPLS, PRESETS, REMAT_POLICIES
from r1v2_jax.rewards.verifier import VerifierConfig
from r1v2_jax.sampling.engine import EngineConfig
from r1v2_jax.train.stages import STAGES


class ExperimentError(ValueError):
    """A mistake in an experiment config; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model a run trains. ``init``: ``random`` (a preset, or the ``tiny`` widths below)
    or a released HF directory / r1v2-jax checkpoint."""

    preset: str = "tiny"
    init: str = "random"
    # the random tiny model's widths (preset "tiny", init "random" only)
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 128
    image_size: int = 56
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 256
    vocab_size: int = 256
    image_token_id: int = 255
    # "" = the model's own (the 38B preset: full; tiny presets and checkpoints read from
    # config.json: none); full | dots | save_qkv_attn | none (r1v2_jax.model.layers.remat_policy)
    remat_policy: str = ""
    # "" = the model's own (auto: splash on TPU); auto | xla | chunked | splash (r1v2_jax.model.attention)
    attention_impl: str = ""
    # split the decoder's residual stream over tensor by sequence (ModelConfig.sequence_parallel)
    sequence_parallel: bool = False

    def __post_init__(self):
        if self.attention_impl:
            _choice("attention_impl", self.attention_impl, sorted(ATTENTION_IMPLS))
        _choice("preset", self.preset, sorted(PRESETS))
        if self.remat_policy:
            _choice("remat_policy", self.remat_policy, sorted(REMAT_POLICIES))
        for f in (
            "vision_hidden",
            "vision_layers",
            "vision_heads",
            "vision_mlp",
            "image_size",
            "text_hidden",
            "text_layers",
            "text_heads",
            "text_kv_heads",
            "text_mlp",
            "vocab_size",
        ):
            _positive(f, getattr(self, f))
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id: must be in [0, vocab_size={self.vocab_size}), got {self.image_token_id}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where the data comes from and the batch shapes. ``path`` "" = make the synthetic task
    (``synthetic_n`` examples) under ``run_dir/data``; ``batch_size`` is the global batch."""

    path: str = ""
    synthetic_n: int = 600
    synthetic_categories: tuple[str, ...] = ("color",)
    synthetic_max_difficulty: int = 1
    batch_size: int = 8
    max_prompt_len: int = 192
    max_completion_len: int = 32
    workers: int = 0
    dynamic_tiling: bool = False
    max_tiles: int = 1
    # prompt(+completion) lengths batches are padded to; () = (max_prompt_len,
    # max_prompt_len + max_completion_len)
    length_buckets: tuple[int, ...] = ()
    # images above this many megapixels are a counted skip (decompression bombs); this many
    # unusable samples in a row stop the run with the counts by reason (0 = never)
    max_image_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_consecutive_skips: int = 1000
    # SFT / preference batches packed into rows of this many tokens (several sequences a row,
    # segment ids, positions restarting per sequence); 0 = one sequence per row
    pack_length: int = 0
    pack_rows_multiple: int = 1
    # images with transparency: "drop" the alpha channel (PIL convert("RGB"), as the released
    # pipeline does) or composite onto "white"
    alpha: str = "drop"

    def __post_init__(self):
        _choice("alpha", self.alpha, ALPHA_MODES)
        if self.pack_length < 0 or self.pack_rows_multiple < 1:
            raise ValueError(
                f"pack_length / pack_rows_multiple: need >= 0 and >= 1, got {self.pack_length}, "
                f"{self.pack_rows_multiple}"
            )
        if not (math.isfinite(self.max_image_megapixels) and self.max_image_megapixels > 0):
            raise ValueError(f"max_image_megapixels: must be > 0, got {self.max_image_megapixels}")
        if self.max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips: must be >= 0 (0 = never stop), got {self.max_consecutive_skips}")
        if any(b < 1 for b in self.length_buckets) or list(self.length_buckets) != sorted(set(self.length_buckets)):
            raise ValueError(f"length_buckets: increasing positive lengths, got {self.length_buckets}")
        for f in ("batch_size", "max_prompt_len", "max_completion_len", "max_tiles"):
            _positive(f, getattr(self, f))
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if not self.path and self.synthetic_n < 1:
            raise ValueError("synthetic_n: must be >= 1 when path is empty (the synthetic task is made)")
        for c in self.synthetic_categories:
            _choice("synthetic_categories", c, sorted(ALL_CATEGORIES))
        if not 1 <= self.synthetic_max_difficulty <= 3:
            raise ValueError(f"synthetic_max_difficulty: must be 1, 2 or 3, got {self.synthetic_max_difficulty}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation after each stage: pass@1 averaged over ``k`` samples per question
    (``prompts`` 0 = the whole test split)."""

    k: int = 1
    prompts: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 32

    def __post_init__(self):
        _positive("k", self.k)
        _positive("max_new_tokens", self.max_new_tokens)
        if self.prompts < 0:
            raise ValueError(f"prompts: must be >= 0 (0 = all), got {self.prompts}")
        _sampling_values(self.temperature, self.top_p)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Per-stage checkpoints every ``every`` steps, the newest ``keep`` kept. ``dir`` "" =
    ``run_dir/checkpoints``; a bucket (``gs://...``) for pods: the logs are mirrored there."""

    every: int = 10
    keep: int = 2
    async_save: bool = True
    dir: str = ""

    def __post_init__(self):
        _positive("every", self.every)
        _positive("keep", self.keep)


# completion-length distributions the planner's paged-engine estimate can assume (r1v2_jax.plan.engine)
COMPLETION_DISTS = ("exponential", "uniform", "max")


@dataclasses.dataclass(frozen=True)
class PlanSection:
    """``r1v2 plan``: the meshes (() = the run's ``mesh`` / ``sampler_mesh``; the learner's
    default (1, -1, 1)), remat policy ("" = model.remat_policy, else full) and tiles per prompt
    to compile for, the efficiencies its roofline step time assumes, and whether to also compile
    the few-layer variants behind XLA's own step-time estimate (see :mod:`r1v2_jax.plan.planner`)."""

    mesh: tuple[int, ...] = ()
    sampler_mesh: tuple[int, ...] = ()
    remat_policy: str = ""
    tiles_per_sample: int = 1
    assumed_mfu: float = 0.4
    assumed_bandwidth_util: float = 0.7
    xla_estimate: bool = True
    # the share of peak FLOP/s assumed for the Pallas attention kernels (XLA's estimate leaves them out)
    kernel_efficiency: float = 0.5
    # the paged engine's rollout (r1v2_jax.plan.engine): completion lengths assumed, the
    # sampler meshes' tensor widths searched, the latency of one tensor-parallel all-reduce
    completion_dist: str = "exponential"
    completion_mean_fraction: float = 0.5
    engine_tensor: tuple[int, ...] = (4, 8, 16)
    collective_latency_s: float = 1e-5
    # grpo.rollout_ahead=1: bytes/s the learner -> sampler weight push is assumed to move at,
    # all of it through one chip's link; 0: one ICI link one way of the topology's chips
    # (r1v2_jax.plan.topology; v5p: 4,800 Gbit/s per chip over 6 links: 50 GB/s one way)
    weight_push_bandwidth: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.weight_push_bandwidth) and self.weight_push_bandwidth >= 0):
            raise ValueError(
                f"weight_push_bandwidth: must be >= 0 bytes/s (0: the topology's link), got {self.weight_push_bandwidth}"
            )
        _mesh_shape("mesh", self.mesh)
        _mesh_shape("sampler_mesh", self.sampler_mesh)
        if self.tiles_per_sample < 0:
            raise ValueError(f"tiles_per_sample: must be >= 0, got {self.tiles_per_sample}")
        for f in ("assumed_mfu", "assumed_bandwidth_util", "kernel_efficiency", "completion_mean_fraction"):
            v = getattr(self, f)
            if not (math.isfinite(v) and 0 < v <= 1):
                raise ValueError(f"{f}: must be in (0, 1], got {v}")
        _choice("completion_dist", self.completion_dist, COMPLETION_DISTS)
        if not self.engine_tensor or any(t < 1 for t in self.engine_tensor):
            raise ValueError(f"engine_tensor: tensor widths >= 1 to search, got {self.engine_tensor}")
        if not (math.isfinite(self.collective_latency_s) and self.collective_latency_s >= 0):
            raise ValueError(f"collective_latency_s: must be >= 0, got {self.collective_latency_s}")


@dataclasses.dataclass(frozen=True)
class RolloutEngineSection(EngineConfig):
    """The paged rollout engine (:class:`~r1v2_jax.sampling.engine.EngineConfig`'s fields) for
    GRPO rollouts, MPO candidates and evaluation when ``enabled``: the same samples as the
    static sampler; on the sampler mesh (or the learner's)."""

    enabled: bool = False

    def engine(self) -> EngineConfig | None:
        if not self.enabled:
            return None
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})


def _base_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    return [
        ("run_dir", str, dataclasses.field(default="runs/demo")),
        ("seed", int, dataclasses.field(default=0)),
        ("stages", tuple[str, ...], dataclasses.field(default=("sft", "mpo", "grpo"))),
        ("model", ModelSection, dataclasses.field(default_factory=ModelSection)),
        ("data", DataSection, dataclasses.field(default_factory=DataSection)),
        *[(name, s.section, dataclasses.field(default_factory=s.section)) for name, s in STAGES.items()],
        ("eval", EvalSection, dataclasses.field(default_factory=EvalSection)),
        # rule-reward answer checking in GRPO, pair mining and evaluation: seconds one answer may
        # take (it scores 0 past that) and worker processes
        ("verifier", VerifierConfig, dataclasses.field(default_factory=VerifierConfig)),
        ("checkpoint", CheckpointSection, dataclasses.field(default_factory=CheckpointSection)),
        # (data, fsdp, tensor) for training on several devices/hosts; () = one device. Several
        # processes without a mesh use (1, -1, 1): FSDP over every device.
        ("mesh", tuple[int, ...], dataclasses.field(default=())),
        # (data, fsdp, tensor) for the sampler (rollouts, MPO candidates, evaluation) over the same
        # devices (over its own with sampler_devices); () = the learner's mesh. Parameters are
        # resharded onto it before each rollout.
        ("sampler_mesh", tuple[int, ...], dataclasses.field(default=())),
        # > 0: the sampler gets the last this many devices, the learner the others (disjoint
        # meshes: ``mesh`` over the learner's, default (1, -1, 1); ``sampler_mesh`` over the
        # sampler's, default (-1, 1, 1)); needed by grpo.rollout_ahead=1. 0: both over all devices
        ("sampler_devices", int, dataclasses.field(default=0)),
        ("rollout_engine", RolloutEngineSection, dataclasses.field(default_factory=RolloutEngineSection)),
        ("plan", PlanSection, dataclasses.field(default_factory=PlanSection)),
        ("export", bool, dataclasses.field(default=True)),
        # a progress bar on a terminal; elsewhere (CI logs, nohup, a pod's log stream) a line
        # every ``progress_seconds`` (stage, step, a few metrics, ETA)
        ("progress", bool, dataclasses.field(default=True)),
        ("progress_seconds", float, dataclasses.field(default=30.0)),
    ]


def _check_experiment(self) -> None:
    for s in self.stages:
        if s not in STAGES:
            close = difflib.get_close_matches(s, list(STAGES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"stages: unknown stage {s!r} (known: {', '.join(STAGES)}){hint}")
    for i, s in enumerate(self.stages):  # a reward model of kind "ours" is the rm stage's, trained before
        section = getattr(self, s)
        pairs = getattr(section, "pairs", None)
        for where, rm in (
            ("reward_model", getattr(section, "reward_model", None)),
            ("pairs.reward_model", getattr(pairs, "reward_model", None)),
        ):
            if rm is not None and rm.kind == "ours" and "rm" not in self.stages[:i]:
                raise ValueError(
                    f"{s}.{where}.kind: 'ours' scores with the reward model the rm stage trains; "
                    f"stages {list(self.stages)} has no 'rm' before {s!r}"
                )
    _mesh_shape("mesh", self.mesh)
    _mesh_shape("sampler_mesh", self.sampler_mesh)
    if self.sampler_devices < 0:
        raise ValueError(f"sampler_devices: must be >= 0 (0 = the learner's devices), got {self.sampler_devices}")
    if self.sampler_mesh and not self.mesh and not self.sampler_devices:
        raise ValueError("sampler_mesh: set mesh too (the learner's mesh over the same devices)")
    if not self.run_dir:
        raise ValueError("run_dir: must not be empty")
    if not (math.isfinite(self.progress_seconds) and self.progress_seconds > 0):
        raise ValueError(f"progress_seconds: must be > 0, got {self.progress_seconds}")


Experiment = dataclasses.make_dataclass(
    "Experiment",
    _base_fields(),
    frozen=True,
    namespace={
        "__post_init__": _check_experiment,
        "__doc__": "One experiment: run folder, seed, the stages to run in order and each stage's section, "
        "model, data, evaluation, checkpoints, meshes, planning.",
        "__module__": __name__,
    },
)


# --- ConfigDict <-> dataclasses --------------------------------------------------------------


def to_config_dict(x) -> ml_collections.ConfigDict:
    """A dataclass tree as a ConfigDict (nested dataclasses as nested ConfigDicts)."""
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(x):
        v = getattr(x, f.name)
        out[f.name] = to_config_dict(v) if dataclasses.is_dataclass(v) else v
    return out


def default_config() -> ml_collections.ConfigDict:
    """The schema's defaults (the CPU demo) as a ConfigDict, for config files to edit."""
    return to_config_dict(Experiment())


def from_config_dict(cd, cls=None, where: str = "") -> Any:
    """Build ``cls`` (default :class:`Experiment`) from a ConfigDict / dict, checking keys,
    types and values; :class:`ExperimentError` names the field of any mistake."""
    cls = cls or Experiment
    if dataclasses.is_dataclass(cd):
        cd = to_config_dict(cd)
    items = dict(cd.items()) if hasattr(cd, "items") else None
    if items is None:
        raise ExperimentError(f"{where or 'config'}: expected a section (a ConfigDict), got {cd!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in items:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {_join(where, close[0])!r}?" if close else ""
            raise ExperimentError(f"{_join(where, k)}: unknown config key (known here: {', '.join(names)}){hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in items:
            continue
        path, tp, v = _join(where, f.name), hints[f.name], items[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_config_dict(v, tp, path)
        else:
            kwargs[f.name] = _coerce(v, tp, path)
    try:
        return cls(**kwargs)
    except ExperimentError:
        raise
    except (ValueError, TypeError) as e:
        raise ExperimentError(f"{where + ': ' if where else ''}{e}") from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(v, tp, path: str):
    """``v`` as type ``tp`` (int/float/str/bool, tuples, ``X | None``), or ExperimentError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(v, inner[0], path) if len(inner) == 1 else v
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            raise ExperimentError(f"{path}: expected a tuple, got {type(v).__name__} {v!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(x, elem, f"{path}[{i}]") for i, x in enumerate(v))
    if tp is Any:
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ExperimentError(f"{path}: expected true/false, got {type(v).__name__} {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ExperimentError(f"{path}: expected an integer, got {type(v).__name__} {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ExperimentError(f"{path}: expected a number, got {type(v).__name__} {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ExperimentError(f"{path}: expected a string, got {type(v).__name__} {v!r}")
        return v
    return v


# --- shared value checks --------------------------------------------------------------------------


def _positive(name: str, v) -> None:
    if not v > 0:
        raise ValueError(f"{name}: must be > 0, got {v}")


def _choice(name: str, v, options) -> None:
    if v not in options:
        close = difflib.get_close_matches(str(v), [str(o) for o in options], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name}: expected one of {', '.join(map(str, options))}, got {v!r}{hint}")


def _sampling_values(temperature: float, top_p: float) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


def _mesh_shape(name: str, shape: tuple[int, ...]) -> None:
    if not shape:
        return
    if len(shape) != 3:
        raise ValueError(f"{name}: expected (data, fsdp, tensor), got {tuple(shape)} ({len(shape)} axes)")
    if sum(1 for s in shape if s == -1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{name}: each axis is a positive size, at most one -1 (the rest), got {tuple(shape)}")


def mesh_for(exp, name: str, n_devices: int) -> tuple[int, int, int] | None:
    """The mesh shape ``exp.<name>`` asks for, resolved over ``n_devices`` (-1 filled in);
    None for (); ExperimentError when it does not divide the devices."""
    shape = tuple(getattr(exp, name))
    if not shape:
        return None
    known = math.prod(s for s in shape if s != -1)
    if n_devices % known:
        raise ExperimentError(f"{name}: {shape} does not divide the {n_devices} devices")
    rest = n_devices // known
    full = tuple(rest if s == -1 else s for s in shape)
    if math.prod(full) != n_devices:
        raise ExperimentError(f"{name}: {shape} covers {math.prod(full)} devices, there are {n_devices}")
    return full
