"""What the Mixer and ViT models share, and timm's model API around them.

- Config checks (`check_sizes`) and the patch grid of a config (`ImageGrid`); the patch embedding (`PatchStem`).
- Blocks run with optional activation checkpointing that keeps spectral-norm buffers exact (`run_block`,
  `run_blocks`); timm's feature API helpers (`take_blocks`, `token_maps`, `blocks_feature_info`, `prune_blocks`).
- `TimmClassifierAPI`: timm's classifier methods for a stem -> blocks -> norm -> pool -> head model
  (``mixers.MlpMixer``, ``derive.DerivedMixer``).
- Registration: the data config timm reads (`timm_data_cfg`), the shared entry-point body (`create_registered`,
  `split_kwargs`) and `register_entrypoints`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from timm.models import is_model, model_entrypoint, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ImageGrid", "PatchStem", "TimmClassifierAPI", "block_indices", "blocks_feature_info", "check_sizes",
           "create_registered", "new_head", "prune_blocks", "register_entrypoints", "run_block", "run_blocks",
           "split_kwargs", "take_blocks", "timm_data_cfg", "token_maps"]

_IGNORED_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def check_sizes(cfg, ints: tuple[str, ...], ratios: dict[str, Any]) -> None:
    """ValueError naming the config class and field unless each of ``ints`` is a positive integer and each of
    ``ratios`` (name -> a number or a tuple of numbers) is > 0: bad sizes fail here, not deep inside a layer."""
    where = type(cfg).__name__
    classes = getattr(cfg, "num_classes", 0)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
        raise ValueError(f"{where}.num_classes must be an integer >= 0 (0: no head), got {classes!r}")
    for name in ints:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{name} must be a positive integer, got {v!r}")
    for name, v in ratios.items():
        values = v if isinstance(v, (tuple, list)) else (v,)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in values):
            raise ValueError(f"{where}.{name} must be > 0, got {v!r}")


def check_dropout(cfg, names: tuple[str, ...]) -> None:
    """ValueError naming the config class and field unless each of ``names`` (dropout and stochastic-depth rates) is
    a number in [0, 1): a rate of 1 zeroes every activation it touches, silently."""
    for name in names:
        v = getattr(cfg, name, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be in [0, 1), got {v!r}")


class ImageGrid:
    """The patch grid of a config with ``img_size`` (an int or (H, W)) and ``patch_size`` fields."""

    def check_grid(self) -> None:
        h, w = self.image_hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"{type(self).__name__}: img_size {self.img_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def image_hw(self) -> tuple[int, int]:
        if isinstance(self.img_size, (tuple, list)):
            return int(self.img_size[0]), int(self.img_size[1])
        return int(self.img_size), int(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw


class PatchStem(nn.Module):
    """Non-overlapping patch embedding ``proj`` (Conv2d, kernel = stride = patch), flattened to (B, N, C)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"input of shape {tuple(x.shape)}: the model takes (batch, {self.proj.in_channels}, "
                             f"{self.img_size[0]}, {self.img_size[1]}) images (in_chans {self.proj.in_channels})")
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's img_size {self.img_size}")
        w = self.proj.weight
        if (x.dtype != w.dtype or x.device != w.device) and not (
                torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"input images are {x.dtype} on {x.device}, but the model computes in {w.dtype} on "
                             f"{w.device}: convert them with .to(dtype={w.dtype}, device={str(w.device)!r}) or the "
                             "model with model.to(...)")
        return self.proj(x).flatten(2).transpose(1, 2)


