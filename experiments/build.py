"""A run's pieces from its config, and what can be checked before it starts.

- `build_model`: the registered model (derived or hand-written, through ``timm.create_model``) for a dataset's
  classes, channels and image size; ConfigError naming ``model`` or ``model_kwargs`` if it does not build.
- `param_groups`: timm's weight-decay groups with ``no_weight_decay``'s patterns exempt.
- `device_and_precision`: the run's device and whether bf16 autocast is on.
- `check_model`, `check_run`: the model, ``no_weight_decay``, device and batch size, checked before any data is
  read or folder made (a sweep checks every run this way before training the first).
"""

from __future__ import annotations

import fnmatch
import os
import warnings

import torch
from torch import nn

from .config import ConfigError, TrainConfig, colon_hint
from .data import dataset_info, split_size
from .runs import cpu_has_bf16_kernels, cpu_name

__all__ = ["build_model", "check_model", "check_run", "device_and_precision", "param_groups"]


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    import timm

    import derive  # noqa: F401 -- registers derived_* models
    import mixers  # noqa: F401 -- registers vmixer_*, imixer_*, limixer_*, paramixer_*

    if not timm.is_model(cfg.model):
        raise ConfigError(f"config key 'model': unknown model {cfg.model!r}")
    nulls = [k for k, v in cfg.model_kwargs.items() if v is None]
    if nulls:  # timm.create_model drops a keyword argument whose value is None: it would do nothing, silently
        raise ConfigError("; ".join(f"config key 'model_kwargs.{k}' is null, which timm's create_model drops "
                                    f"without a word: give it a value or remove it{colon_hint(k)}" for k in nulls))
    owned = {"num_classes": "the dataset", "in_chans": "the dataset", "img_size": "the dataset (data.img_size)",
             "drop_path_rate": "config key 'drop_path'"}
    clash = [k for k in cfg.model_kwargs if k in owned]
    if clash:
        raise ConfigError("; ".join(f"config key 'model_kwargs.{k}': set by {owned[k]}, not in model_kwargs"
                                    for k in clash))
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **cfg.model_kwargs)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    try:
        return timm.create_model(cfg.model, **kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:  # ArithmeticError: an inf or huge size (int(inf))
        raise ConfigError(f"config key 'model_kwargs' does not fit {cfg.model!r}: {e}") from e


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


def device_and_precision(cfg: TrainConfig, main_proc: bool) -> tuple[torch.device, bool]:
    """The run's device (``auto``: this process's GPU under torchrun, else the CPU) and whether bf16 autocast is on;
    a warning where bf16 would run on a CPU without bf16 kernels."""
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
    return device, use_amp
