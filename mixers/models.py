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

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from timm.layers import DropPath, lecun_normal_
from torch import nn

from .backbone import (
    ImageGrid,
    PatchStem,
    TimmClassifierAPI,
    blocks_feature_info,
    check_sizes,
    create_registered,
    register_entrypoints,
    split_kwargs,
    timm_data_cfg,
)
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
        tokens_ratio, channels_ratio = ratio_pair(self.mlp_ratio)
        tokens_dim = int(tokens_ratio * self.embed_dim)
        widths = {"token MLP (int(mlp_ratio[0] * embed_dim))": tokens_dim,
                  "channel MLP (int(mlp_ratio[1] * embed_dim))": int(channels_ratio * self.embed_dim)}
        if "h_ratio" in self.block_kwargs:
            widths["token chain's hidden layer (int(token MLP width * block_kwargs.h_ratio))"] = int(
                tokens_dim * self.block_kwargs["h_ratio"])
        empty = [f"the {what} is {w}" for what, w in widths.items() if w < 1]
        if empty:
            raise ValueError(f"MixerConfig: {'; '.join(empty)}: every layer needs at least one unit (embed_dim "
                             f"{self.embed_dim}, mlp_ratio {self.mlp_ratio})")


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

register_entrypoints({n: _make_entrypoint(n, *_REPEATED[n]) if n in _REPEATED else _make_entrypoint(n, *n.split("_", 1))
                      for n in MODEL_NAMES}, globals())
