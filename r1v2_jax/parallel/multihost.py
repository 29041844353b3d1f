"""Multi-host helpers on top of JAX's multi-controller runtime (``jax.distributed``).

Every host runs the same program. The conventions the trainer follows:

* **Rows belong to hosts.** A batch's leading axis is sharded over the mesh's batch axes
  (``data`` x ``fsdp``) with the mesh's devices in process order, so host ``p`` holds one
  contiguous block of rows. Each host loads and preprocesses only its own rows
  (:func:`global_rows` turns them into one global array), and host-side work on device
  results (decoding text, rule rewards) runs on the host's own rows (:func:`local_rows`).
* **Small values are shared.** Per-row scores, skip counts, evaluation results and data
  iterator states are all-gathered (:func:`gather_rows`, :func:`allgather_json`) so every
  host takes the same decisions and process 0 logs global metrics.
* **Process 0 writes files**; checkpoints are written collectively by orbax.

With one process every helper degrades to the obvious single-host operation, and without a
mesh (``mesh=None``) arrays stay on the default device as before.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("r1v2_jax.parallel.multihost")

ROW_AXES = ("data", "fsdp")


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, auto: bool = False
) -> bool:
    """Join the job's processes (call before any other JAX call).

    ``coordinator`` ("host:port") with ``num_processes`` and ``process_id`` set everything
    explicitly (used for CPU test clusters, where collectives go through gloo); ``auto``
    lets JAX discover a Cloud TPU pod's hosts. Returns whether JAX is now multi-process."""
    if coordinator is None and not auto:
        return False
    # CPU processes need a collectives backend to run cross-process computations (harmless on TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError("distributed: --coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (on every process)."""
    if jax.process_count() == 1:
        return [obj]

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64)).reshape(-1)
    buf = np.zeros((int(sizes.max()),), np.uint8)
    buf[: data.size] = data
    allbuf = multihost_utils.process_allgather(buf).reshape(len(sizes), -1)
    return [json.loads(bytes(allbuf[i, : int(n)]).decode()) for i, n in enumerate(sizes)]


def agree_max(x: int) -> int:
    """The largest ``x`` over processes (e.g. a padded length every host must use)."""
    return int(max(allgather_json(int(x))))


def total(x: float) -> float:
    """The sum of ``x`` over processes."""
    return float(sum(allgather_json(float(x))))


def gather_rows(local: np.ndarray) -> tuple[np.ndarray, slice]:
    """Concatenate every host's rows in process order -> (global rows, this host's slice)."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local, slice(0, len(local))
    parts = allgather_json({"dtype": local.dtype.str, "shape": list(local.shape), "data": local.ravel().tolist()})
    arrays = [np.asarray(p["data"], np.dtype(p["dtype"])).reshape(p["shape"]) for p in parts]
    start = sum(len(a) for a in arrays[: jax.process_index()])
    return np.concatenate(arrays), slice(start, start + len(local))


def row_sharding(mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(ROW_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh) -> int:
    """How many ways the batch axes (``data`` x ``fsdp``) of ``mesh`` split a batch's rows."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def local_row_shards(mesh) -> int:
    """How many distinct row blocks this host's devices hold on ``mesh`` (the batch axes)."""
    n = batch_shards(mesh)
    if n % jax.process_count():
        raise ValueError(
            f"mesh: data*fsdp = {n} must be a multiple of the {jax.process_count()} processes "
            "(every host holds whole rows of the batch)"
        )
    return n // jax.process_count()


def global_rows(x, mesh) -> jax.Array:
    """This host's rows ``x`` (numpy, leading axis = rows) -> a global array sharded by rows.

    Without a mesh: ``jnp.asarray(x)``. The global array's rows are the hosts' rows in process
    order; every host must pass the same number of rows."""

    if mesh is None:
        return jnp.asarray(x)
    x = np.asarray(x)
    shards = batch_shards(mesh)
    rows = x.shape[0] * jax.process_count()
    if rows % shards:
        raise ValueError(
            f"batch: {rows} rows cannot be split evenly over the mesh's data x fsdp = {shards} "
            f"devices; make the rows per step (data.batch_size, x group_size for GRPO) a multiple "
            f"of {shards}"
        )
    if jax.process_count() == 1:
        return jax.device_put(x, row_sharding(mesh, x.ndim))
    return jax.make_array_from_process_local_data(row_sharding(mesh, x.ndim), x)


def global_batch(tree, mesh):
    return jax.tree.map(lambda x: global_rows(x, mesh), tree)


def local_rows(x) -> np.ndarray:
    """The rows of a (row-sharded or replicated) global array that this host holds, as numpy.

    Single-process or fully addressable arrays come back whole."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        out = np.asarray(x)
        if isinstance(x, jax.Array) and not x.is_fully_addressable and jax.process_count() > 1:
            n = out.shape[0] // jax.process_count()  # replicated: this host's equal share of rows
            return out[jax.process_index() * n : (jax.process_index() + 1) * n]
        return out
    blocks = {}
    for s in x.addressable_shards:
        rows = s.index[0] if s.index else slice(None)
        start = rows.start or 0
        if start not in blocks:
            blocks[start] = np.asarray(s.data)
    starts = sorted(blocks)
    if any(a + len(blocks[a]) != b for a, b in itertools.pairwise(starts)):
        raise ValueError(
            "local_rows: this host's rows are not one contiguous block (mesh devices must be in process order)"
        )
    return np.concatenate([blocks[s] for s in starts])


def replicated(tree, mesh):
    """Host values (the same on every host) -> arrays replicated over ``mesh``."""
    if mesh is None:
        return tree
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(x, rep), tree)


def gather_to_host(tree, mesh):
    """Arrays of any sharding -> numpy on every host (all-gathers; for small models only)."""
    if mesh is None or jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    rep = NamedSharding(mesh, P())
    return jax.tree.map(np.asarray, jax.jit(lambda t: t, out_shardings=rep)(tree))
