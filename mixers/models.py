"""The MLP-Mixer model, with timm's structure and state-dict names, and its registered names.

- `MlpMixer` (configured by `MixerConfig`): patch stem, blocks (`mixers.blocks`), final LayerNorm, mean pooling,
  linear head.

Importing this module registers the model names of `MODEL_NAMES` with timm (``timm.create_model("imixer_s16_224")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from timm.layers import lecun_normal_
from torch import nn

from .backbone import (
    ImageGrid,
    PatchStem,
    TimmClassifierAPI,
    blocks_feature_info,
    check_dropout,
    check_sizes,
    create_registered,
    register_entrypoints,
    split_kwargs,
    timm_data_cfg,
)
from .blocks import MixerBlock, ParaMixerBlock, ratio_pair
from .layers import SpectralNormLinear

__all__ = ["BLOCK_TYPES", "MODEL_NAMES", "SIZES", "MixerConfig", "MlpMixer", "check_rates"]


BLOCK_TYPES = ("mixer", "imixer", "limixer", "paramixer")


def check_rates(cfg) -> None:
    """ValueError naming the config class and field unless every dropout rate lies in [0, 1), ``lam`` is a finite
    number >= 0, ``block_kwargs``' ``n_iter``, when given, an integer >= 0 and an L-layer iMixer's ``depth`` one >= 3.
    """
    where = type(cfg).__name__
    check_dropout(cfg, ("drop_rate", "proj_drop_rate", "drop_path_rate"))
    lam = cfg.lam
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"{where}.lam (the weight of the symmetry-breaking penalty) must be a finite number >= 0, "
                         f"got {lam!r}")
    n_iter = cfg.block_kwargs.get("n_iter")
    if n_iter is not None and (isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0):
        raise ValueError(f"{where}.block_kwargs.n_iter must be an integer >= 0, got {n_iter!r}")
    depth = cfg.block_kwargs.get("depth")
    if cfg.block == "limixer" and depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                                                         or depth < 3):
        raise ValueError(f"{where}.block_kwargs.depth (the layers of the L-layer iMixer's token chain, the visible "
                         f"one included) must be an integer >= 3, got {depth!r}")


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
