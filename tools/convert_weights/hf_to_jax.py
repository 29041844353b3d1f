#!/usr/bin/env python3
"""Command-line wrapper of r1v2_jax.convert.converters.hf_to_jax (see its docstring and --help)."""

import sys

from r1v2_jax.convert.cli import main_hf_to_jax

if __name__ == "__main__":
    sys.exit(main_hf_to_jax())
