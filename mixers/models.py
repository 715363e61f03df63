"""Mixer blocks and the MLP-Mixer model, with timm's structure and state-dict names.

- `MixerBlock`: the serial block of timm's Mixer, ``x + DP(TokMLP(LN1(x)^T)^T)`` then ``x + DP(ChMLP(LN2(x)))``, with a
  plain (`Mlp`), inverted (`iMlp`, iMixer Eq. 30) or L-layer inverted (`LiMlp`, iMixer Eqs. 37-42) token MLP.
- `ParaMixerBlock`: the parallelized block of Karakida, Ota & Taki (arXiv 2406.12220),
  ``x + DP(TokMLP(LN(x)^T)^T) + DP(ChMLP(LN(x)))`` with one shared LayerNorm and untied, symmetric or
  symmetry-broken MLPs.
- `MlpMixer` (configured by `MixerConfig`): patch stem, blocks, final LayerNorm, mean pooling, linear head.

Importing this module registers the model names of `MODEL_NAMES` with timm (``timm.create_model("imixer_s16_224")``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from timm.layers import DropPath, lecun_normal_
from timm.models import is_model, model_entrypoint, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import AsymMlp, LiMlp, Mlp, SpectralNormLinear, SymMlp, iMlp

__all__ = [
    "BLOCK_TYPES",
    "MODEL_NAMES",
    "SIZES",
    "IMixerBlock",
    "LiMixerBlock",
    "MixerBlock",
    "MixerConfig",
    "MlpMixer",
    "ParaMixerBlock",
    "PatchStem",
    "build_token_mixer",
]


def ratio_pair(ratio: float | tuple[float, float]) -> tuple[float, float]:
    """``mlp_ratio`` as (tokens, channels): a single number serves both (timm's ``to_2tuple``)."""
    if isinstance(ratio, (tuple, list)):
        if len(ratio) != 2:
            raise ValueError(f"mlp_ratio must be a float or a pair (tokens, channels), got {ratio!r}")
        return float(ratio[0]), float(ratio[1])
    return float(ratio), float(ratio)


# ----------------------------------------------------------------------------------------------------------------
# token mixers


def _mlp_tokens(seq_len: int, tokens_dim: int, drop: float = 0.0, bias: bool = True) -> Mlp:
    return Mlp(seq_len, tokens_dim, bias=bias, drop=drop)


def _imlp_tokens(
    seq_len: int,
    tokens_dim: int,
    drop: float = 0.0,
    h_ratio: float = 1.0,
    n_iter: int = 2,
    n_power: int = 8,
    coeff: float = 0.9,
    inner_norm: str = "spectral",
) -> iMlp:
    return iMlp(seq_len, tokens_dim, int(tokens_dim * h_ratio), n_iter=n_iter, n_power=n_power, coeff=coeff, drop=drop,
                inner_norm=inner_norm)


def _limlp_tokens(
    seq_len: int,
    tokens_dim: int,
    drop: float = 0.0,
    depth: int = 4,
    h_ratio: float = 1.0,
    n_iter: int = 2,
    n_power: int = 8,
    coeff: float = 0.9,
    inner_norm: str = "spectral",
) -> LiMlp:
    widths = [seq_len, tokens_dim] + [int(tokens_dim * h_ratio)] * (depth - 2)
    return LiMlp(widths, n_iter=n_iter, n_power=n_power, coeff=coeff, drop=drop, inner_norm=inner_norm)


_TOKEN_MIXERS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp_tokens, "imlp": _imlp_tokens, "limlp": _limlp_tokens}


