"""Vision Transformer with standard multi-head self-attention or modern Hopfield attention (MHA).

MHA follows Masumura & Taki, "On the Role of Hidden States of Modern Hopfield Network in Transformer"
(arXiv 2511.20698; equations as summarised in ``notes/papers.md`` section 3). The Euler-discretised modern Hopfield
network with visible state ``x`` and hidden state ``h``,

    x_(n+1) = alpha x_n + (1 - alpha) softmax(h_n) V_n,        h_n = alpha' h_(n-1) + (1 - alpha') q_n k_n^T,

turns self-attention into an attention whose pre-softmax scores are an exponential moving average over depth. Here
``q_n k_n^T`` is the scaled score ``head_dim^-0.5 q_n k_n^T`` of each head, the first block starts from
``h_0 = s_0`` and ``alpha' = 0`` (the adiabatic limit) is standard attention. MHA adds no parameters.

- `Attention`: timm's ``Attention`` (same names; a timm state dict loads with ``strict=True``) with the explicit
  softmax over the hidden score state ``h``; returns ``(out, h)``.
- `Block`: timm's pre-norm ``Block`` with the skip modes ``"residual"``, ``"convex"`` and ``"none"``.
- `VisionTransformer` (configured by `ViTConfig`): timm's ViT layout (``patch_embed.proj``, ``cls_token``,
  ``pos_embed``, ``blocks``, ``norm``, ``fc_norm``, ``head``); the blocks pass ``h`` from one to the next.

Importing this module registers the names of `VIT_MODEL_NAMES` with timm: ``hvit_{t,s}4_{28,32}`` (standard
attention) and ``mhavit_{t,s}4_{28,32}`` (MHA, ``alpha_h = 0.2``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import (
    ImageGrid,
    PatchStem,
    blocks_feature_info,
    check_dropout,
    check_sizes,
    create_registered,
    new_head,
    prune_blocks,
    register_entrypoints,
    take_blocks,
    timm_data_cfg,
    token_maps,
)
from .layers import Mlp

__all__ = ["SKIP_MODES", "VIT_MODEL_NAMES", "Attention", "Block", "ViTConfig", "VisionTransformer"]

SKIP_MODES = ("residual", "convex", "none")


class Attention(nn.Module):
    """Multi-head self-attention over a hidden score state (MHA), with timm's names (``qkv``, ``proj``, ...).

    Per head, with ``q, k, v`` from ``qkv(x)`` and ``scale = head_dim^-0.5``:

        s_n = scale q_n k_n^T                                   (B, heads, N, N)
        h_n = s_n                               if h_prev is None (first layer, h_0 = s_0) or alpha_h == 0
        h_n = alpha_h h_prev + (1 - alpha_h) s_n   otherwise   (MHA: h_n = alpha' h_(n-1) + (1 - alpha') q_n k_n^T)
        out = proj(concat_heads(attn_drop(softmax(h_n)) v_n))

    ``alpha_h = 0`` is timm's ``Attention`` exactly (non-fused op order: ``(q * scale) @ k^T``, softmax, dropout,
    ``@ v``, ``proj``, ``proj_drop``). ``q_norm``, ``k_norm`` and ``norm`` are identities, as in timm's default.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v`` of shape (B, heads, N, head_dim)."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
        self, x: torch.Tensor, h_prev: torch.Tensor | None = None, alpha_h: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        h = scores if h_prev is None or alpha_h == 0 else alpha_h * h_prev + (1.0 - alpha_h) * scores
        attn = self.attn_drop(h.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(out))), h


