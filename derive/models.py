"""Derived Mixer-family blocks and models, and their interop with timm and the hand-written ``mixers``.

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
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from hopfield import Network
from mixers.backbone import PatchStem, TimmClassifierAPI, blocks_feature_info, check_sizes, timm_data_cfg
from mixers.blocks import ratio_pair
from mixers.models import check_rates

from .discrete import DerivedBlock, DiscreteConfig
from .spec import LayerSpec, NetworkSpec, SynapseSpec, load_spec

__all__ = ["KINDS", "DerivedMixer", "DerivedMixerConfig", "block_network", "block_spec", "derived_block",
           "from_reference", "from_timm", "load_reference_block", "spec_block", "to_reference", "to_timm"]

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


# ---------------------------------------------------------------------------------------------- name maps
def _block_map(block: DerivedBlock) -> list[tuple[str, str]]:
    """(derived key, reference key) pairs for one block; reference names are timm's / the mixers package's."""
    kind = getattr(block, "kind", None)
    syns = list(block.net.synapses)
    pairs: list[tuple[str, str]] = []

    def linear(i: int, ref_w: str, ref_b: str | None, attr_w="weight", attr_b="bias"):
        pairs.append((f"net.synapses.{i}.{attr_w}", ref_w))
        if ref_b is not None and getattr(syns[i], "has_" + attr_b):
            pairs.append((f"net.synapses.{i}.{attr_b}", ref_b))

    def affine(i: int, norm: str):
        pairs.extend([(f"net.synapses.{i}.affine.weight", f"{norm}.weight"),
                      (f"net.synapses.{i}.affine.bias", f"{norm}.bias")])

    def mlp(i: int, prefix: str, norm: str):
        linear(i, f"{prefix}.fc1.weight", f"{prefix}.fc1.bias")
        linear(i, f"{prefix}.fc2.weight", f"{prefix}.fc2.bias", "weight_fb", "bias_fb")
        affine(i, norm)

    def spectral(key: str, ref: str):
        pairs.extend([(f"spectral.{key}.weight_{s}", f"{ref}.weight_{s}") for s in ("u", "v", "sigma")])

    def batch_norm(key: str, ref: str):
        pairs.extend([(f"batch_norm.{key}.{s}", f"{ref}.norm.{s}")
                      for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")])

    if kind == "mixer":
        mlp(0, "mlp_tokens", "norm1")
        mlp(1, "mlp_channels", "norm2")
    elif kind in ("imixer", "limixer"):
        n_hidden = len(syns) - 2  # chain synapses after v - x1
        mlp(0, "mlp_tokens", "norm1")
        n_sn = 2 * n_hidden
        for k in range(1, n_hidden + 1):
            down, up = f"mlp_tokens.fc_sn{k}", f"mlp_tokens.fc_sn{n_sn + 1 - k}"
            a, b = syns[k].layers
            w = "weight_orig" if f"{a}_{b}" in block.spectral else "weight"  # SpectralNormLinear or nn.Linear
            linear(k, f"{down}.{w}", f"{down}.bias")
            linear(k, f"{up}.{w}", f"{up}.bias", "weight_fb", "bias_fb")
            if f"{a}_{b}" in block.spectral:
                spectral(f"{a}_{b}", down)
                spectral(f"{a}_{b}_fb", up)
            if f"{a}_{b}" in block.batch_norm:
                batch_norm(f"{a}_{b}", down)
                batch_norm(f"{a}_{b}_fb", up)
        mlp(len(syns) - 1, "mlp_channels", "norm2")
    elif kind == "paramixer":
        for i, prefix in enumerate(("mlp_tokens", "mlp_channels")):
            syn = syns[i]
            if syn.form == "untied":
                linear(i, f"{prefix}.fc1.weight", f"{prefix}.fc1.bias")
                linear(i, f"{prefix}.fc2.weight", f"{prefix}.fc2.bias", "weight_fb", "bias_fb")
            elif syn.form == "tied":
                linear(i, f"{prefix}.fc2.weight", f"{prefix}.fc2.bias")
            else:
                linear(i, f"{prefix}.fc1.weight", f"{prefix}.fc1.bias")
                linear(i, f"{prefix}.fc2.weight", f"{prefix}.fc2.bias", "weight_break", "bias_fb")
            affine(i, "norm")
    else:
        raise ValueError(f"no reference names for a block of kind {kind!r}")
    return pairs


def _model_map(model: DerivedMixer) -> list[tuple[str, str]]:
    pairs = [(k, k) for k in ("stem.proj.weight", "stem.proj.bias", "norm.weight", "norm.bias")]
    if isinstance(model.head, nn.Linear):
        pairs += [("head.weight", "head.weight"), ("head.bias", "head.bias")]
    for i, b in enumerate(model.blocks):
        pairs += [(f"blocks.{i}.{d}", f"blocks.{i}.{r}") for d, r in _block_map(b)]
    return pairs


@torch.no_grad()
def _copy(dst: nn.Module, src_sd: dict[str, Tensor], pairs, reverse: bool, what: str) -> None:
    dst_sd = dst.state_dict(keep_vars=True)
    used = {d if reverse else r for d, r in pairs}
    unused = sorted(k for k in src_sd if k not in used)
    if unused:
        raise ValueError(f"{what}: the source has entries with no counterpart here, e.g. {unused[:4]}; "
                         "is it a different kind of block?")
    written = {(r if reverse else d) for d, r in pairs}
    unset = sorted(k for k in dst_sd if k not in written)
    if unset:
        raise ValueError(f"{what}: nothing in the source sets {unset[:4]}; is it a different kind of block?")
    for d, r in pairs:
        to, frm = (r, d) if reverse else (d, r)
        if frm not in src_sd:
            raise KeyError(f"{what}: the source has no {frm!r}")
        if to not in dst_sd:
            raise KeyError(f"{what}: the destination has no {to!r}")
        if dst_sd[to].shape != src_sd[frm].shape:
            raise ValueError(f"{what}: {frm!r} has shape {tuple(src_sd[frm].shape)}, {to!r} expects "
                             f"{tuple(dst_sd[to].shape)}")
        dst_sd[to].copy_(src_sd[frm])


def load_reference_block(block: DerivedBlock, ref: nn.Module) -> DerivedBlock:
    """Copy a hand-written block's weights (timm / ``mixers`` names) into the derived ``block``."""
    _copy(block, ref.state_dict(), _block_map(block), False, f"load_reference_block({type(ref).__name__})")
    return block


