"""A training run's configuration: :class:`TrainConfig` (a dataclass, dotted keys, YAML values), read from a YAML
file and ``key=value`` overrides by :func:`load_config`, checked key by key (:class:`ConfigError` names the key).

    cfg = load_config("experiments/configs/fashion_small.yaml", ["epochs=20", "model_kwargs.n_iter=4"])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from derive import yamlio

from .data import DataConfig, validate_config

__all__ = ["AMP_MODES", "OPERATIONAL_KEYS", "RESUME_IGNORED", "SCHEDULERS", "ConfigError", "TrainConfig",
           "add_import_argument", "colon_hint", "config_diff", "import_modules", "load_config", "plain_config",
           "read_yaml_mapping"]

AMP_MODES = ("auto", "bf16", "off")
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly")  # timm's, stepped per update (not "plateau")


class ConfigError(ValueError):
    """An invalid configuration: the message names the key."""


@dataclass
class TrainConfig:
    model: str = "derived_imixer_t4_28"  # any timm name: vmixer_*, imixer_*, limixer_*, paramixer_*, derived_*, ...
    # e.g. h_ratio, n_iter, form, lam; for derived_spec_* models spec: a network spec's YAML file (stored resolved)
    model_kwargs: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 10
    batch_size: int = 128  # per process
    opt: str = "adamw"
    lr: float | None = None  # None: lr_base * global batch / lr_base_size
    lr_base: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    # parameter names (fnmatch patterns, e.g. "blocks.*.weight_break") exempt from weight decay, on top of timm's
    # exemptions (biases and other 1-D parameters, the model's no_weight_decay())
    no_weight_decay: tuple[str, ...] = ()
    sched: str = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    drop_path: float = 0.0
    clip_grad: float | None = None
    amp: str = "auto"  # bf16 autocast: "auto" (on GPU only), "bf16" (any device; CPUs with bf16 units gain), "off"
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    out_dir: str = "runs/default"
    progress: bool = True  # tqdm bar per epoch
    checkpoint_minutes: float | None = None  # also checkpoint mid-epoch this often (a SIGKILL loses at most that)


# keys that change how a run is carried out, not what it computes: a checkpoint or finished run ignores them
OPERATIONAL_KEYS = ("out_dir", "progress", "checkpoint_minutes")
RESUME_IGNORED = (*OPERATIONAL_KEYS, "epochs")  # a checkpoint's config, compared on resume (epochs: separately)


def _coerce(value, hint, key: str):
    """``value`` checked against the field's type; YAML reads 1e-3 as a string, so numbers in strings are parsed."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key {key!r} must not be null")
    for typ in allowed:
        if typ is bool and isinstance(value, bool):
            return value
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if typ is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")


def colon_hint(key) -> str:
    """For a mapping key such as ``'n_iter:4'`` (YAML's ``{n_iter:4}``: a colon with no space after it is part of
    a plain scalar, so the pair is one key with a null value) a sentence saying so, else ``''``."""
    if not (isinstance(key, str) and ":" in key):
        return ""
    name, _, value = key.partition(":")
    return (f" (YAML reads {key!r} as one key with no value: write '{name}: {value}', with a space after the "
            "colon)")