class Block(nn.Module):
    """Pre-norm transformer block with timm's names (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ...).

    With ``a = drop_path1(ls1(attn(norm1(x), h_prev, alpha_h)))`` and ``m(x) = drop_path2(ls2(mlp(norm2(x))))``:

    - ``skip="residual"``: ``x <- x + a``, ``x <- x + m(x)`` (timm's ``Block``);
    - ``skip="convex"``: ``x <- alpha x + (1 - alpha) a``, ``x <- x + m(x)`` (MHA's visible-state update
      ``x_(n+1) = alpha x_n + (1 - alpha) softmax(h_n) V_n``; ``alpha = 1`` leaves ``x`` unchanged by attention);
    - ``skip="none"``: ``x <- a``, ``x <- m(x)``: no identity path in either sub-block (the pure attention networks
      of the rank-collapse studies). Needs ``drop_path = 0``.

    ``norm1``/``norm2`` are ``LayerNorm(dim, eps=1e-6)``; ``mlp = Mlp(dim, int(dim * mlp_ratio))`` (GELU);
    ``ls1``/``ls2`` are identities (no layer scale). Returns ``(x, h)`` with ``h`` the attention's hidden scores.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        skip: str = "residual",
        alpha: float = 0.5,
    ) -> None:
        super().__init__()
        if skip not in SKIP_MODES:
            raise ValueError(f"unknown skip {skip!r}; expected one of {SKIP_MODES}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if skip == "none" and drop_path > 0:
            raise ValueError("drop_path needs a skip connection; use drop_path=0 with skip='none'")
        self.skip = skip
        self.alpha = float(alpha)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, h_prev: torch.Tensor | None = None, alpha_h: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, h = self.attn(self.norm1(x), h_prev, alpha_h)
        a = self.ls1(a)
        if self.skip == "residual":
            x = x + self.drop_path1(a)
        elif self.skip == "convex":  # alpha x + (1 - alpha) a, written as x plus an update that drop-path can drop
            x = x + self.drop_path1((1.0 - self.alpha) * (a - x))
        else:
            x = a
        m = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (m if self.skip == "none" else x + m), h

    def extra_repr(self) -> str:
        return f"skip={self.skip!r}" + (f", alpha={self.alpha}" if self.skip == "convex" else "")


@dataclass
class ViTConfig(ImageGrid):
    """Configuration of `VisionTransformer` (timm's ViT fields plus the MHA options).

    ``alpha_h``: MHA's memory ``alpha'`` of past scores, ``h_n = alpha_h h_(n-1) + (1 - alpha_h) s_n``; 0 is the
    standard ViT. ``skip`` (``"residual"``, ``"convex"``, ``"none"``) and ``alpha`` (the convex skip weight) are those
    of `Block`. ``drop_rate`` is the head dropout, ``proj_drop_rate``/``attn_drop_rate`` the dropouts inside the
    blocks, ``drop_path_rate`` the stochastic-depth rate of the last block (``linspace(0, rate, depth)``, as in timm).
    ``global_pool``: ``"token"`` (class token), ``"avg"`` (mean of the patch tokens; timm's ``fc_norm`` placement:
    ``norm`` is then an identity and ``fc_norm`` normalises the pooled vector) or ``""`` (no pooling, no head input
    reduction).
    """

    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    skip: str = "residual"
    alpha: float = 0.5
    alpha_h: float = 0.0

    def __post_init__(self) -> None:
        check_sizes(self, ("in_chans", "patch_size", "depth", "embed_dim", "num_heads"), {"mlp_ratio": self.mlp_ratio})
        check_dropout(self, ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"))
        if self.global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.skip not in SKIP_MODES:
            raise ValueError(f"unknown skip {self.skip!r}; expected one of {SKIP_MODES}")
        if self.skip == "none" and self.drop_path_rate > 0:
            raise ValueError("drop_path_rate needs a skip connection; use drop_path_rate=0 with skip='none'")
        for name in ("alpha", "alpha_h"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        self.check_grid()


class VisionTransformer(nn.Module):
    """ViT with timm's structure and state-dict names; MHA when ``cfg.alpha_h > 0``.

    ``VisionTransformer(cfg)``, ``VisionTransformer(**fields)`` or ``VisionTransformer(cfg, **overrides)``.
    Tokens ``x_0 = [cls; patch_embed(img)] + pos_embed``; block ``n`` maps ``(x_n, h_(n-1))`` to ``(x_(n+1), h_n)``
    with ``h_(-1)`` absent (so ``h_0 = s_0``); then ``norm``, pooling, ``fc_norm``, head dropout and ``head``.
    With ``alpha_h = 0`` and ``skip="residual"`` a timm ``VisionTransformer`` with the same fields (``qk_norm``,
    layer scale, registers, pre-norm off) loads with ``strict=True`` and gives the same logits.

    Initialisation as timm's default (``weight_init=''``): ``pos_embed`` trunc-normal(0.02), ``cls_token``
    N(0, 1e-6), linear weights trunc-normal(0.02) with zero biases, PyTorch's default for the patch convolution,
    unit LayerNorms; except that the head is zero (weight and bias).
    """

    def __init__(self, cfg: ViTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = ViTConfig(**kwargs) if cfg is None else replace(cfg, **kwargs)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        self.grad_checkpointing = False

        dim = cfg.embed_dim
        self.patch_embed = PatchStem(cfg.image_hw, cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, dim))
        self.pos_drop = nn.Dropout(0.0)
        dpr = [r.item() for r in torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                proj_drop=cfg.proj_drop_rate,
                attn_drop=cfg.attn_drop_rate,
                drop_path=dpr[i],
                skip=cfg.skip,
                alpha=cfg.alpha,
            )
            for i in range(cfg.depth)
        )
        use_fc_norm = cfg.global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()
        self.feature_info = blocks_feature_info(cfg.depth, dim, cfg.patch_size)
        self.pretrained_cfg = self.default_cfg = timm_data_cfg(cfg.num_classes, cfg.in_chans, cfg.image_hw, 0.9,
                                                                "patch_embed.proj")

    @property
    def alpha_h(self) -> float:
        return self.cfg.alpha_h

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default ViT initialisation (``init_weights_vit_timm``) with a zero head."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name == "head":
                    nn.init.zeros_(module.weight)
                else:
                    trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (``torch.utils.checkpoint``, non-reentrant)."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` and optionally a new pooling; ``cfg`` follows. As in timm, ``norm`` and
        ``fc_norm`` stay as built, so a model built from the new ``cfg`` differs where the pooling moved to or
        from ``"avg"``."""
        if global_pool is not None:
            if global_pool not in ("token", "avg", "") or (global_pool == "token" and self.cls_token is None):
                raise ValueError(f"global_pool {global_pool!r} is not available for this model")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.cfg = replace(self.cfg, num_classes=num_classes, global_pool=self.global_pool)
        self.head = new_head(self.embed_dim, num_classes, self.pos_embed, self.training)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The block input ``x_0 = [cls; patch_embed(img)] + pos_embed``, shape (B, prefix + N, D)."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_blocks(
        self, x: torch.Tensor, blocks: nn.ModuleList | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the blocks (all, or the first ones given) on the tokens ``x_0``: the states ``[x_0, ..., x_depth]``
        and hidden scores ``[h_0, ...]``.

        ``h_n`` (B, heads, N, N) is block ``n``'s pre-softmax score state, passed to block ``n + 1``.
        """
        states, scores, h = [x], [], None
        alpha_h = self.cfg.alpha_h
        for block in self.blocks if blocks is None else blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, h = checkpoint(block, x, h, alpha_h, use_reentrant=False)
            else:
                x, h = block(x, h, alpha_h)
            states.append(x)
            scores.append(h)
        return states, scores

    def forward_features(
        self, x: torch.Tensor, return_layers: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``norm(x_depth)``; with ``return_layers`` also the token states ``[x_0, ..., x_depth]`` (depth + 1 tensors
        of shape (B, prefix + N, D), before the final norm) for token-uniformity and rank-collapse measurements."""
        states, _ = self.forward_blocks(self.embed(x))
        out = self.norm(states[-1])
        return (out, states) if return_layers else out

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """timm's ``forward_intermediates``: the patch tokens after the blocks ``indices`` (the last n if an int,
        all if None; negative counts from the end), through ``norm`` if asked, as (B, C, H, W) (``"NCHW"``) or
        (B, N, C) (``"NLC"``), paired with their prefix tokens if ``return_prefix_tokens``; with the final normed
        tokens unless ``intermediates_only``."""
        take, last = take_blocks(len(self.blocks), indices, output_fmt)
        states, _ = self.forward_blocks(self.embed(x), self.blocks[: last + 1] if stop_early else None)
        taken = [self.norm(states[i + 1]) if norm else states[i + 1] for i in take]
        prefix = [y[:, : self.num_prefix_tokens] for y in taken]
        intermediates = token_maps([y[:, self.num_prefix_tokens :] for y in taken], output_fmt,
                                   self.patch_embed.grid_size)
        if return_prefix_tokens and self.num_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self.norm(states[-1]), intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norms, the head if asked); the kept indices."""
        return prune_blocks(self, indices, prune_norm, prune_head, head_norms=("fc_norm",))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------------------
# timm registration

_VIT_SIZES: dict[str, dict[str, Any]] = {
    # ViT-Tiny / ViT-Small widths with 4 x 4 patches on 28 x 28 (MNIST-like, 1 channel) and 32 x 32 (CIFAR-like) images
    "t4_28": dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "s4_28": dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=384, depth=12, num_heads=6),
    "t4_32": dict(img_size=32, in_chans=3, num_classes=10, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "s4_32": dict(img_size=32, in_chans=3, num_classes=10, patch_size=4, embed_dim=384, depth=12, num_heads=6),
}

# family -> default attention options. MHA: alpha_h = 0.2, the best alpha' of the paper's ViT-Tiny ablation
# (CIFAR-100, alpha = 0.5), with timm's residual skip; alpha = 0.5 only matters with skip="convex".
_VIT_FAMILIES: dict[str, dict[str, Any]] = {
    "hvit": dict(alpha_h=0.0, skip="residual", alpha=0.5),
    "mhavit": dict(alpha_h=0.2, skip="residual", alpha=0.5),
}

_VIT_FIELDS = frozenset(f.name for f in fields(ViTConfig))


def _build_vit(name: str, family: str, size: str, kwargs: dict[str, Any]) -> VisionTransformer:
    unknown = sorted(set(kwargs) - _VIT_FIELDS)
    if unknown:
        raise TypeError(
            f"{name}() got unexpected keyword arguments {unknown}; "
            f"it accepts the ViTConfig fields {sorted(_VIT_FIELDS)}"
        )
    return VisionTransformer(ViTConfig(**{**_VIT_SIZES[size], **_VIT_FAMILIES[family], **kwargs}))


def _make_vit_entrypoint(name: str, family: str, size: str) -> Callable[..., VisionTransformer]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return create_registered(name, pretrained, kwargs, lambda kw: _build_vit(name, family, size, kw))

    entrypoint.__doc__ = (
        f"{name}: VisionTransformer({_VIT_SIZES[size]}, {_VIT_FAMILIES[family]}). "
        "Keyword arguments override ViTConfig fields (num_classes, depth, alpha_h, skip, alpha, ...)."
    )
    return entrypoint


VIT_MODEL_NAMES: tuple[str, ...] = tuple(f"{family}_{size}" for family in _VIT_FAMILIES for size in _VIT_SIZES)

register_entrypoints({n: _make_vit_entrypoint(n, *n.split("_", 1)) for n in VIT_MODEL_NAMES}, globals())
