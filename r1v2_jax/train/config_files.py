"""Experiment config files: Python files under ``configs/`` with ``get_config() -> ConfigDict``,
plus command-line overrides ``--config.grpo.optim.lr=1e-6``. Configs are locked after loading,
so an unknown key (a typo) is an error naming the key and what exists at that level;
:func:`load_experiment` then checks types and values against the experiment schema
(:mod:`r1v2_jax.train.schema`). Every mistake is a :class:`ConfigKeyError` or a ``ValueError``
subclass naming the file and field, raised before any device work."""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import os

import ml_collections

from r1v2_jax.train.schema import ExperimentError, from_config_dict


class ConfigKeyError(KeyError):
    def __str__(self):
        return str(self.args[0])


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"r1v2_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        if not hasattr(mod, "get_config"):
            raise ConfigFileError(f"{path}: a config file must define get_config()")
        cfg = mod.get_config()
    except ConfigFileError:
        raise
    except Exception as e:  # the config file's own code failed (e.g. set a key the schema does not have)
        raise ConfigFileError(f"{path}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigFileError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    cfg.lock()
    for ov in overrides:
        apply_override(cfg, ov, path)
    return cfg


def load_experiment(path: str, overrides: list[str] | tuple[str, ...] = ()):
    """A config file plus overrides, checked against the schema -> :class:`Experiment`."""
    return experiment_from(load_config(path, overrides), path)


def experiment_from(cfg: ml_collections.ConfigDict, source: str = "config", overrides=()):
    """``cfg`` (with ``overrides`` applied) checked against the schema -> :class:`Experiment`."""
    cfg = copy.deepcopy(cfg)
    cfg.lock()
    for ov in overrides:
        apply_override(cfg, ov, source)
    try:
        return from_config_dict(cfg)
    except ExperimentError as e:
        raise ExperimentError(f"{source}: {e}") from None


class ConfigFileError(ValueError):
    """A config file that cannot be read."""


# every mistake a config can hold (the CLI turns these into exit code 2)
CONFIG_ERRORS = (ConfigKeyError, ConfigFileError, FileNotFoundError, ValueError)


def _parse(value: str, like):
    if isinstance(like, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if isinstance(like, int) and not isinstance(like, bool):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, (tuple, list)):
        v = ast.literal_eval(value)
        return type(like)(v if isinstance(v, (tuple, list)) else (v,))
    if like is None:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def apply_override(cfg: ml_collections.ConfigDict, override: str, source: str = "config") -> None:
    """Apply ``config.a.b=value`` (or ``--config.a.b=value``) to a locked config."""
    text = override[2:] if override.startswith("--") else override
    if "=" not in text or not text.startswith("config."):
        raise ValueError(f"override {override!r}: expected --config.<key>=<value>")
    key, value = text[len("config.") :].split("=", 1)
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            here = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, here, n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else ""
            raise ConfigKeyError(f"{source}: unknown config key {key!r} (no {part!r} among {here}){hint}")
        if i < len(parts) - 1:
            node = node[part]
    try:
        node[parts[-1]] = _parse(value, node[parts[-1]])
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(f"{source}: override {key}={value!r}: {e}") from None
