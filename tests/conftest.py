"""Test setup: 8 host CPU devices (for real sharding), a persistent compilation cache (shared with
the subprocesses tests start), float32."""

import os
import sys

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The TPU compiler (libtpu) is only used to compile for abstract topologies: let these tests
# share it with another process using it at the same time (a plan, a demo) instead of failing
# on its lock file, as r1v2_jax.plan.topology.devices_for does for `r1v2 plan`.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.get(
    "R1V2_TEST_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
)
# Subprocesses the tests start (the CLI's demo / train / plan runs, multi-host workers) share it:
# a test that runs the same training three times compiles it once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def n_devices():
    return len(jax.devices())