def build_token_mixer(
    kind: str | Callable[..., nn.Module], seq_len: int, tokens_dim: int, drop: float = 0.0, **kwargs: Any
) -> nn.Module:
    """The token MLP of a `MixerBlock`, acting on the token axis (size ``seq_len``).

    - ``"mlp"``: ``Mlp(seq_len, tokens_dim)`` (timm's Mixer), option ``bias=True``;
    - ``"imlp"``: ``iMlp(seq_len, tokens_dim, int(tokens_dim * h_ratio))`` (iMixer Eq. 30), options ``h_ratio=1.0``,
      ``n_iter=2``, ``n_power=8``, ``coeff=0.9``, ``inner_norm="spectral"`` (or ``"none"``, ``"batch"``: iMixer
      Table 3's arms, see `inner_linear`);
    - ``"limlp"``: ``LiMlp([seq_len, tokens_dim] + [int(tokens_dim * h_ratio)] * (depth - 2))`` (iMixer Appendix B),
      options ``depth=4`` and those of ``"imlp"``;
    - a callable: called as ``kind(seq_len, tokens_dim, drop=drop, **kwargs)``.
    """
    if callable(kind):
        return kind(seq_len, tokens_dim, drop=drop, **kwargs)
    if kind not in _TOKEN_MIXERS:
        raise ValueError(f"unknown token mixer {kind!r}; expected one of {sorted(_TOKEN_MIXERS)} or a callable")
    return _TOKEN_MIXERS[kind](seq_len, tokens_dim, drop=drop, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# blocks


class MixerBlock(nn.Module):
    """Serial Mixer block with timm's names (``norm1``, ``mlp_tokens``, ``norm2``, ``mlp_channels``, ``drop_path``),
    repeated ``n_iter`` times with the same weights::

        x <- x + DP(mlp_tokens(norm1(x)^T)^T)
        x <- x + DP(mlp_channels(norm2(x)))

    ``norm1``/``norm2`` are ``LayerNorm(eps=1e-6)``: per token over channels with a (C,) affine for
    ``norm="channel"`` (timm's), over the whole token x channel matrix with an (S, C) affine for ``norm="matrix"``
    (the parallelized-Mixer authors' serial ``vMixerBlock``). ``tokens_dim = int(mlp_ratio[0] * dim)``,
    ``mlp_channels = Mlp(dim, int(mlp_ratio[1] * dim), bias=bias)``. The token MLP is chosen by ``token_mixer``
    (see `build_token_mixer`): ``"mlp"`` (``Mlp(bias=bias)``) gives timm's ``MixerBlock`` and, with
    ``norm="matrix", bias=False``, the authors' vanilla Mixer block; ``"imlp"`` the iMixer block (iMixer Eq. 30),
    ``"limlp"`` the L-layer iMixer block (Appendix B). One ``DropPath`` module serves both branches (timm's
    convention); each call draws its own mask.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float | tuple[float, float] = (0.5, 4.0),
        token_mixer: str | Callable[..., nn.Module] = "mlp",
        token_kwargs: dict[str, Any] | None = None,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm: str = "channel",
        bias: bool = True,
        n_iter: int = 1,
    ) -> None:
        super().__init__()
        if norm not in ("channel", "matrix"):
            raise ValueError(f"unknown norm {norm!r}; expected 'channel' or 'matrix'")
        if not (isinstance(n_iter, int) and n_iter >= 1):
            raise ValueError(f"n_iter (repeats of the block) must be an int >= 1, got {n_iter!r}")
        token_kwargs = dict(token_kwargs or {})
        if token_mixer == "mlp":
            token_kwargs.setdefault("bias", bias)
        elif not bias:
            raise ValueError(f"bias=False applies to the plain MLP token mixer, not to {token_mixer!r}")
        tokens_ratio, channels_ratio = ratio_pair(mlp_ratio)
        tokens_dim, channels_dim = int(tokens_ratio * dim), int(channels_ratio * dim)
        self.norm_kind = norm
        self.n_iter = int(n_iter)
        shape = dim if norm == "channel" else (seq_len, dim)
        self.norm1 = nn.LayerNorm(shape, eps=1e-6)
        self.mlp_tokens = build_token_mixer(token_mixer, seq_len, tokens_dim, drop=drop, **token_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(shape, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim, bias=bias, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_iter):
            x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
            x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x

    def extra_repr(self) -> str:
        return f"norm={self.norm_kind!r}, n_iter={self.n_iter}"


class IMixerBlock(MixerBlock):
    """iMixer block: `MixerBlock` with the `iMlp` token mixer (iMixer Eq. 30), hidden width ``int(T * h_ratio)``."""

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float | tuple[float, float] = (0.5, 4.0),
        h_ratio: float = 1.0,
        n_iter: int = 2,
        n_power: int = 8,
        coeff: float = 0.9,
        drop: float = 0.0,
        drop_path: float = 0.0,
        inner_norm: str = "spectral",
    ) -> None:
        kwargs = dict(h_ratio=h_ratio, n_iter=n_iter, n_power=n_power, coeff=coeff, inner_norm=inner_norm)
        super().__init__(dim, seq_len, mlp_ratio, "imlp", kwargs, drop=drop, drop_path=drop_path)


class LiMixerBlock(MixerBlock):
    """L-layer iMixer block: `MixerBlock` with the `LiMlp` token mixer (iMixer Appendix B, Eqs. 37-42).

    Widths ``[S, T] + [int(T * h_ratio)] * (depth - 2)``; ``depth = 3`` is `IMixerBlock`.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float | tuple[float, float] = (0.5, 4.0),
        depth: int = 4,
        h_ratio: float = 1.0,
        n_iter: int = 2,
        n_power: int = 8,
        coeff: float = 0.9,
        drop: float = 0.0,
        drop_path: float = 0.0,
        inner_norm: str = "spectral",
    ) -> None:
        kwargs = dict(depth=depth, h_ratio=h_ratio, n_iter=n_iter, n_power=n_power, coeff=coeff,
                      inner_norm=inner_norm)
        super().__init__(dim, seq_len, mlp_ratio, "limlp", kwargs, drop=drop, drop_path=drop_path)


