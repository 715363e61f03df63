"""Train an image classifier: any registered model, derived or hand-written, on one process or many.

    python -m experiments.train --config experiments/configs/fashion_small.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 -m experiments.train --config ... [key=value ...]

Overrides are dotted config keys (``epochs=20 data.name=cifar10 model_kwargs.h_ratio=2``), values parsed as
YAML. Everything is timm's building blocks: ``create_optimizer_v2`` (AdamW), ``create_scheduler_v2`` (cosine
with warm-up, cooldown and a lower bound, stepped every update), ``Mixup`` (mixup/cutmix with label
smoothing), RandAugment and random erasing (``experiments.data``), stochastic depth (``drop_path``). The
learning rate is ``lr_base * global_batch / lr_base_size`` unless ``lr`` is given (iMixer paper, Table 5).

Nothing is lost: a checkpoint is written atomically (temporary file, fsync, then rename) after every epoch, on
SIGTERM/SIGINT (at the next step boundary) and, with ``checkpoint_minutes``, mid-epoch that often (so a SIGKILL
loses at most that much training), holding model, optimizer, scheduler, grad scaler, RNG states,
epoch and step; ``--resume`` continues from it and ends where an uninterrupted run would. With several
processes, a signal to any one of them (or a non-finite loss on any one) stops all of them at the same step, and
the checkpoint holds every process's RNG state. A checkpoint resumes only the run it came from (same config,
number of processes and LR schedule; a different ``epochs`` is refused rather than silently keeping the old
schedule). Checkpoints are read with ``torch.load(weights_only=True)``. Outputs in ``out_dir``: ``checkpoint.pt``,
``metrics.jsonl``, ``metrics.csv``, ``tb/`` (TensorBoard), ``summary.json`` (with `environment`: versions,
hardware, git commit), ``config.yaml``. A fresh start
refuses an ``out_dir`` that holds a previous run's checkpoint or summary; ``--overwrite`` deletes them first.
One process at a time trains into an ``out_dir``: the run holds ``out_dir/.lock`` (flock, POSIX).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import fcntl
import fnmatch
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from .analysis import symmetry_scalars
from .data import (
    CorruptDatasetError,
    DataConfig,
    DatasetNotFoundError,
    build_datasets,
    build_loaders,
    dataset_info,
    split_size,
    validate_config,
)

__all__ = ["CheckpointError", "ConfigError", "RunBusyError", "RunWriteError", "TrainConfig", "atomic_write",
           "check_model", "check_run", "config_diff", "cpu_name", "environment", "hold_out_dir", "import_modules",
           "load_config", "main", "read_jsonl", "train"]


AMP_MODES = ("auto", "bf16", "off")
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly")  # timm's, stepped per update (not "plateau")


class ConfigError(ValueError):
    """An invalid configuration: the message names the key."""


class RunBusyError(ConfigError):
    """Another process is training into the same out_dir (it holds out_dir/.lock)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not continue this run: the message names the file."""


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


# ---------------------------------------------------------------------------------------------- config
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


def _merge(obj, values: dict, where: str):
    """Dataclass ``obj`` with ``values`` applied; unknown keys and wrong types raise ConfigError naming them."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    updates = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {where}{key!r}; valid keys: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key!r} must be a mapping, got {value!r}")
            value = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key!r} must be a mapping, got {value!r}")
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
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
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
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value of config key {key.strip()!r} is not valid YAML: "
                              f"{e}") from e
        _deep_update(raw, _nest(key.strip(), value))
    if isinstance(raw.get("amp"), bool):  # configs written before the modes existed: true meant bf16 on GPU
        raw["amp"] = "auto" if raw["amp"] else "off"
    cfg = _merge(TrainConfig(), raw, "")
    cfg.model_kwargs = _resolve_spec(cfg.model_kwargs)
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


