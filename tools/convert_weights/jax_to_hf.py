#!/usr/bin/env python3
"""Command-line wrapper of r1v2_jax.convert.converters.jax_to_hf (see its docstring and --help)."""

import sys

from r1v2_jax.convert.cli import main_jax_to_hf

if __name__ == "__main__":
    sys.exit(main_jax_to_hf())
