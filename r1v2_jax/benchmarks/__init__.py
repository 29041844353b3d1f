"""Published evaluation benchmarks, read as their publishers ship them, with their own prompts
and scoring (see :mod:`r1v2_jax.benchmarks.base`). Imports only ``data`` and ``rewards``."""