_PARA_FORMS = {"untied": Mlp, "symmetric": SymMlp, "broken": AsymMlp}


class ParaMixerBlock(nn.Module):
    """Parallelized Mixer block (arXiv 2406.12220; the authors' ``pMixerBlock``), repeated ``n_iter`` times::

        y = norm(x);  x <- x + DP(mlp_tokens(y^T)^T) + DP(mlp_channels(y))

    One LayerNorm ``norm`` (eps 1e-6) is shared by both branches: ``norm="matrix"`` normalises the whole
    token x channel matrix with an (S, C) affine (the authors' convention, the LayerNorm Lagrangian of the visible
    layer); ``norm="channel"`` normalises each token over channels (timm's convention). The MLPs
    (``Mlp(bias=bias)``, `SymMlp` or `AsymMlp` for ``form`` ``"untied"``, ``"symmetric"``, ``"broken"``) have hidden
    widths ``int(mlp_ratio[0] * dim)`` and ``int(mlp_ratio[1] * dim)``. The ``n_iter`` repeats share the weights.
    One ``DropPath`` module is called once per branch, so the two branches get independent masks.
    ``tied_init`` (untied form only) starts each MLP at the tied point, ``fc2.weight = fc1.weight^T``
    (`MlpMixer.init_weights` applies it after the initialisation), so training shows whether it leaves it.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float | tuple[float, float] = (0.5, 4.0),
        form: str = "untied",
        norm: str = "matrix",
        bias: bool = False,
        n_iter: int = 1,
        drop: float = 0.0,
        drop_path: float = 0.0,
        tied_init: bool = False,
    ) -> None:
        super().__init__()
        if form not in _PARA_FORMS:
            raise ValueError(f"unknown form {form!r}; expected one of {sorted(_PARA_FORMS)}")
        if tied_init and form != "untied":
            raise ValueError(f"tied_init starts an untied MLP at the tied point; form {form!r} has no free second "
                             "matrix to tie")
        if norm not in ("matrix", "channel"):
            raise ValueError(f"unknown norm {norm!r}; expected 'matrix' or 'channel'")
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        tokens_ratio, channels_ratio = ratio_pair(mlp_ratio)
        tokens_dim, channels_dim = int(tokens_ratio * dim), int(channels_ratio * dim)
        self.form = form
        self.norm_kind = norm
        self.n_iter = int(n_iter)
        self.tied_init = bool(tied_init)
        mlp = _PARA_FORMS[form]
        self.norm = nn.LayerNorm((seq_len, dim) if norm == "matrix" else dim, eps=1e-6)
        self.mlp_tokens = mlp(seq_len, tokens_dim, bias=bias, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp_channels = mlp(dim, channels_dim, bias=bias, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_iter):
            y = self.norm(x)
            tokens = self.mlp_tokens(y.transpose(1, 2)).transpose(1, 2)
            x = x + self.drop_path(tokens) + self.drop_path(self.mlp_channels(y))
        return x

    @torch.no_grad()
    def tie(self) -> None:
        """Each MLP's output matrix set to its input matrix transposed, ``fc2.weight = fc1.weight^T``."""
        for mlp in (self.mlp_tokens, self.mlp_channels):
            mlp.fc2.weight.copy_(mlp.fc1.weight.T)

    def penalty(self) -> torch.Tensor:
        """``||W2_tok||_F^2 + ||W2_ch||_F^2`` for ``form="broken"``, zero otherwise."""
        if self.form != "broken":
            return self.norm.weight.new_zeros(())
        return self.mlp_tokens.penalty() + self.mlp_channels.penalty()

    def extra_repr(self) -> str:
        return f"form={self.form!r}, norm={self.norm_kind!r}, n_iter={self.n_iter}"