def _checkpoint_contexts(block: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """Context functions for non-reentrant checkpointing of a block whose forward pass updates its buffers.

    In train mode every spectral-norm call advances its power iteration (buffers ``weight_u``, ``weight_v``,
    ``weight_sigma``). The recomputation in the backward pass restarts from the buffers the forward pass started from
    (so it rebuilds exactly the same weights) and puts the end state back afterwards.
    """
    buffers = list(block.buffers())

    def snapshot() -> list[torch.Tensor]:
        return [b.clone() for b in buffers]

    @torch.no_grad()
    def restore(state: list[torch.Tensor]) -> None:
        for b, saved in zip(buffers, state):
            b.copy_(saved)

    def context_fn() -> tuple[Any, Any]:
        start = snapshot()

        @contextlib.contextmanager
        def recompute():
            end = snapshot()
            restore(start)
            try:
                yield
            finally:
                restore(end)

        return contextlib.nullcontext(), recompute()

    return context_fn


def run_block(block: nn.Module, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """``block(x)``; with ``checkpointed`` (and grad enabled) its activations are recomputed in the backward pass
    (``torch.utils.checkpoint``, non-reentrant, buffers restored as in `_checkpoint_contexts`)."""
    if not (checkpointed and torch.is_grad_enabled()):
        return block(x)
    return checkpoint(block, x, use_reentrant=False, context_fn=_checkpoint_contexts(block))


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """``blocks(x)``, each block through `run_block`."""
    if not (checkpointed and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        x = run_block(block, x, checkpointed)
    return x


def block_indices(n_blocks: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices`` (the last n blocks if an int, all if None, negative from the end), with a
    ValueError that says how many blocks there are instead of timm's bare assertion."""
    if indices is not None:
        single = isinstance(indices, int) and not isinstance(indices, bool)
        many = isinstance(indices, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in indices)
        if not (single and 1 <= indices <= n_blocks) and not (many and indices
                                                               and all(-n_blocks <= i < n_blocks for i in indices)):
            raise ValueError(f"block indices {indices!r} do not fit a model of {n_blocks} blocks: an int n takes the "
                             f"last n (1 to {n_blocks}), a list names blocks 0 to {n_blocks - 1} (or -{n_blocks} to "
                             "-1 from the end)")
    return feature_take_indices(n_blocks, indices)


def take_blocks(n_blocks: int, indices: int | list[int] | None, output_fmt: str = "NCHW") -> tuple[list[int], int]:
    """`block_indices` after checking ``output_fmt``: the block indices to return and the last of them."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    return block_indices(n_blocks, indices)


def token_maps(tokens: list[torch.Tensor], output_fmt: str, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Patch tokens (B, N, C) in timm's feature format: as they are for ``"NLC"``, (B, C, H, W) for ``"NCHW"``."""
    if output_fmt == "NLC":
        return tokens
    return [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in tokens]


def blocks_feature_info(n_blocks: int, channels: int, reduction: int) -> list[dict[str, Any]]:
    """timm's ``feature_info`` of a plain stack of blocks: every block's output, at one width and stride."""
    return [dict(module=f"blocks.{i}", num_chs=channels, reduction=reduction) for i in range(n_blocks)]


def prune_blocks(model: nn.Module, indices: int | list[int], prune_norm: bool = False, prune_head: bool = True,
                 head_norms: tuple[str, ...] = ()) -> list[int]:
    """timm's ``prune_intermediate_layers``: drop ``model.blocks`` (and their ``feature_info``) after the last of
    ``indices``, the final ``norm`` if ``prune_norm``, the head (and the ``head_norms`` before it) if
    ``prune_head``; the kept indices."""
    take, last = block_indices(len(model.blocks), indices)
    model.blocks = model.blocks[: last + 1]
    model.feature_info = model.feature_info[: last + 1]
    if prune_norm:
        model.norm = nn.Identity()
    if prune_head:
        for name in head_norms:
            setattr(model, name, nn.Identity())
        model.reset_classifier(0, "")
    return take


def new_head(embed_dim: int, num_classes: int, like: torch.Tensor, training: bool) -> nn.Module:
    """A classifier head for ``reset_classifier``: ``nn.Linear`` with its own init (as timm's) on ``like``'s device
    and dtype, in train mode if ``training``; ``nn.Identity`` for 0 classes."""
    head = nn.Linear(embed_dim, num_classes, device=like.device, dtype=like.dtype) if num_classes > 0 \
        else nn.Identity()
    return head.train(training)


class TimmClassifierAPI:
    """timm's model API shared by ``MlpMixer`` and ``derive.DerivedMixer``: both have ``cfg`` (with
    ``num_classes``, ``global_pool``), a ``PatchStem`` ``stem``, ``blocks`` (run with ``run_blocks``), ``norm``,
    ``head_drop``, ``head`` and ``embed_dim``."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (``run_blocks``)."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (``nn.Linear``'s own init, as timm's) and optionally a new pooling;
        ``cfg`` follows."""
        pool = self.global_pool if global_pool is None else global_pool
        self.cfg = replace(self.cfg, num_classes=num_classes, global_pool=pool)  # validates global_pool
        self.num_classes, self.global_pool = num_classes, pool
        self.head = new_head(self.embed_dim, num_classes, self.stem.proj.weight, self.training)  # norm may be pruned

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(run_blocks(self.blocks, self.stem(x), self.grad_checkpointing))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the outputs of the blocks ``indices`` (the last n if an int, all if
        None; negative counts from the end), through ``norm`` if asked, as (B, C, H, W) (``"NCHW"``) or (B, N, C)
        (``"NLC"``); with the final normed tokens unless ``intermediates_only``."""
        take, last = take_blocks(len(self.blocks), indices, output_fmt)
        x = self.stem(x)
        intermediates = []
        for i, block in enumerate(self.blocks[: last + 1] if stop_early else self.blocks):
            x = run_block(block, x, self.grad_checkpointing)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        intermediates = token_maps(intermediates, output_fmt, self.stem.grid_size)
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norm, the head if asked); the kept indices."""
        return prune_blocks(self, indices, prune_norm, prune_head)


def timm_data_cfg(num_classes: int, in_chans: int, image_hw: tuple[int, int], crop_pct: float,
                  first_conv: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` that timm's ``resolve_data_config`` reads (input size, normalisation, crop); no
    weights are behind it. Without it timm assumes 3 x 224 x 224 ImageNet inputs."""
    return {"num_classes": num_classes, "input_size": (in_chans, *image_hw), "fixed_input_size": True,
            "interpolation": "bicubic", "crop_pct": crop_pct, "mean": (0.5,) * in_chans, "std": (0.5,) * in_chans,
            "first_conv": first_conv, "classifier": "head"}


def create_registered(name: str, pretrained: bool, kwargs: dict[str, Any],
                      build: Callable[[dict[str, Any]], nn.Module]) -> nn.Module:
    """What every entry point shares: refuse ``pretrained``, drop timm's loader keys, build from the remaining
    keyword arguments, then move to ``device``/``dtype``."""
    if pretrained:
        raise RuntimeError(
            f"no pretrained weights exist for {name!r}; create it with pretrained=False "
            "(and load a checkpoint, e.g. timm.create_model(..., checkpoint_path=...))"
        )
    kwargs = {k: v for k, v in kwargs.items() if k not in _IGNORED_FACTORY_KWARGS}
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    feature_cls = kwargs.pop("feature_cls", "getter")
    model = build(kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if features_only:
        if feature_cls != "getter":
            raise ValueError(f"{name}: feature_cls must be 'getter' (features from forward_intermediates), "
                             f"got {feature_cls!r}")
        # as timm's Mixer and ViT: the last 3 blocks unless out_indices says otherwise
        out_indices = min(3, len(model.blocks)) if out_indices is None else out_indices
        try:
            block_indices(len(model.blocks), out_indices)
        except ValueError as e:
            raise ValueError(f"{name}: out_indices: {e}") from None
        model = FeatureGetterNet(model, out_indices=out_indices)
    elif out_indices is not None:
        raise TypeError(f"{name}: out_indices is given without features_only=True")
    return model


def split_kwargs(name: str, kwargs: dict[str, Any], config_fields, options, config: str) -> tuple[dict, dict]:
    """An entry point's keyword arguments as (``config`` fields, block options); TypeError naming an unknown one."""
    cfg, opts = {}, {}
    for key, value in kwargs.items():
        if key in config_fields:
            cfg[key] = value
        elif key in options:
            opts[key] = value
        else:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}; it accepts the {config} fields "
                            f"{sorted(config_fields)} and the block options {sorted(options)}")
    return cfg, opts


def register_entrypoints(entrypoints: dict[str, Callable[..., Any]], namespace: dict[str, Any]) -> None:
    """Register each entry point in timm under its name and bind it in ``namespace`` (a module's globals).

    A name timm already holds from another module is an error: timm would warn and overwrite it.
    """
    module = namespace["__name__"]
    for name, fn in entrypoints.items():
        if is_model(name) and model_entrypoint(name).__module__ != module:
            raise RuntimeError(f"timm already has a model named {name!r} from {model_entrypoint(name).__module__}")
        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = module
        namespace[name] = register_model(fn)