def _merge(obj, values: dict, where: str):
    """Dataclass ``obj`` with ``values`` applied; unknown keys and wrong types raise ConfigError naming them."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    updates = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {where + str(key)!r}; valid keys: {sorted(names)}"
                              f"{colon_hint(key) if value is None else ''}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where + str(key)!r} must be a mapping, got {value!r}")
            value = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where + str(key)!r} must be a mapping, got {value!r}")
        elif not isinstance(current, tuple):
            value = _coerce(value, hints[key], f"{where}{key}")
        updates[key] = value
    try:
        return dataclasses.replace(obj, **updates)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid value in {where or 'config'}: {e}") from e


def _nest(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _deep_update(a: dict, b: dict) -> dict:
    for k, v in b.items():
        a[k] = _deep_update(dict(a.get(k) or {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a


def read_yaml_mapping(path: str, what: str) -> dict:
    """The mapping a YAML file holds; ConfigError naming ``what`` and the file if it is missing or not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} " + ("is a folder, not a YAML file" if p.is_dir() else "does not exist"))
    try:
        raw = yamlio.load_file(p) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file and ``key=value`` overrides (dotted keys, YAML values)."""
    raw = read_yaml_mapping(path, "config file") if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a config key (dotted names, e.g. "
                              "model_kwargs.n_iter)")
        try:
            value = yamlio.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value of config key {key.strip()!r} is not valid YAML: "
                              f"{e}") from e
        _deep_update(raw, _nest(key.strip(), value))
    if isinstance(raw.get("amp"), bool):  # configs written before the modes existed: true meant bf16 on GPU
        raw["amp"] = "auto" if raw["amp"] else "off"
    cfg = _merge(TrainConfig(), raw, "")
    cfg.model_kwargs = _resolve_spec(cfg.model_kwargs)
    if not (isinstance(cfg.out_dir, str) and cfg.out_dir.strip()):
        raise ConfigError(f"config key 'out_dir' must be a folder's path, got {cfg.out_dir!r}")
    cfg.out_dir = os.path.expanduser(cfg.out_dir)  # '~/runs/x' in a YAML file, which no shell expands
    for key in ("epochs", "batch_size", "lr_base_size"):
        if not (isinstance(getattr(cfg, key), int) and getattr(cfg, key) > 0):
            raise ConfigError(f"config key {key!r} must be a positive integer, got {getattr(cfg, key)!r}")
    for key in ("warmup_epochs", "cooldown_epochs"):
        if not (isinstance(getattr(cfg, key), int) and getattr(cfg, key) >= 0):
            raise ConfigError(f"config key {key!r} must be an integer >= 0, got {getattr(cfg, key)!r}")
    if not 0 <= cfg.smoothing < 1:
        raise ConfigError(f"config key 'smoothing' must be in [0, 1), got {cfg.smoothing!r}")
    if cfg.amp not in AMP_MODES:
        raise ConfigError(f"config key 'amp' must be one of {AMP_MODES}, got {cfg.amp!r}")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        raise ConfigError(f"config key 'clip_grad' must be > 0 or null, got {cfg.clip_grad!r}")
    for key in ("lr", "lr_base", "checkpoint_minutes"):
        if getattr(cfg, key) is not None and not getattr(cfg, key) > 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {getattr(cfg, key)!r}")
    if not (isinstance(cfg.no_weight_decay, (list, tuple)) and all(isinstance(p, str) for p in cfg.no_weight_decay)):
        raise ConfigError(f"config key 'no_weight_decay' must be a list of parameter-name patterns, got "
                          f"{cfg.no_weight_decay!r}")
    for key in ("weight_decay", "warmup_lr", "min_lr", "mixup", "cutmix"):
        if not getattr(cfg, key) >= 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(cfg, key)!r}")
    if not 0 <= cfg.drop_path < 1:
        raise ConfigError(f"config key 'drop_path' must be in [0, 1), got {cfg.drop_path!r}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"config key 'batch_size' must be even with mixup/cutmix (timm's Mixup pairs each "
                          f"batch with its reverse), got {cfg.batch_size}")
    if cfg.sched not in SCHEDULERS:
        raise ConfigError(f"config key 'sched' must be one of {SCHEDULERS}, got {cfg.sched!r}")
    from timm.optim import list_optimizers

    if cfg.opt.lower() not in list_optimizers():
        raise ConfigError(f"config key 'opt': {cfg.opt!r} is not one of timm's optimizers {list_optimizers()}")
    try:
        validate_config(cfg.data)
    except ValueError as e:
        raise ConfigError(f"config key 'data': {e}") from e
    return cfg


def add_import_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module first (one that registers timm models or network specs with "
                        "derive.register_spec); repeatable")


def import_modules(names: list[str]) -> None:
    """Import each module (a file's folder must be on the path: the current directory is); ConfigError naming
    it if it cannot be imported."""
    import importlib

    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        if name.endswith(".py") or os.sep in name:
            raise ConfigError(f"--import {name}: give a module's name, not a file's path (--import my_module for "
                              "my_module.py in the current folder, or a package's dotted name)")
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure of a user's module: name it, keep its message
            raise ConfigError(f"--import {name}: the module cannot be imported: {type(e).__name__}: {e}") from e


def _resolve_spec(model_kwargs: dict) -> dict:
    """``model_kwargs`` with ``spec`` (a YAML file's path, a registered name or plain data) replaced by the spec's
    plain data, so that the run folder's config alone rebuilds the model, later and elsewhere."""
    if "spec" not in model_kwargs:
        return model_kwargs
    from derive import SpecError, load_spec

    try:
        return {**model_kwargs, "spec": load_spec(model_kwargs["spec"]).to_dict()}
    except SpecError as e:
        raise ConfigError(f"config key 'model_kwargs.spec': {e}") from None


def config_diff(stored: dict, cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """``"key: old -> new"`` for each (dotted) key whose value in a saved config (a checkpoint's, a run's
    config.yaml) differs from ``cfg``'s. Keys ``cfg`` does not have after ``ignore``, and keys the saved config
    lacks (fields added since, at their defaults), are not compared; ``model_kwargs`` compares as one value."""
    def walk(old: dict, new: dict, prefix: str) -> list[str]:
        out = []
        for k, v in old.items():
            if k not in new:
                continue
            if isinstance(v, dict) and isinstance(new[k], dict) and k != "model_kwargs":
                out += walk(v, new[k], f"{prefix}{k}.")
            elif v != new[k]:
                out.append(f"{prefix}{k}: {v!r} -> {new[k]!r}")
        return out

    return walk(stored, plain_config(cfg, ignore), "")


def plain_config(cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ignore:
        d.pop(k, None)
    return json.loads(json.dumps(d))