# ----------------------------------------------------------------------------------------------------------------
# model


BLOCK_TYPES = ("mixer", "imixer", "limixer", "paramixer")


def check_sizes(cfg, ints: tuple[str, ...], ratios: dict[str, Any]) -> None:
    """ValueError naming the config class and field unless each of ``ints`` is a positive integer and each of
    ``ratios`` (name -> a number or a tuple of numbers) is > 0: bad sizes fail here, not deep inside a layer."""
    where = type(cfg).__name__
    for name in ints:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{name} must be a positive integer, got {v!r}")
    for name, v in ratios.items():
        values = v if isinstance(v, (tuple, list)) else (v,)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in values):
            raise ValueError(f"{where}.{name} must be > 0, got {v!r}")


def check_rates(cfg) -> None:
    """ValueError naming the config class and field unless every dropout rate lies in [0, 1), ``lam`` is a finite
    number >= 0 and ``block_kwargs``' ``n_iter``, when given, an integer >= 0."""
    where = type(cfg).__name__
    for name in ("drop_rate", "proj_drop_rate", "drop_path_rate"):
        v = getattr(cfg, name, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"{where}.{name} must be in [0, 1), got {v!r}")
    lam = cfg.lam
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"{where}.lam (the weight of the symmetry-breaking penalty) must be a finite number >= 0, "
                         f"got {lam!r}")
    n_iter = cfg.block_kwargs.get("n_iter")
    if n_iter is not None and (isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0):
        raise ValueError(f"{where}.block_kwargs.n_iter must be an integer >= 0, got {n_iter!r}")


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


@dataclass
class MixerConfig(ImageGrid):
    """Configuration of `MlpMixer` (the fields of timm's ``MlpMixer`` plus the block type).

    ``block``: ``"mixer"`` (`MixerBlock`; ``block_kwargs`` norm, bias, n_iter), ``"imixer"`` (`iMlp` token mixer;
    ``block_kwargs`` h_ratio, n_iter, n_power, coeff, inner_norm), ``"limixer"`` (`LiMlp`; also depth),
    ``"paramixer"`` (`ParaMixerBlock`; form, norm, bias, n_iter, tied_init). ``drop_rate`` is the head dropout,
    ``proj_drop_rate`` the dropout inside the MLPs, ``drop_path_rate`` the same stochastic-depth rate for every
    block (as in timm's Mixer). ``lam`` scales `MlpMixer.penalty`.
    """

    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    patch_size: int = 16
    num_blocks: int = 8
    embed_dim: int = 512
    mlp_ratio: tuple[float, float] = (0.5, 4.0)
    block: str = "mixer"
    block_kwargs: dict[str, Any] = field(default_factory=dict)
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    lam: float = 0.0
    global_pool: str = "avg"

    def __post_init__(self) -> None:
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"unknown block {self.block!r}; expected one of {BLOCK_TYPES}")
        check_sizes(self, ("in_chans", "patch_size", "num_blocks", "embed_dim"),
                    {"mlp_ratio": self.mlp_ratio, **{f"block_kwargs.{k}": v for k, v in self.block_kwargs.items()
                                                     if k == "h_ratio"}})
        check_rates(self)
        if self.global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {self.global_pool!r}")
        self.check_grid()


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