def _timm_config(model: nn.Module) -> DerivedMixerConfig:
    """The derived config of a timm MlpMixer, read from its modules: timm keeps no config object."""
    conv, first = model.stem.proj, model.blocks[0]
    dim, patch = conv.out_channels, conv.kernel_size[0]
    if first.norm1.eps != LN_EPS:
        raise ValueError(f"from_timm: LayerNorm eps {first.norm1.eps} differs from {LN_EPS}")
    proj_drop = sorted({m.p for m in model.blocks.modules() if isinstance(m, nn.Dropout) and m.p})
    if proj_drop:
        raise ValueError(f"from_timm: proj_drop_rate {proj_drop[-1]} (dropout inside the MLPs) has no derived "
                         "counterpart")
    path_rates = sorted({float(getattr(b.drop_path, "drop_prob", 0.0)) for b in model.blocks})
    if len(path_rates) > 1:
        raise ValueError(f"from_timm: the blocks' drop_path rates differ ({path_rates}); a derived model has one "
                         "drop_path_rate")
    seq_len = first.mlp_tokens.fc1.in_features
    return DerivedMixerConfig(
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        img_size=round(math.sqrt(seq_len)) * patch, in_chans=conv.in_channels, patch_size=patch,
        num_blocks=len(model.blocks), embed_dim=dim, block="mixer",
        mlp_ratio=(first.mlp_tokens.fc1.out_features / dim, first.mlp_channels.fc1.out_features / dim),
        drop_rate=model.head_drop.p, drop_path_rate=path_rates[0], global_pool=model.global_pool)


def _twin(model: nn.Module, like: nn.Module, pairs, reverse: bool, what: str) -> nn.Module:
    """``model`` on ``like``'s dtype and device, in its train/eval mode, holding its weights."""
    ref = next(like.parameters())
    model = model.to(dtype=ref.dtype, device=ref.device).train(like.training)
    _copy(model, like.state_dict(), pairs, reverse, what)
    return model


def from_timm(model: nn.Module) -> DerivedMixer:
    """A timm ``mixer_*`` model (timm.models.mlp_mixer.MlpMixer with MixerBlocks, any size and weights) as the
    equivalent derived model: the same logits, its LayerNorm affines folded into the token and channel synapses.
    It takes the source's drop rates and train/eval mode."""
    from timm.models.mlp_mixer import MixerBlock, MlpMixer

    if not isinstance(model, MlpMixer) or not all(isinstance(b, MixerBlock) for b in model.blocks):
        raise TypeError(f"from_timm expects a timm MlpMixer made of MixerBlocks, got {type(model).__name__}")
    derived = DerivedMixer(_timm_config(model))
    return _twin(derived, model, _model_map(derived), False, "from_timm")


