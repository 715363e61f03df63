"""The Mixer family's blocks, with timm's structure and state-dict names.

- `MixerBlock`: the serial block of timm's Mixer, ``x + DP(TokMLP(LN1(x)^T)^T)`` then ``x + DP(ChMLP(LN2(x)))``, with a
  plain (`Mlp`), inverted (`iMlp`, iMixer Eq. 30) or L-layer inverted (`LiMlp`, iMixer Eqs. 37-42) token MLP
  (`IMixerBlock`, `LiMixerBlock`; `build_token_mixer`).
- `ParaMixerBlock`: the parallelized block of Karakida, Ota & Taki (arXiv 2406.12220),
  ``x + DP(TokMLP(LN(x)^T)^T) + DP(ChMLP(LN(x)))`` with one shared LayerNorm and untied, symmetric or
  symmetry-broken MLPs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from .layers import AsymMlp, LiMlp, Mlp, SymMlp, iMlp

__all__ = ["IMixerBlock", "LiMixerBlock", "MixerBlock", "ParaMixerBlock", "build_token_mixer", "ratio_pair"]


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