def take_blocks(n_blocks: int, indices: int | list[int] | None, output_fmt: str = "NCHW") -> tuple[list[int], int]:
    """timm's ``feature_take_indices`` (the last n blocks if an int, all if None, negative from the end) after
    checking ``output_fmt``: the block indices to return and the last of them."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    return feature_take_indices(n_blocks, indices)


def token_maps(tokens: list[torch.Tensor], output_fmt: str, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Patch tokens (B, N, C) in timm's feature format: as they are for ``"NLC"``, (B, C, H, W) for ``"NCHW"``."""
    if output_fmt == "NLC":
        return tokens
    return [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in tokens]


def blocks_feature_info(n_blocks: int, channels: int, reduction: int) -> list[dict[str, Any]]:
    """timm's ``feature_info`` of a plain stack of blocks: every block's output, at one width and stride."""
    return [dict(module=f"blocks.{i}", num_chs=channels, reduction=reduction) for i in range(n_blocks)]


def prune_blocks(model: nn.Module, indices: int | list[int]) -> list[int]:
    """Drop ``model.blocks`` (and their ``feature_info``) after the last of ``indices``; the kept indices."""
    take, last = feature_take_indices(len(model.blocks), indices)
    model.blocks = model.blocks[: last + 1]
    model.feature_info = model.feature_info[: last + 1]
    return take


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
        ref = self.stem.proj.weight  # norm and head may be pruned away
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

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
        take = prune_blocks(self, indices)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


class MlpMixer(TimmClassifierAPI, nn.Module):
    """MLP-Mixer with timm's structure and state-dict names (``stem.proj``, ``blocks.i``, ``norm``, ``head``).

    ``MlpMixer(cfg)``, ``MlpMixer(**fields)`` or ``MlpMixer(cfg, **overrides)``. With ``block="mixer"`` a timm
    ``mixer_*`` state dict loads with ``strict=True`` and gives the same logits. Weights are initialised as in timm's
    Mixer: xavier-uniform linear weights (spectrally normalised ones included) with N(0, 1e-6) biases inside MLPs,
    lecun-normal stem, unit LayerNorms, zero head.
    """

    def __init__(self, cfg: MixerConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = MixerConfig(**kwargs) if cfg is None else replace(cfg, **kwargs)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.embed_dim
        self.grad_checkpointing = False

        self.stem = PatchStem(cfg.image_hw, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.blocks = nn.Sequential(*[self._make_block() for _ in range(cfg.num_blocks)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()
        self.feature_info = blocks_feature_info(cfg.num_blocks, cfg.embed_dim, cfg.patch_size)
        self.pretrained_cfg = self.default_cfg = timm_data_cfg(cfg.num_classes, cfg.in_chans, cfg.image_hw, 0.875,
                                                               "stem.proj")

    def _make_block(self) -> nn.Module:
        cfg = self.cfg
        common = dict(drop=cfg.proj_drop_rate, drop_path=cfg.drop_path_rate)
        dim, seq_len = cfg.embed_dim, self.stem.num_patches
        if cfg.block == "paramixer":
            return ParaMixerBlock(dim, seq_len, cfg.mlp_ratio, **cfg.block_kwargs, **common)
        if cfg.block == "mixer":  # block options: norm, bias, n_iter (repeats)
            return MixerBlock(dim, seq_len, cfg.mlp_ratio, "mlp", **cfg.block_kwargs, **common)
        token_mixer = {"imixer": "imlp", "limixer": "limlp"}[cfg.block]
        return MixerBlock(dim, seq_len, cfg.mlp_ratio, token_mixer, dict(cfg.block_kwargs), **common)

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's Mixer initialisation (``_init_weights``), also reaching ``weight_orig`` of spectral-norm layers."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("head"):
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, SpectralNormLinear)):
                weight = module.weight if isinstance(module, nn.Linear) else module.weight_orig
                nn.init.xavier_uniform_(weight)
                if module.bias is not None:
                    if "mlp" in name:
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                lecun_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if getattr(block, "tied_init", False):
                block.tie()

    def penalty(self) -> torch.Tensor:
        """``lam * sum(block.penalty())``: the symmetry-breaking term to add to the training loss (zero if unused)."""
        zero = self.norm.weight.new_zeros(())
        if self.cfg.lam == 0:
            return zero
        terms = [block.penalty() for block in self.blocks if hasattr(block, "penalty")]
        return self.cfg.lam * sum(terms, zero)


# ----------------------------------------------------------------------------------------------------------------
# timm registration

SIZES: dict[str, dict[str, Any]] = {
    "s32_224": dict(patch_size=32, num_blocks=8, embed_dim=512),
    "s16_224": dict(patch_size=16, num_blocks=8, embed_dim=512),
    "b32_224": dict(patch_size=32, num_blocks=12, embed_dim=768),
    "b16_224": dict(patch_size=16, num_blocks=12, embed_dim=768),
    "l32_224": dict(patch_size=32, num_blocks=24, embed_dim=1024),
    "l16_224": dict(patch_size=16, num_blocks=24, embed_dim=1024),
    # tiny variants for 28 x 28 (MNIST-like, 1 channel) and 32 x 32 (CIFAR-like) images, 10 classes by default
    "t4_28": dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, num_blocks=4, embed_dim=128),
    "t4_32": dict(img_size=32, in_chans=3, num_classes=10, patch_size=4, num_blocks=4, embed_dim=128),
}

# family -> (block type, default block options). vanillamixer: the parallelized-Mixer authors' serial baseline
# (``vanillamixer_*``: LayerNorm over the whole token x channel matrix, no biases), timm's Mixer otherwise.
_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "vmixer": ("mixer", dict(norm="channel", bias=True, n_iter=1)),
    "vanillamixer": ("mixer", dict(norm="matrix", bias=False, n_iter=1)),
    "imixer": ("imixer", dict(h_ratio=1.0, n_iter=2, n_power=8, coeff=0.9, inner_norm="spectral")),
    "limixer": ("limixer", dict(depth=4, h_ratio=1.0, n_iter=2, n_power=8, coeff=0.9, inner_norm="spectral")),
    "paramixer": ("paramixer", dict(form="untied", norm="matrix", bias=False, n_iter=1, tied_init=False)),
}

