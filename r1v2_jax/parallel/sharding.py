"""Logical axis names -> device-mesh axes, in one small table.

Every parameter is declared with logical axis names (``embed``, ``heads``, ``mlp``, ...; the
scanned layer axis is ``layers``). Activations are constrained with ``act_*`` names. One rules
table maps each logical name to a mesh axis (or a tuple of them, or None = replicated) of a
mesh with axes ``data``, ``fsdp``, ``tensor``:

* ``data``   : pure data parallelism (parameters replicated),
* ``fsdp``   : data parallelism with parameters and optimizer state sharded (ZeRO-3),
* ``tensor`` : Megatron-style tensor parallelism over heads / MLP width / vocabulary.

The mesh uses ``AxisType.Auto`` axes on purpose: the model states its shardings as
constraints and lets XLA's partitioner propagate the rest.

A mesh axis may appear at most once in one PartitionSpec; the resolver refuses a rules table
that would do that. A mesh axis that does not divide a dimension is dropped for that
dimension (the tensor is replicated along it) rather than failing, so e.g. 8 KV heads still
work on a 16-way tensor axis.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# logical name -> mesh axis / axes / None.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("layers", None),  # the stacked-layer axis of scanned towers
    ("embed", "fsdp"),  # LLM hidden dimension
    ("vit_embed", "fsdp"),  # ViT hidden dimension
    ("heads", "tensor"),  # q / o projections (heads x head_dim, flattened)
    ("kv_heads", "tensor"),  # k / v projections
    ("mlp", "tensor"),  # MLP hidden width (both towers and the adapter's input)
    ("vocab", "tensor"),  # embedding rows / lm_head columns
    ("norm", None),  # norm scales, layer scales, biases of embed-sized outputs
    ("patch", None),  # patch-embedding kernel (p, p, c)
    ("positions", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_seq_shard", "tensor"),  # the residual stream's sequence axis under sequence parallelism
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``data`` x ``fsdp`` x ``tensor`` mesh with Auto axis types.

    ``-1`` for one axis takes all remaining devices.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    n = int(np.prod(shape))
    if n != len(devices):
        raise ValueError(f"make_mesh: data*fsdp*tensor = {n} but {len(devices)} devices are given")
    auto = (jax.sharding.AxisType.Auto,) * 3
    try:
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)
    except Exception as e:  # noqa: BLE001 - e.g. an 8-way axis on a 16x16 TPU torus
        if "allow_split_physical_axes" not in str(e):
            raise
        grid = mesh_utils.create_device_mesh(tuple(shape), devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def as_axes(m: MeshAxes) -> tuple[str, ...]:
    """A rule's mesh axes (None, one name or several) as a tuple of names."""
    if m is None:
        return ()
    return (m,) if isinstance(m, str) else tuple(m)


def logical_to_pspec(
    names: Sequence[str | None],
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> P:
    """Resolve logical axis names to a PartitionSpec.

    With ``shape`` and ``mesh``, mesh axes that do not divide their dimension are dropped.
    Raises if a name is not in the rules or a mesh axis would be used twice.
    """
    table = dict(rules)
    out, used = [], {}
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
        axes = as_axes(table[name])
        if shape is not None and mesh is not None:
            kept, size = [], 1
            for a in axes:
                if shape[i] % (size * mesh.shape[a]) == 0:
                    kept.append(a)
                    size *= mesh.shape[a]
            axes = tuple(kept)
        for a in axes:
            if a in used:
                raise ValueError(
                    f"mesh axis {a!r} is used twice in one spec: by logical axes "
                    f"{used[a]!r} and {name!r} (names {tuple(names)})"
                )
            used[a] = name
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def tree_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every leaf of a boxed parameter tree (e.g. from ``jax.eval_shape(init)``)."""

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_pspec(x.names, rules, x.value.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


# --- activation constraints ------------------------------------------------------------
_ctx = threading.local()


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh | None, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Iterator[None]:
    """Within this context (while tracing), :func:`constrain` emits sharding constraints."""
    prev = getattr(_ctx, "value", None)
    _ctx.value = None if mesh is None else (mesh, tuple(rules))
    try:
        yield
    finally:
        _ctx.value = prev


def current_mesh_rules() -> tuple[Mesh, tuple] | None:
    return getattr(_ctx, "value", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside :func:`use_mesh_rules`."""
    ctx = current_mesh_rules()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_pspec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