def _expect_derived(derived, where: str) -> None:
    if not isinstance(derived, DerivedMixer):
        raise TypeError(f"{where} expects a derived model (derive.DerivedMixer: from_timm(...), from_reference(...) "
                        f"or timm.create_model('derived_...')), got {type(derived).__name__}")


def to_timm(derived: DerivedMixer) -> nn.Module:
    """The timm MlpMixer equal to a derived ``mixer`` model (the inverse of ``from_timm``)."""
    from timm.models.mlp_mixer import MlpMixer

    _expect_derived(derived, "to_timm")
    cfg = derived.cfg
    if cfg.block != "mixer":
        raise ValueError(f"to_timm: only block='mixer' has a timm twin, this model's block is {cfg.block!r}; "
                         "use to_reference for the mixers package's modules")
    model = MlpMixer(num_classes=cfg.num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans,
                     patch_size=cfg.patch_size, num_blocks=cfg.num_blocks, embed_dim=cfg.embed_dim,
                     mlp_ratio=cfg.mlp_ratio, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate,
                     global_pool=cfg.global_pool)
    return _twin(model, derived, _model_map(derived), True, "to_timm")


def from_reference(model: nn.Module) -> DerivedMixer:
    """A hand-written ``mixers.MlpMixer`` (any block kind) as the equivalent derived model, in the same
    train/eval mode.

    Names differ in one place: the Mixer's and the parallelized Mixer's ``n_iter`` (repeats of the block with the
    same weights) is the derived block's ``steps`` (Euler steps); ``n_iter`` of a derived block counts fixed-point
    iterations.
    """
    import mixers

    if not isinstance(model, mixers.MlpMixer):
        timm_mixer = hasattr(model, "stem") and not hasattr(model, "cfg")
        raise TypeError(f"from_reference expects a mixers.MlpMixer (timm.create_model('imixer_t4_28'), ...), got "
                        f"{type(model).__module__}.{type(model).__qualname__}"
                        + (": for timm's own Mixer use from_timm" if timm_mixer else ""))
    rcfg = model.cfg
    if isinstance(rcfg.img_size, (tuple, list)):
        if len(set(rcfg.img_size)) != 1:
            raise ValueError(f"from_reference: non-square img_size {tuple(rcfg.img_size)} is not supported")
    if getattr(rcfg, "proj_drop_rate", 0.0):
        raise ValueError("from_reference: proj_drop_rate (dropout inside the MLPs) has no derived counterpart")
    kw = dict(rcfg.block_kwargs)
    if rcfg.block in ("mixer", "paramixer") and "n_iter" in kw:  # repeats of the block: Euler steps
        kw["steps"] = kw.pop("n_iter")
    fields = {k: v for k, v in asdict(rcfg).items() if k in DerivedMixerConfig.__dataclass_fields__
              and k not in ("block_kwargs", "block")}
    if isinstance(fields["img_size"], (tuple, list)):
        fields["img_size"] = int(fields["img_size"][0])
    derived = DerivedMixer(DerivedMixerConfig(**fields, block=rcfg.block, block_kwargs=kw))
    return _twin(derived, model, _model_map(derived), False, "from_reference")


def to_reference(derived: DerivedMixer) -> nn.Module:
    """The hand-written ``mixers.MlpMixer`` equal to a derived model, in the same train/eval mode."""
    import mixers

    _expect_derived(derived, "to_reference")
    cfg = derived.cfg
    kw = dict(cfg.block_kwargs)
    if cfg.block in ("mixer", "paramixer"):
        kw.pop("n_iter", None)
        if "steps" in kw:
            kw["n_iter"] = kw.pop("steps")
    rcfg = mixers.MixerConfig(num_classes=cfg.num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans,
                              patch_size=cfg.patch_size, num_blocks=cfg.num_blocks, embed_dim=cfg.embed_dim,
                              mlp_ratio=cfg.mlp_ratio, block=cfg.block, block_kwargs=kw, drop_rate=cfg.drop_rate,
                              drop_path_rate=cfg.drop_path_rate, lam=cfg.lam, global_pool=cfg.global_pool)
    return _twin(mixers.MlpMixer(rcfg), derived, _model_map(derived), True, "to_reference")