_CONFIG_FIELDS = frozenset(f.name for f in fields(MixerConfig)) - {"block", "block_kwargs"}
_IGNORED_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


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
        model = FeatureGetterNet(model, out_indices=3 if out_indices is None else out_indices)
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


def _build_mixer(name: str, family: str, size: str, kwargs: dict[str, Any]) -> MlpMixer:
    block, defaults = _FAMILIES[family]
    cfg, options = split_kwargs(name, kwargs, _CONFIG_FIELDS, defaults, "MixerConfig")
    return MlpMixer(MixerConfig(block=block, block_kwargs={**defaults, **options}, **{**SIZES[size], **cfg}))


def _make_entrypoint(name: str, family: str, size: str, n_iter: int | None = None) -> Callable[..., MlpMixer]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
        if n_iter is not None:
            kwargs = {"n_iter": n_iter, **kwargs}
        return create_registered(name, pretrained, kwargs, lambda kw: _build_mixer(name, family, size, kw))

    block, defaults = _FAMILIES[family]
    defaults = defaults if n_iter is None else {**defaults, "n_iter": n_iter}
    entrypoint.__doc__ = (
        f"{name}: MlpMixer(block={block!r}, {SIZES[size]}); block options {defaults}. "
        "Keyword arguments override MixerConfig fields and block options."
    )
    return entrypoint


# the parallelized-Mixer authors' repeated blocks: <family>_s16_224_ni<k>, each block applied k times
_REPEATED: dict[str, tuple[str, str, int]] = {
    f"{family}_s16_224_ni{k}": (family, "s16_224", k) for family in ("vanillamixer", "paramixer") for k in (2, 3, 4)}

MODEL_NAMES: tuple[str, ...] = tuple(f"{family}_{size}" for family in _FAMILIES for size in SIZES) + tuple(_REPEATED)

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


register_entrypoints({n: _make_entrypoint(n, *_REPEATED[n]) if n in _REPEATED else _make_entrypoint(n, *n.split("_", 1))
                      for n in MODEL_NAMES}, globals())