def check_model(cfg: TrainConfig) -> None:
    """Build the config's model on the meta device (no memory, no data): a wrong name or ``model_kwargs`` raises
    ConfigError now rather than hours into a sweep."""
    info = dataset_info(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg, info.num_classes or 10, info.in_chans, info.img_size)
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in cfg.no_weight_decay if not any(fnmatch.fnmatch(n, p) for n in names)]
    if unmatched:
        raise ConfigError(f"config key 'no_weight_decay': {unmatched} match no parameter of {cfg.model!r} (names "
                          f"such as {names[:3]})")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """timm's weight-decay groups (``param_groups_weight_decay``: no decay for biases, 1-D parameters and the
    model's ``no_weight_decay()``) with ``cfg.no_weight_decay``'s patterns exempt too."""
    from timm.optim import param_groups_weight_decay

    exempt = set(getattr(model, "no_weight_decay", lambda: ())()) | set(cfg.no_weight_decay)
    return param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=exempt)


# ---------------------------------------------------------------------------------------------- state
def _rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002 -- the global stream is what timm's Mixup draws from
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


class RunWriteError(OSError):
    """A run's file could not be written: the message names the file and says why; the previous version of the
    file is intact and no temporary file is left."""


_WHY = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space is left on the device",
        errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "the file-size limit (ulimit -f) was reached",
        errno.EACCES: "permission denied", errno.EPERM: "the operation is not permitted (an immutable or read-only "
                                                         "file or folder?)"}


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` fills a temporary file in the same folder, which is flushed to disk and renamed over ``path``:
    a reader (or a crash at any point) sees the old file or the new one, never half of one. A failure to write is a
    ``RunWriteError`` naming ``path`` and the reason (read-only, no space, file-size limit, ...)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, RunWriteError):
            why = _WHY.get(e.errno, e.strerror or str(e))
            kept = "its previous version is intact" if path.exists() else "nothing was written"
            raise RunWriteError(e.errno, f"cannot write {str(path)!r}: {why}; {kept}") from e
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old checkpoint. The
    checkpoint is serialised in memory first, so that a failing write is Python's (with its errno: read-only, no
    space, file-size limit) rather than torch's."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "best", "rng", "wall_s", "config")


def load_checkpoint(path: Path) -> dict:
    """Read with weights_only=True (no arbitrary pickle); a clear error names a corrupt file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (corrupt or not a checkpoint): {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a training checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}: not written by experiments.train")
    wrong = [k for k in ("model", "optimizer", "scheduler", "scaler", "rng", "config") if not isinstance(ckpt[k], dict)]
    if wrong:
        raise CheckpointError(f"checkpoint {str(path)!r}: {wrong} are not mappings: not written by experiments.train")
    return ckpt


# ---------------------------------------------------------------------------------------------- pieces
def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    import timm

    import derive  # noqa: F401 -- registers derived_* models
    import mixers  # noqa: F401 -- registers vmixer_*, imixer_*, limixer_*, paramixer_*

    if not timm.is_model(cfg.model):
        raise ConfigError(f"config key 'model': unknown model {cfg.model!r}")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **cfg.model_kwargs)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    try:
        return timm.create_model(cfg.model, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'model_kwargs' does not fit {cfg.model!r}: {e}") from e


class _Stop:
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@torch.no_grad()
def evaluate(model, loader, device, autocast) -> dict:
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[1] += (top[:, 0] == y).sum()
        sums[2] += (top == y[:, None]).any(1).sum()
        sums[3] += y.numel()
    if dist.is_initialized():
        dist.all_reduce(sums)
    n = sums[3].item()
    return {"test_loss": sums[0].item() / n, "test_top1": 100 * sums[1].item() / n,
            "test_top5": 100 * sums[2].item() / n}


# ---------------------------------------------------------------------------------------------- training
_HELD: dict[Path, int] = {}  # out_dirs whose lock this process holds -> nesting depth


@contextlib.contextmanager
def hold_out_dir(out: Path):
    """Yield True while this process holds ``out``'s exclusive lock (flock on out/.lock, released when the block
    ends or the process dies), False if another process holds it. Re-entrant within a process, so a sweep that
    holds a run's lock can call :func:`train` on it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield True
        finally:
            _HELD[key] -= 1
        return
    with open(out / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        _HELD[key] = 1
        _LOCK_FDS.add(f.fileno())
        try:
            yield True
        finally:
            _LOCK_FDS.discard(f.fileno())
            del _HELD[key]
            fcntl.flock(f, fcntl.LOCK_UN)


# An flock belongs to the open file, which a forked process (a DataLoader worker) shares: a worker orphaned by a
# kill -9 would hold the run's lock until it noticed, refusing an immediate --resume. Forked children close their
# copies at once (closing, not unlocking: the lock stays the parent's and goes when the parent dies).
_LOCK_FDS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in list(_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def check_run(cfg: TrainConfig) -> None:
    """What can be checked before a run's folder is made: the model and ``model_kwargs`` (``check_model``), the
    device, and the batch size against the training images; ConfigError naming the key."""
    check_model(cfg)
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"config key 'device': {cfg.device!r} is not a device (auto, cpu, cuda, cuda:N, mps)"
                              ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"config key 'device': {cfg.device!r}, but this machine has no CUDA GPU (use auto or "
                              "cpu)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device': {cfg.device!r}, but this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"config key 'device': {cfg.device!r} is not supported here (auto, cpu, cuda, mps)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"config key 'device': {cfg.device!r}, but MPS is not available here")
    images = cfg.data.train_subset or split_size(cfg.data, "train")
    if images is not None and cfg.batch_size > images:
        raise ConfigError(f"config key 'batch_size': {cfg.batch_size} exceeds the {images} training images "
                          f"({'data.train_subset' if cfg.data.train_subset else 'the split'}): no batch would be full")


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or continue) a training run; returns the summary (also written to out_dir/summary.json).

    The main process holds ``out_dir``'s lock for the whole run: a second process training into the same folder
    is refused (:class:`RunBusyError`), and temporary files that a killed writer left there are deleted. A fresh
    start refuses an ``out_dir`` that holds another run's checkpoint or summary, unless ``overwrite`` (which deletes
    that run's outputs). A signal that arrives after the last training step (during the last evaluation) is
    delivered again once the summary is written, so a sweep stops instead of starting a new run."""
    check_run(cfg)  # a wrong model, device or batch size fails now, before any data is read or folder made
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the main process holds the lock for all
        return _train(cfg, resume, overwrite)
    out = Path(cfg.out_dir)
    created = not out.exists()
    try:
        with hold_out_dir(out) as mine:
            if not mine:
                raise RunBusyError(f"config key 'out_dir': {str(out)!r} is in use by another training process (it "
                                   f"holds {str(out / '.lock')!r}); wait for it to end or choose another out_dir")
            for orphan in out.glob("*.tmp[0-9]*"):  # left by a writer killed mid-write: nobody else writes here now
                orphan.unlink()
            return _train(cfg, resume, overwrite)
    except BaseException:
        # a run that failed before writing anything leaves no folder of its own behind (only its lock was there)
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, resume: bool, overwrite: bool) -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main_proc = rank == 0
    if cfg.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    if use_amp and device.type == "cpu" and main_proc and not cpu_has_bf16_kernels():
        warnings.warn(f"config key 'amp' is 'bf16', but this CPU ({cpu_name()}, "
                      f"{torch.backends.cpu.get_cpu_capability()}) has no oneDNN bf16 kernels: bf16 autocast runs "
                      "several times slower than float32 here (docs/benchmarks.md); amp=off trains faster",
                      RuntimeWarning, stacklevel=2)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode needs it
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if resume and ckpt is None and main_proc:
        print(f"no checkpoint at {ckpt_path}: starting from scratch", file=sys.stderr)
    if ckpt is not None and (diff := config_diff(ckpt["config"], cfg, ignore=RESUME_IGNORED)):
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} was written for a different configuration "
                              f"({'; '.join(diff)}); resume with the same config or use another out_dir")
    previous = [name for name in ("checkpoint.pt", "summary.json") if (out / name).exists()]
    if ckpt is None and previous and not overwrite:
        raise ConfigError(f"config key 'out_dir': {str(out)!r} holds a previous run ({', '.join(previous)}); "
                          "continue it with --resume, replace it with --overwrite, or choose another out_dir")

    # data and model: the same seed on every process gives the same initial weights
    _seed_everything(cfg.seed)
    train_ds, test_ds, info = build_datasets(cfg.data, seed=cfg.seed)
    train_loader, test_loader, train_sampler = build_loaders(
        train_ds, test_ds, cfg.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed, distributed=distributed)
    model = build_model(cfg, info.num_classes, info.in_chans, info.img_size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    global_batch = cfg.batch_size * world
    lr = cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / cfg.lr_base_size
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    param_group_fn=(lambda m: param_groups(m, cfg)) if cfg.no_weight_decay else None)
    if cfg.warmup_epochs >= cfg.epochs and main_proc and ckpt is None:
        warnings.warn(f"config keys 'warmup_epochs' ({cfg.warmup_epochs}) >= 'epochs' ({cfg.epochs}): the whole run "
                      "is warm-up, its learning rate rising all the way and never reaching the peak", RuntimeWarning,
                      stacklevel=2)
    steps_per_epoch = len(train_loader)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(enabled=False)  # bf16 needs no loss scaling; kept for fp16 and the checkpoint
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=info.num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    net = eval_net = model  # evaluation bypasses DDP: its shards may differ by a batch, and it needs no all-reduce
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
        eval_net = torch.compile(model) if distributed else net

    start_epoch, start_step, best, wall_before, resumed = 0, 0, None, 0.0, {}
    # the weight-symmetry index of every two-matrix MLP at initialisation (then logged after every epoch): whether
    # training breaks the symmetry, or the weights never had it (Karakida, Ota & Taki 2024)
    symmetry_init = symmetry_scalars(model) if ckpt is None else ckpt.get("symmetry_init", {})
    if ckpt is not None:
        _check_resumable(ckpt, ckpt_path, scheduler, world, cfg.epochs)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} does not fit model {cfg.model!r}: {e}") from e
        try:
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            start_epoch, start_step, best, wall_before = ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["wall_s"]
            # this process's RNG and partial-epoch counters (one entry per process since multi-process stops)
            resumed = ckpt["ranks"][rank] if "ranks" in ckpt else {
                k: ckpt.get(k, 0) for k in ("rng", "epoch_loss_sum", "epoch_correct", "epoch_counted", "epoch_seen",
                                            "epoch_time_s")}
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} has a damaged training state: {e!r}") from e
    # metrics of the epochs the checkpoint has seen (a kill between logging and saving leaves one extra line)
    history = [h for h in read_jsonl(out / "metrics.jsonl") if h["epoch"] <= start_epoch] if ckpt else []
    if main_proc:
        if ckpt is None:  # a fresh start: nothing of an earlier run in out_dir survives to mix with this one's
            for name in previous:
                (out / name).unlink()
            shutil.rmtree(out / "tb", ignore_errors=True)
            atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(_plain(cfg))))
        _rewrite_logs(out, history)
    writer = None
    if main_proc:
        from torch.utils.tensorboard import SummaryWriter

        # on resume, TensorBoard drops the events of epochs logged after the checkpoint (as metrics.jsonl does)
        writer = SummaryWriter(str(out / "tb"), purge_step=start_epoch + 1 if ckpt else None)

    def state(epoch: int, step: int, ranks: list[dict] | None = None) -> dict:
        """The checkpoint. ``ranks``: every process's RNG state and partial-epoch counters, for a mid-epoch stop
        (at an epoch boundary they are re-derived from the seed); entry 0 also goes where one process reads it."""
        own = (ranks or [{}])[0]
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                   "rng": own.get("rng", _rng_state()), "epoch": epoch, "step": step, "best": best,
                   "epochs": cfg.epochs, "world_size": world, "epoch_loss_sum": own.get("epoch_loss_sum", 0.0),
                   "epoch_correct": own.get("epoch_correct", 0), "epoch_counted": own.get("epoch_counted", 0),
                   "epoch_seen": own.get("epoch_seen", 0), "epoch_time_s": own.get("epoch_time_s", 0.0),
                   "wall_s": wall_before + time.perf_counter() - t_start, "symmetry_init": symmetry_init,
                   "config": _plain(cfg, ignore=RESUME_IGNORED)}
        if ranks is not None and world > 1:
            payload["ranks"] = ranks
        return payload

    t_start = last_save = time.perf_counter()
    save_every = None if cfg.checkpoint_minutes is None else 60.0 * cfg.checkpoint_minutes

    def gather(own: dict) -> list[dict]:
        """Every process's RNG state and partial-epoch counters, in rank order (a collective under DDP)."""
        if not distributed:
            return [own]
        ranks = [None] * world
        dist.all_gather_object(ranks, own)
        return ranks

    stopped = None
    with _Stop() as stop:
        for epoch in range(start_epoch, total_epochs):
            # every epoch starts from RNG states fixed by (seed, epoch, rank): a resumed run replays it exactly
            _seed_everything(cfg.seed + 1_000_003 * (epoch + 1) + 7919 * rank)
            if train_sampler is not None:
                train_sampler.set_epoch(epoch)
            if train_loader.generator is not None:  # shuffling and worker seeds of this epoch
                train_loader.generator.manual_seed(cfg.seed + 1_000_003 * epoch + rank)
            net.train()
            skip = start_step if epoch == start_epoch else 0
            seen, loss_sum, t0 = 0, torch.zeros((), dtype=torch.float64), time.perf_counter()
            correct = counted = 0
            seen_before, time_before = 0, 0.0  # images and seconds this epoch trained before a stop
            if skip:  # the interrupted part of this epoch counts in its loss, accuracy, time and images/s
                loss_sum += resumed["epoch_loss_sum"]
                correct, counted = resumed["epoch_correct"], resumed["epoch_counted"]
                seen_before, time_before = resumed.get("epoch_seen", 0), resumed.get("epoch_time_s", 0.0)
            bar = _bar(cfg, main_proc, steps_per_epoch, epoch, total_epochs)
            for step, (x, y) in enumerate(train_loader):
                if step < skip:  # fast-forward a resumed epoch: the loader consumes its randomness as before
                    if step == skip - 1:
                        _set_rng_state(resumed["rng"])
                        t0 = time.perf_counter()  # the fast-forward is not training time
                    if bar is not None:
                        bar.update()
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mixup is not None:
                    x, y = mixup(x, y)
                with autocast():
                    logits = net(x)
                    loss = criterion(logits, y)
                    if hasattr(model, "penalty"):
                        loss = loss + model.penalty()
                # every process takes the same branch: a non-finite loss or a signal on any one of them stops all
                # at this step (alone, it would leave the others waiting in the gradient all-reduce)
                # a mid-epoch checkpoint is due by the main process's clock (and is not the epoch's last step)
                due = (save_every is not None and main_proc and step + 1 < steps_per_epoch
                       and time.perf_counter() - last_save >= save_every)
                flags = torch.stack([~torch.isfinite(loss.detach()),
                                     torch.tensor(stop.signum is not None, device=loss.device),
                                     torch.tensor(due, device=loss.device)]).float()
                if distributed:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                nonfinite, stopping, due = flags.tolist()
                if nonfinite:
                    raise FloatingPointError(f"loss is {loss.item()} (or non-finite on another process) at epoch "
                                             f"{epoch} step {step}; last good checkpoint: {ckpt_path}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step_update(epoch * steps_per_epoch + step + 1)
                seen += x.shape[0] * world
                loss_sum += loss.detach().double().cpu()
                if y.ndim == 1:  # hard labels (no mixup): running training accuracy
                    correct += (logits.detach().argmax(1) == y).sum().item()
                    counted += y.numel()
                if bar is not None:
                    rate = seen / (time.perf_counter() - t0)
                    acc = f"{100 * correct / counted:.1f}" if counted else "-"
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=acc, lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{rate:.0f}")
                    bar.update()
                if stopping or due:
                    partial = {"rng": _rng_state(), "epoch_loss_sum": loss_sum.item(), "epoch_correct": correct,
                               "epoch_counted": counted, "epoch_seen": seen_before + seen,
                               "epoch_time_s": time_before + time.perf_counter() - t0}
                    if stopping:
                        stopped = (epoch, step + 1, partial)
                        break
                    saving = time.perf_counter()
                    ranks = gather(partial)
                    if main_proc:
                        save_checkpoint(ckpt_path, state(epoch, step + 1, ranks))
                    last_save = time.perf_counter()
                    t0 += last_save - saving  # writing the checkpoint is not training time
            if bar is not None:
                bar.close()
            if stopped is not None:
                break
            seen, epoch_time = seen_before + seen, time_before + time.perf_counter() - t0
            totals = torch.tensor([loss_sum.item(), correct, counted], dtype=torch.float64, device=device)
            if distributed:  # training loss and accuracy over all processes' batches
                dist.all_reduce(totals)
            loss_total, correct_total, counted_total = totals.tolist()
            metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                       "train_loss": loss_total / (steps_per_epoch * world),
                       "train_top1": 100 * correct_total / counted_total if counted_total else None,
                       **evaluate(eval_net, test_loader, device, autocast),
                       "images_per_s": seen / epoch_time if seen else None, "epoch_time_s": epoch_time,
                       "wall_s": wall_before + time.perf_counter() - t_start, **symmetry_scalars(model)}
            if best is None or metrics["test_top1"] > best["test_top1"]:
                best = {"epoch": epoch + 1, "test_top1": metrics["test_top1"], "test_top5": metrics["test_top5"]}
            history.append(metrics)
            if main_proc:
                _log(out, writer, metrics)
                if bar is None and cfg.progress:
                    print(json.dumps(metrics))
                save_checkpoint(ckpt_path, state(epoch + 1, 0))
            last_save = time.perf_counter()
            scheduler.step(epoch + 1)

    if stopped is not None:
        ranks = gather(stopped[2])
        if main_proc:
            save_checkpoint(ckpt_path, state(stopped[0], stopped[1], ranks))
            by = f"signal {stop.signum}" if stop.signum is not None else "a signal to another process"
            print(f"stopped by {by} at epoch {stopped[0]} step {stopped[1]}; checkpoint "
                  f"{ckpt_path}; continue with --resume", file=sys.stderr)
        if writer is not None:
            writer.close()
        if distributed:
            dist.destroy_process_group()
        return {"stopped": True, "epoch": stopped[0], "step": stopped[1]}

    identical = _ranks_identical(model) if distributed else True
    last = history[-1] if history else {}
    summary = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "dataset": cfg.data.name, "seed": cfg.seed,
               "params": n_params, "epochs": total_epochs, "world_size": world,
               "best_top1": best["test_top1"] if best else None, "best_top5": best["test_top5"] if best else None,
               "best_epoch": best["epoch"] if best else None,
               "last_top1": last.get("test_top1"), "last_top5": last.get("test_top5"),
               "images_per_s": median_images_per_s(history),
               "wall_s": wall_before + time.perf_counter() - t_start, "ranks_identical": identical,
               "device": str(device), "precision": "bf16 autocast" if use_amp else "float32",
               "symmetry_init": symmetry_init, "env": environment(device)}
    if main_proc:  # atomic: a sweep takes summary.json as the mark of a finished run
        atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    if writer is not None:
        writer.close()
    if distributed:
        dist.destroy_process_group()
    if stop.signum is not None:  # it came after the last step: the run is complete, and the signal still counts
        signal.raise_signal(stop.signum)
    return summary


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows of it."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512, native with AVX512_BF16 or AMX). Without them, on
    AVX2-only CPUs, bf16 autocast falls back to slow reference code: 0.10–0.13× float32's speed
    (docs/benchmarks.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing to tell
        return True


def environment(device: torch.device | str = "cpu") -> dict:
    """What produced a run, for its summary: Python, torch, torchvision and timm versions, the device (GPU name or
    CPU model), the CPU's vector capability and whether it has bf16 kernels (two CPUs of one model name can
    differ), cores and torch threads, and the code's git commit (None outside a git checkout) with whether
    tracked files differed from it. Taken when the run ends: a resumed run may have started under another."""
    import platform

    import timm
    import torchvision

    device = torch.device(device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "hardware": hw,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16_kernels": cpu_has_bf16_kernels(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "git_commit": commit, "git_dirty": bool(changes) if changes is not None else None}


def _ranks_identical(model: nn.Module) -> bool:
    """Whether every process ends with bit-identical weights and buffers (DDP keeps them in step): each compares
    its own tensors element by element with process 0's."""
    same = True
    for t in model.state_dict().values():
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        same = same and torch.equal(t, ref)
    flag = torch.tensor(float(same), device=next(iter(model.state_dict().values())).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _check_resumable(ckpt: dict, path: Path, scheduler, world: int, epochs: int) -> None:
    """A checkpoint continues only the run it came from: same number of processes and same LR schedule (the
    scheduler's state would otherwise silently keep the old run's length)."""
    if ckpt.get("world_size", world) != world:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by {ckpt['world_size']} processes; resume it "
                              f"with the same number (this run has {world}) or use another out_dir")
    fresh = scheduler.state_dict()
    differ = sorted(k for k, v in fresh.items() if k != "metric" and ckpt["scheduler"].get(k, v) != v)
    if differ:
        was = f"epochs={ckpt['epochs']}" if "epochs" in ckpt else "another length"
        raise CheckpointError(f"checkpoint {str(path)!r} was written for a different LR schedule ({was}; this "
                              f"config has epochs={epochs}; scheduler fields {differ} differ): resume with the "
                              "checkpoint's epochs, or start a new run in another out_dir")


def median_images_per_s(history: list[dict]) -> float | None:
    """Median over epochs of the training loop's images/s: an epoch slowed by a paused process, a resume or another
    job on the CPU moves it less than it moves the mean."""
    values = [h["images_per_s"] for h in history if h.get("images_per_s") is not None]
    return float(np.median(values)) if values else None


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

    return walk(stored, _plain(cfg, ignore), "")


def _plain(cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ignore:
        d.pop(k, None)
    return json.loads(json.dumps(d))


def _bar(cfg: TrainConfig, main_proc: bool, total: int, epoch: int, epochs: int):
    if not (cfg.progress and main_proc and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def read_jsonl(path: Path) -> list[dict]:
    """The metrics history; a last line cut short (a process killed while appending it) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise RuntimeError(f"{str(path)!r} line {i + 1} is not JSON: {e}") from e
    return out


def _rewrite_logs(out: Path, history: list[dict]) -> None:
    """metrics.jsonl and metrics.csv holding exactly ``history``, each replaced atomically."""
    def jsonl(tmp):
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))

    def table(tmp):
        with open(tmp, "w", newline="") as f:
            if history:
                w = csv.DictWriter(f, fieldnames=list(history[0]))
                w.writeheader()
                w.writerows(history)

    atomic_write(out / "metrics.jsonl", jsonl)
    if history:
        atomic_write(out / "metrics.csv", table)
    else:
        (out / "metrics.csv").unlink(missing_ok=True)


def _log(out: Path, writer, metrics: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    new = not (out / "metrics.csv").exists()
    with open(out / "metrics.csv", "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(metrics))
        if new:
            w.writeheader()
        w.writerow(metrics)
    if writer is None:
        return
    for k, v in metrics.items():
        if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
            writer.add_scalar(k, v, metrics["epoch"])
    writer.flush()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with TrainConfig keys")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that holds a previous run, "
                   "deleting its checkpoint, summary and TensorBoard logs")
    add_import_argument(p)
    p.add_argument("overrides", nargs="*", help="key=value (dotted keys, YAML values)")
    args = p.parse_args(argv)
    try:
        import_modules(args.imports)
        summary = train(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        p.error(str(e))
    except (CheckpointError, DatasetNotFoundError, CorruptDatasetError, RunWriteError) as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
