"""Every module of the package imports (a name moved between modules fails here, not in a
user's run), and the light ones do not pull in JAX."""

import importlib
import pkgutil
import subprocess
import sys

import r1v2_jax


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(r1v2_jax.__path__, "r1v2_jax.")]
    assert len(names) > 40
    for name in names:
        importlib.import_module(name)


def test_verifier_worker_imports_do_not_load_jax():
    code = "import sys, r1v2_jax.rewards.verifier; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
