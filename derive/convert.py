"""Derived blocks and models to and from their twins: timm's Mixer (``from_timm``, ``to_timm``) and the hand-written
``mixers`` modules (``from_reference``, ``to_reference``, ``load_reference_block``), by name maps between their
state dicts. The twins give the same outputs: tests/test_equivalence.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
from torch import Tensor, nn

from .discrete import DerivedBlock
from .models import LN_EPS, DerivedMixer, DerivedMixerConfig

__all__ = ["from_reference", "from_timm", "load_reference_block", "to_reference", "to_timm"]


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
