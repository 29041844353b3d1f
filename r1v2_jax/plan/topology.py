"""TPU topologies the planner compiles for: the chip families' published figures, slice names
(``v5p-128``, ``v5p:4x4x4``), and the abstract devices libtpu gives for them."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np
from jax.experimental import topologies

GiB = 1024**3
# family -> (HBM bytes per chip, peak bf16 FLOP/s per chip, HBM bytes/s per chip, topology dims,
# cores per chip in the slice name, ICI bytes/s per chip both ways over all links, ICI links per
# chip), from Cloud TPU's published specifications (ICI: v4 2400 Gbps over 6 links, v5p 4800
# Gbps over 6, v5e 1600 Gbps over 4, v6e 3584 Gbps over 4).
_FAMILIES = {
    "v4": (32 * GiB, 275e12, 1.2e12, 3, 2, 300e9, 6),
    "v5p": (95 * GiB, 459e12, 2.765e12, 3, 2, 600e9, 6),
    "v5e": (16 * GiB, 197e12, 0.819e12, 2, 1, 200e9, 4),
    "v6e": (32 * GiB, 918e12, 1.64e12, 2, 1, 448e9, 4),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    topology_name: str
    chips: int
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float  # bytes/s per chip, both directions, all links
    ici_links: int

    @property
    def link_one_way(self) -> float:
        """Bytes/s one ICI link carries in one direction."""
        return self.ici_bandwidth / self.ici_links / 2


def parse_topology(name: str) -> Topology:
    """``v5p-128`` (128 cores = 64 chips, 4x4x4), ``v4-32``, ``v5e-16``, ``v6e-64``, or an explicit
    ``v5p:4x4x4``."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip())
    if not m:
        raise ValueError(f"topology {name!r}: expected e.g. v5p-128, v4-32, v5e-16, v6e-64 or v5p:4x4x4")
    fam, count, dims = m.group(1), m.group(2), m.group(3)
    hbm, peak, bw, ndim, cores, ici, links = _FAMILIES[fam]
    if dims:
        shape = [int(x) for x in dims.split("x")]
        if len(shape) != ndim:
            raise ValueError(f"topology {name!r}: {fam} slices are {ndim}-D")
    else:
        chips = int(count) // cores
        if chips < 1 or chips & (chips - 1):
            raise ValueError(f"topology {name!r}: need a power-of-two chip count, got {chips}")
        shape = [1] * ndim
        i = 0
        while int(np.prod(shape)) < chips:  # grow the dims round-robin: 2x2x1, 2x2x2, 2x2x4 ...
            shape[i % ndim] *= 2
            i += 1
        if ndim == 2:
            shape = sorted(shape, reverse=True)
    topo = f"{fam}:{'x'.join(map(str, shape))}"
    return Topology(name, topo, int(np.prod(shape)), hbm, peak, bw, ici, links)


def devices_for(topology: Topology):
    """The abstract chips of ``topology`` to compile for: the same device objects for the same
    topology throughout a process (programs lowered for one plan and the next are comparable,
    so a repeated plan reuses its compiles: :func:`r1v2_jax.plan.programs.compile_program`)."""
    return _topology_devices(topology.topology_name)


@functools.lru_cache(maxsize=None)
def _topology_devices(topology_name: str):
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # only compiling: let another process (a second plan, a test) use libtpu at the same time
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices
    except Exception as e:  # noqa: BLE001 - no libtpu, or an unknown topology
        raise RuntimeError(
            f"cannot describe TPU topology {topology_name} ({e}); "
            'install the compiler with: pip install "jax[tpu]==<jax version>"'
        ) from None
