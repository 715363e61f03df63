"""Derived Mixer-family blocks and models (their interop with timm and ``mixers``: ``derive.convert``).

Each block kind is a hierarchical Hopfield network on a token x channel state v (S, C) with the LayerNorm
Lagrangian (eps 1e-6) and GELU hidden layers, discretised by ``derive.discretize``:

| kind        | network (hidden layers; axis)                                   | splitting  | gives                  |
|-------------|-----------------------------------------------------------------|------------|------------------------|
| "mixer"     | s (T, C) on tokens, c (S, 4C) on channels, untied + biases      | sequential | timm's MixerBlock      |
|             | the same, LN Lagrangian over the matrix (norm="matrix"), no bias | sequential | authors' vanilla Mixer |
| "imixer"    | chain v - x (T, C) - h (T h_r, C) on tokens, c on channels      | sequential | iMixer block (Eq. 30)  |
| "limixer"   | chain v - x1 - ... - x_{L-1} on tokens, c on channels           | sequential | L-layer iMixer (Eq. 42)|
| "paramixer" | star s - v - c, tied / untied / broken, one shared LN affine     | parallel   | parallelized Mixer     |

LayerNorm affines (timm's per-channel gamma, beta; the parallelized Mixer's per-element ones) are not part
of any Lagrangian with a scalar gain: they sit on the forward side of the synapse leaving v
(``hopfield.Affine``): W (gamma * LN(v) + beta) = (W diag gamma) LN(v) + W beta. For the token synapse the
per-channel gamma is a diagonal factor along the other (channel) axis, for the channel synapse along its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hopfield import Network
from mixers.backbone import PatchStem, TimmClassifierAPI, blocks_feature_info, check_sizes, timm_data_cfg
from mixers.blocks import ratio_pair
from mixers.models import check_rates

from .discrete import DerivedBlock, DiscreteConfig
from .spec import LayerSpec, NetworkSpec, SynapseSpec, load_spec

__all__ = ["KINDS", "DerivedMixer", "DerivedMixerConfig", "block_network", "block_spec", "derived_block",
           "spec_block"]

KINDS = ("mixer", "imixer", "limixer", "paramixer")
LN_EPS = 1e-6


def block_spec(kind: str, mlp_ratio=(0.5, 4.0), *, h_ratio: float = 1.0, depth: int = 4, form: str = "untied",
               norm: str | None = None, bias: bool | None = None) -> NetworkSpec:
    """The spec of the network whose discrete-time limit is a ``kind`` block (see the module doc), in sizes of
    the model's S tokens and C channels.

    ``norm``: the visible layer's LayerNorm Lagrangian over channels per token (``"channel"``, timm's; the default
    but for the parallelized Mixer) or over the whole token x channel matrix (``"matrix"``, the parallelized-Mixer
    authors'; the parallelized Mixer's default and, with ``bias=False``, their serial ``vanillamixer``)."""
    if kind not in KINDS:
        raise ValueError(f"block_spec: kind must be one of {KINDS}, got {kind!r}")
    norm = norm if norm is not None else ("matrix" if kind == "paramixer" else "channel")
    if norm not in ("matrix", "channel"):
        raise ValueError(f"block_spec: norm must be 'matrix' or 'channel', got {norm!r}")
    if norm == "matrix" and kind in ("imixer", "limixer"):
        raise ValueError(f"block_spec: a {kind!r} block normalises per token (norm='channel'); 'matrix' is "
                         "for the mixer and paramixer kinds")
    form = {"symmetric": "tied", "symmetry_breaking": "broken"}.get(form, form)
    tokens_ratio, channels_ratio = ratio_pair(mlp_ratio)
    sizes: dict = {"T": f"int({tokens_ratio!r} * C)", "D": f"int({channels_ratio!r} * C)"}
    gelu = {"name": "gelu"}
    ln = {"name": "layernorm", "axis": -1 if norm == "channel" else [-2, -1], "eps": LN_EPS}
    affine_shape = ("C",) if norm == "channel" else ("S", "C")
    if kind == "paramixer":
        bias = False if bias is None else bias
        bias_fb = bias and form != "tied"  # a tied MLP's bias sits before its GELU only, to stay a gradient
        layers = {"v": LayerSpec(("S", "C"), ln, 1.0), "s": LayerSpec(("T", "C"), gelu, 0.01),
                  "c": LayerSpec(("S", "D"), gelu, 0.01)}
        syn = [SynapseSpec(("v", "s"), -2, form, bias, bias_fb, "norm"),  # one LayerNorm for both branches
               SynapseSpec(("v", "c"), -1, form, bias, bias_fb, "norm")]
        return NetworkSpec(layers, syn, visible="v", splitting="parallel", sizes=sizes,
                           affines={"norm": affine_shape}, kind=kind)
    bias = True if bias is None else bias
    if kind == "mixer":
        names, widths = ["s"], ["T"]
    elif kind == "imixer":
        names, widths = ["x", "h"], ["T", "H"]
        sizes["H"] = f"int(T * {float(h_ratio)!r})"
    else:
        if depth < 3:
            raise ValueError(f"block_spec: an L-layer iMixer needs depth >= 3, got {depth}")
        names, widths = [f"x{k}" for k in range(1, depth)], ["T"] + ["H"] * (depth - 2)
        sizes["H"] = f"int(T * {float(h_ratio)!r})"
    layers = {"v": LayerSpec(("S", "C"), ln, 1.0)}
    for k, (n, w) in enumerate(zip(names, widths), start=1):
        layers[n] = LayerSpec((w, "C"), gelu, 10.0 ** -k)
    layers["c"] = LayerSpec(("S", "D"), gelu, 0.1)
    chain = ["v", *names]
    syn = [SynapseSpec((a, b), -2, "untied", bias, bias, "norm1" if a == "v" else None)
           for a, b in zip(chain, chain[1:])]
    syn.append(SynapseSpec(("v", "c"), -1, "untied", bias, bias, "norm2"))
    return NetworkSpec(layers, syn, visible="v", splitting="sequential", sizes=sizes,
                       affines={"norm1": affine_shape, "norm2": affine_shape}, kind=kind)


def block_network(kind: str, seq_len: int, dim: int, mlp_ratio=(0.5, 4.0), **kwargs) -> Network:
    """The hierarchical Hopfield network whose discrete-time limit is a ``kind`` block: ``block_spec(kind,
    mlp_ratio, **kwargs).build(seq_len, dim)``."""
    return block_spec(kind, mlp_ratio, **kwargs).build(seq_len, dim)


def spec_block(spec, seq_len: int, dim: int, *, n_iter: int = 2, n_power: int = 8, coeff: float = 0.9,
               steps: int = 1, drop_path: float = 0.0, inner_norm: str = "spectral", alpha: float = 0.0,
               dt: float | None = None, tied_init: bool = False) -> DerivedBlock:
    """The derived block of a network spec (``derive.NetworkSpec``, its plain data, or a YAML file's path) for
    ``seq_len`` tokens of ``dim`` channels: the spec's network, discretised with its splitting and the
    ``DiscreteConfig`` options given here. ``tied_init`` starts its untied synapses at the tied point
    (``DerivedMixer.reset_parameters``). Every preset kind is built this way (``derived_block``)."""
    spec = load_spec(spec)
    net = spec.build(seq_len, dim)
    if tied_init and not any(syn.form == "untied" for syn in net.synapses):
        raise ValueError("tied_init starts untied synapses at the tied point; this network has none (its forms: "
                         f"{sorted({syn.form for syn in net.synapses})}), so there is no free feedback matrix to tie")
    cfg = DiscreteConfig(n_iter=n_iter, dt=dt, alpha=alpha, splitting=spec.splitting, groups=spec.groups,
                         inner_norm=inner_norm, coeff=coeff, n_power=n_power, drop_path=drop_path, steps=steps)
    block = DerivedBlock(net, spec.visible, cfg)
    block.kind = spec.kind
    block.tied_init = bool(tied_init)
    return block


def derived_block(kind: str, seq_len: int, dim: int, mlp_ratio=(0.5, 4.0), *, h_ratio: float = 1.0,
                  depth: int = 4, form: str = "untied", norm: str | None = None, bias: bool | None = None,
                  n_iter: int | None = None, n_power: int = 8, coeff: float = 0.9, steps: int = 1,
                  drop_path: float = 0.0, inner_norm: str = "spectral", tied_init: bool = False) -> DerivedBlock:
    """``kind``'s network discretised with its splitting: sequential (tokens, then channels) for the Mixer and
    iMixers, parallel for the parallelized Mixer. ``n_iter`` counts fixed-point iterations (iMixers only);
    ``steps`` repeats the whole Euler step with the same weights (the parallelized Mixer's n_iter);
    ``inner_norm`` normalises the matrices inside the iMixers' contractions (``DiscreteConfig.inner_norm``);
    ``tied_init`` marks an untied block to start at the tied point (``DerivedMixer.reset_parameters``)."""
    if n_iter is not None and kind in ("mixer", "paramixer"):
        raise ValueError(f"derived_block: a {kind!r} block has no fixed-point solve, so n_iter does not apply; "
                         "to repeat the block with the same weights use steps=")
    if inner_norm != "spectral" and kind in ("mixer", "paramixer"):
        raise ValueError(f"derived_block: a {kind!r} block has no fixed-point solve, so inner_norm does not apply")
    form = {"symmetric": "tied", "symmetry_breaking": "broken"}.get(form, form)
    if tied_init and form != "untied":
        raise ValueError(f"derived_block: tied_init starts untied synapses at the tied point; form {form!r} has no "
                         "free feedback matrix to tie")
    spec = block_spec(kind, mlp_ratio, h_ratio=h_ratio, depth=depth, form=form, norm=norm, bias=bias)
    return spec_block(spec, seq_len, dim, n_iter=2 if n_iter is None else n_iter, n_power=n_power, coeff=coeff,
                      steps=steps, drop_path=drop_path, inner_norm=inner_norm, tied_init=tied_init)


# ---------------------------------------------------------------------------------------------- full model
@dataclass
class DerivedMixerConfig:
    """A Mixer-family image classifier whose blocks are derived (fields as ``mixers.MixerConfig``): a preset
    ``block`` kind, or ``block="spec"`` with ``spec``, any network spec (``derive.NetworkSpec``; stored here as
    its plain data, so the config alone rebuilds the model). ``block_kwargs`` are the preset's options, or for a
    spec the ``derive.spec_block`` options (n_iter, inner_norm, coeff, n_power, steps, alpha, dt, tied_init)."""

    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    patch_size: int = 16
    num_blocks: int = 8
    embed_dim: int = 512
    mlp_ratio: float | tuple[float, float] = (0.5, 4.0)  # one number serves both MLPs
    block: str = "mixer"
    block_kwargs: dict = field(default_factory=dict)  # h_ratio, depth, form, norm, bias, n_iter, n_power, ...
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    lam: float = 0.0  # weight of the symmetry-breaking penalty (paramixer, form="broken")
    global_pool: str = "avg"  # "avg": mean over tokens; "": no pooling, the head acts on every token
    spec: dict | None = None  # the network spec's plain data, with block="spec"

    def __post_init__(self):
        if self.block not in (*KINDS, "spec"):
            raise ValueError(f"DerivedMixerConfig.block must be one of {(*KINDS, 'spec')}, got {self.block!r}")
        if (self.block == "spec") != (self.spec is not None):
            raise ValueError("DerivedMixerConfig: block='spec' goes with a network spec (spec=...), and a spec "
                             f"with block='spec'; got block={self.block!r} and spec={'given' if self.spec else None}")
        if self.spec is not None:
            self.spec = load_spec(self.spec).to_dict()
        if self.global_pool not in ("avg", ""):
            raise ValueError(f"DerivedMixerConfig.global_pool must be 'avg' or '', got {self.global_pool!r}")
        check_sizes(self, ("in_chans", "patch_size", "num_blocks", "embed_dim"),
                    {"mlp_ratio": self.mlp_ratio, **{f"block_kwargs.{k}": v for k, v in self.block_kwargs.items()
                                                     if k == "h_ratio"}})
        check_rates(self)
        if self.img_size % self.patch_size:
            raise ValueError(f"DerivedMixerConfig: img_size {self.img_size} is not a multiple of patch_size "
                             f"{self.patch_size}")


class DerivedMixer(TimmClassifierAPI, nn.Module):
    """Patch embedding, derived blocks, final LayerNorm, mean over tokens (``global_pool="avg"``), linear head:
    timm's layout and names, and timm's model API as ``mixers.MlpMixer`` has it (``num_features``, ``global_pool``,
    ``get_classifier``, ``reset_classifier``, ``set_grad_checkpointing``, ``forward_intermediates``,
    ``feature_info``)."""

    def __init__(self, cfg: DerivedMixerConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or DerivedMixerConfig(**kwargs)
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.embed_dim
        self.grad_checkpointing = False
        self.seq_len = (cfg.img_size // cfg.patch_size) ** 2
        self.stem = PatchStem((cfg.img_size, cfg.img_size), cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.blocks = nn.Sequential(*[self._make_block() for _ in range(cfg.num_blocks)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()
        self.feature_info = blocks_feature_info(cfg.num_blocks, cfg.embed_dim, cfg.patch_size)
        self.pretrained_cfg = self.default_cfg = timm_data_cfg(cfg.num_classes, cfg.in_chans, (cfg.img_size,) * 2,
                                                               0.875, "stem.proj")

    def _make_block(self) -> DerivedBlock:
        cfg = self.cfg
        if cfg.spec is not None:
            return spec_block(cfg.spec, self.seq_len, cfg.embed_dim, drop_path=cfg.drop_path_rate, **cfg.block_kwargs)
        return derived_block(cfg.block, self.seq_len, cfg.embed_dim, cfg.mlp_ratio, drop_path=cfg.drop_path_rate,
                             **cfg.block_kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's Mixer init: xavier-uniform interactions, ~0 biases, LeCun-normal stem, zero head."""
        for name, p in self.named_parameters():
            if ".net.synapses." in name:  # interactions and biases (LayerNorm affines and BatchNorms keep theirs)
                if name.endswith(("weight", "weight_fb", "weight_break")) and ".affine." not in name:
                    nn.init.xavier_uniform_(p)
                elif name.endswith(("bias", "bias_fb")) and ".affine." not in name:
                    nn.init.normal_(p, std=1e-6)
        for block in self.blocks:
            if getattr(block, "tied_init", False):  # feedback = forward matrix^T: the tied point
                for syn in block.net.synapses:
                    syn.weight_fb.copy_(syn.weight.T)
        w = self.stem.proj.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
        nn.init.zeros_(self.stem.proj.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def penalty(self) -> Tensor:
        """lam * sum ||W_break||^2 over the blocks: add it to the training loss."""
        if not self.cfg.lam:
            return torch.zeros((), device=self.head.weight.device if isinstance(self.head, nn.Linear) else None)
        return self.cfg.lam * sum(b.penalty() for b in self.blocks)

    def explain(self, latex: bool = False) -> str:
        return self.blocks[0].explain(latex)
