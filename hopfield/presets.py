"""Ready-made networks: Krotov's chain of any depth and the networks behind the Mixer family.

Token x channel states have shape (S, C). A synapse along ``axis=-2`` mixes tokens (one weight shared by
every channel, as a Mixer token MLP), along ``axis=-1`` it mixes channels (shared by every token). The
visible layer's Lagrangian is a LayerNorm over channels per token (timm's convention, ``norm_axis=-1``)
or over the whole S x C matrix (``norm_axis=(-2, -1)``, the parallelized-Mixer authors' convention);
hidden layers default to the GELU Lagrangian whose activation is the Mixers' GELU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import lagrangians as lag
from .lagrangians import Lagrangian
from .lagrangians.base import _real
from .layers import Layer
from .network import Network
from .synapses import DenseSynapse

__all__ = ["chain", "imixer_chain", "lchain", "mixing", "spectral_rescale", "star"]


def _shape(other: Sequence[int], axis: int, n: int) -> tuple[int, ...]:
    shape = list(other)
    pos = axis if axis >= 0 else len(other) + 1 + axis
    if not 0 <= pos <= len(other):
        raise ValueError(f"axis {axis} does not fit states with {len(other)} other axes")
    shape.insert(pos, n)
    return tuple(shape)


def chain(sizes: Sequence[int], *, other: Sequence[int] = (), axis: int = -1,
          lagrangians: Sequence[Lagrangian] | None = None, taus: Sequence[float] | None = None,
          names: Sequence[str] | None = None, symmetric: bool = True, bias: bool = False) -> Network:
    """Krotov's hierarchical network (2021, Eqs. 14-17): layers 0 - 1 - ... - (L-1), neighbours coupled.

    Layer k has ``sizes[k]`` units along ``axis`` and the sizes ``other`` along its remaining axes.
    Defaults: layer 0 LayerNorm over ``axis``, the others ReLU; tau_k = 10^-k; names v, x1, x2, ... (layer 0 is the
    visible layer, named as everywhere else).
    """
    depth = len(sizes)
    if depth < 2:
        raise ValueError(f"chain needs at least 2 layers, got sizes {list(sizes)}")
    names = list(names) if names is not None else ["v"] + [f"x{k}" for k in range(1, depth)]
    lagrangians = list(lagrangians) if lagrangians is not None else (
        [lag.layernorm(axis=axis)] + [lag.relu() for _ in range(depth - 1)])
    taus = list(taus) if taus is not None else [10.0 ** -k for k in range(depth)]
    for what, seq in (("names", names), ("lagrangians", lagrangians), ("taus", taus)):
        if len(seq) != depth:
            raise ValueError(f"chain: {what} has {len(seq)} entries for {depth} layers")
    layers = {n: Layer(_shape(other, axis, s), L, tau) for n, s, L, tau in zip(names, sizes, lagrangians, taus)}
    synapses = [DenseSynapse(a, b, axis=axis, symmetric=symmetric, bias=bias) for a, b in zip(names, names[1:])]
    return Network(layers, synapses)


def mixing(tokens: int = 196, channels: int = 512, hidden: int | None = None, *, axis: int = -2,
           hidden_lagrangian: Lagrangian | None = None, norm_axis=-1, taus=(1.0, 0.01),
           symmetric: bool = True, bias: bool = False) -> Network:
    """The 2-layer network behind one Mixer mixing step (iMixer paper Sec. 3.2, Eqs. 8-14): v - h.

    ``axis=-2``: token mixing, h of shape (hidden, C), hidden defaults to C/2 (Mixer's tokens_dim);
    ``axis=-1``: channel mixing, h of shape (S, hidden), hidden defaults to 4C.
    """
    if axis not in (-1, -2):
        raise ValueError(f"mixing: axis must be -2 (tokens) or -1 (channels), got {axis}")
    if hidden is None:
        hidden = channels // 2 if axis == -2 else 4 * channels
    sizes = [tokens, hidden] if axis == -2 else [channels, hidden]
    other = (channels,) if axis == -2 else (tokens,)
    return chain(sizes, other=other, axis=axis, names=["v", "h"], taus=taus, symmetric=symmetric, bias=bias,
                 lagrangians=[lag.layernorm(axis=norm_axis), hidden_lagrangian or lag.gelu()])


def spectral_rescale(net: Network, coeff: float, skip: int = 1) -> Network:
    """Scale the weight of every synapse after the first ``skip`` to spectral norm ``coeff`` (in place).

    Between two unbounded (GELU) layers a synapse of norm s gives a loop gain of about (1.13 s)^2; above 1
    the energy is unbounded below and the state diverges. The iMixer bounds it the same way (spectral
    normalisation of its F block, coeff 0.9).
    """
    coeff = _real("spectral_rescale(coeff)", coeff)
    with torch.no_grad():
        for syn in list(net.synapses)[skip:]:
            norm = torch.linalg.matrix_norm(syn.weight, ord=2)
            if not (torch.isfinite(norm) and norm > 0):  # 0: the division would fill the weight with NaN
                raise ValueError(f"spectral_rescale: synapse {syn.name!r} has a weight of spectral norm {float(norm)}; "
                                 "only a finite, non-zero weight can be scaled to a given norm")
            syn.weight.mul_(coeff / norm)
    return net


def lchain(widths: Sequence[int], *, tokens: int = 196, channels: int = 512, axis: int = -2,
           hidden_lagrangian: Lagrangian | None = None, norm_axis=-1, taus: Sequence[float] | None = None,
           symmetric: bool = True, bias: bool = False, coeff: float | None = 0.9) -> Network:
    """The L-layer chain v - x1 - ... - x_{L-1} behind the L-layer iMixer (iMixer paper Appendix B).

    ``widths`` are the hidden layers' sizes along ``axis`` (tokens for -2); layer names v, x1, x2, ...
    and time constants 10^-k by default (each layer faster than the one before: the adiabatic order).
    Synapses between hidden layers start at spectral norm ``coeff`` (None: leave them as drawn).
    """
    widths = list(widths)
    if not widths:
        raise ValueError("lchain needs at least one hidden width")
    if axis not in (-1, -2):
        raise ValueError(f"lchain: axis must be -2 (tokens) or -1 (channels), got {axis}")
    first = tokens if axis == -2 else channels
    other = (channels,) if axis == -2 else (tokens,)
    names = ["v"] + [f"x{k}" for k in range(1, len(widths) + 1)]
    hid = hidden_lagrangian or lag.gelu()
    net = chain([first, *widths], other=other, axis=axis, names=names, taus=taus, symmetric=symmetric,
                bias=bias, lagrangians=[lag.layernorm(axis=norm_axis)] + [hid] * len(widths))
    return net if coeff is None else spectral_rescale(net, coeff)


def imixer_chain(tokens: int = 196, channels: int = 512, internal: int | None = None, hidden: int | None = None,
                 *, hidden_lagrangian: Lagrangian | None = None, norm_axis=-1, taus=(1.0, 0.1, 0.01),
                 symmetric: bool = True, bias: bool = False, coeff: float | None = 0.9) -> Network:
    """The 3-layer token chain v - x - h of the iMixer (iMixer paper Sec. 4, Eqs. 15-19).

    v (S, C) LayerNorm; x (internal, C) and h (hidden, C) GELU by default; internal = C/2 and
    hidden = internal (h_ratio 1) by default; tau_v >> tau_x >> tau_h; the x - h weight starts at
    spectral norm ``coeff`` as the iMixer's F block.
    """
    internal = channels // 2 if internal is None else internal  # (0 is an error of Layer's, not the default)
    hidden = internal if hidden is None else hidden
    hid = hidden_lagrangian or lag.gelu()
    net = chain([tokens, internal, hidden], other=(channels,), axis=-2, names=["v", "x", "h"], taus=taus,
                symmetric=symmetric, bias=bias, lagrangians=[lag.layernorm(axis=norm_axis), hid, hid])
    return net if coeff is None else spectral_rescale(net, coeff)


def star(tokens: int = 196, channels: int = 512, token_hidden: int | None = None,
         channel_hidden: int | None = None, *, hidden_lagrangian: Lagrangian | None = None, norm_axis=-1,
         taus=(1.0, 0.01, 0.01), symmetric: bool = True, bias: bool = False) -> Network:
    """The star s - v - c behind the parallelized Mixer (Karakida, Ota, Taki 2024): a token hidden layer
    s (token_hidden, C) and a channel hidden layer c (S, channel_hidden), both coupled only to v."""
    token_hidden = channels // 2 if token_hidden is None else token_hidden
    channel_hidden = 4 * channels if channel_hidden is None else channel_hidden
    hid = hidden_lagrangian or lag.gelu()
    tau_v, tau_s, tau_c = taus
    layers = {
        "v": Layer((tokens, channels), lag.layernorm(axis=norm_axis), tau_v),
        "s": Layer((token_hidden, channels), hid, tau_s),
        "c": Layer((tokens, channel_hidden), hid, tau_c),
    }
    synapses = [DenseSynapse("v", "s", axis=-2, symmetric=symmetric, bias=bias),
                DenseSynapse("v", "c", axis=-1, symmetric=symmetric, bias=bias)]
    return Network(layers, synapses)
