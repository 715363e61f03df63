"""Synapses: energy terms that couple layers through their activations g.

A synapse is any ``nn.Module`` with the names of the layers it couples and an ``energy(g)`` of shape
(batch,). The current it sends into layer A is -dE_syn/dg_A; the base class gets it by autograd, and
``DenseSynapse`` gives it in closed form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import Layer

__all__ = ["DenseSynapse", "Synapse"]


class Synapse(nn.Module):
    """Base class: couples the layers named in ``self.layers``; subclasses implement ``energy``.

    ``symmetric`` says whether the currents are the negative gradient of ``energy``. When False,
    ``energy`` is a pseudo-energy and descent is not guaranteed.
    """

    layers: tuple[str, ...] = ()
    symmetric: bool = True

    @property
    def name(self) -> str:
        return "-".join(self.layers)

    def bind(self, layers: dict[str, Layer]) -> None:
        """Called by ``Network`` with the coupled layers: check shapes and create parameters."""

    def energy(self, g: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def currents(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        """-dE_syn/dg_A for every coupled layer A, by autograd (differentiable when grad is enabled)."""
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            leaves = [g[n] if g[n].requires_grad else g[n].detach().requires_grad_(True) for n in self.layers]
            e = self.energy(dict(zip(self.layers, leaves))).sum()
            grads = torch.autograd.grad(e, leaves, create_graph=create_graph, allow_unused=True)
        return {
            n: (-gr if gr is not None else torch.zeros_like(x)) for n, gr, x in zip(self.layers, grads, leaves)
        }


def _contract(w: Tensor, g: Tensor, axis: int, transpose: bool = False) -> Tensor:
    """Apply W (n_out, n_in) -- or W^T when ``transpose`` -- along batched axis ``axis`` of g."""
    if axis == g.ndim - 1:
        return g @ w if transpose else g @ w.T
    if axis == g.ndim - 2:
        # a batched GEMM against the broadcast weight: torch.matmul would copy g transposed first
        m = w.T if transpose else w
        g3 = g.reshape(-1, g.shape[-2], g.shape[-1])
        out = torch.bmm(m.unsqueeze(0).expand(g3.shape[0], -1, -1), g3)
        return out.reshape(*g.shape[:-2], m.shape[0], g.shape[-1])
    out = torch.movedim(g, axis, -1)
    out = out @ w if transpose else out @ w.T
    return torch.movedim(out, -1, axis)


def _along(v: Tensor, axis: int, ndim: int) -> Tensor:
    """Reshape a vector so that it broadcasts along batched axis ``axis`` of a rank-``ndim`` tensor."""
    return v.reshape((-1,) + (1,) * (ndim - 1 - axis))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(-1)


class DenseSynapse(Synapse):
    """Dense coupling of layers a and b along one axis of their states; all other axes must match.

    Energy (Krotov 2021, Eq. 17, last term): E = -sum g_b[..., j, ...] W[j, i] g_a[..., i, ...] (- sum bias g_b),
    summed over every other axis. ``weight`` has shape (n_b, n_a). Currents: W g_a (+ bias) into b,
    W^T g_b into a.

    ``symmetric=False`` adds a separate feedback matrix ``weight_fb`` (n_a, n_b), and ``bias_fb`` with
    ``bias=True``: currents V g_b (+ bias_fb) into a. What ``energy`` then returns is the pseudo-energy
    -1/2 g_b.(W g_a) - 1/2 g_a.(V g_b) - bias.g_b - bias_fb.g_a, equal to the energy when V = W^T and
    bias_fb = 0; descent is not guaranteed.
    """

    def __init__(self, a: str, b: str, axis: int = -1, bias: bool = False, symmetric: bool = True, *,
                 weight: Tensor | None = None, init_std: float | None = None):
        super().__init__()
        if a == b:
            raise ValueError(f"DenseSynapse('{a}', '{b}'): a synapse must couple two different layers")
        if not isinstance(axis, int):
            raise TypeError(f"DenseSynapse('{a}', '{b}'): axis must be an int, got {axis!r}")
        self.layers = (a, b)
        self.axis = axis
        self.has_bias = bool(bias)
        self.symmetric = bool(symmetric)
        self._init_weight = weight
        self.init_std = init_std
        self._baxis: int | None = None  # axis of the batched state, set by bind

    def extra_repr(self) -> str:
        a, b = self.layers
        return f"{a!r} -> {b!r}, axis={self.axis}, bias={self.has_bias}, symmetric={self.symmetric}"

    def bind(self, layers: dict[str, Layer]) -> None:
        a, b = self.layers
        sa, sb = layers[a].shape, layers[b].shape
        where = f"DenseSynapse {self.name!r} (layer {a!r} of shape {sa}, layer {b!r} of shape {sb}, axis {self.axis})"
        if len(sa) != len(sb):
            raise ValueError(f"{where}: the two layers' states must have the same rank")
        rank = len(sa)
        if not -rank <= self.axis < rank:
            raise ValueError(f"{where}: axis is out of range for rank-{rank} states")
        ax = self.axis % rank
        other_a, other_b = sa[:ax] + sa[ax + 1:], sb[:ax] + sb[ax + 1:]
        if other_a != other_b:
            raise ValueError(
                f"{where}: all axes but the coupled one must match, got sizes {other_a} and {other_b}"
            )
        n_a, n_b = sa[ax], sb[ax]
        self._baxis = ax + 1
        if "weight" in self._parameters:  # already bound: the shapes must still fit
            if self.weight.shape != (n_b, n_a):
                raise ValueError(f"{where}: weight has shape {tuple(self.weight.shape)}, expected {(n_b, n_a)}")
            return
        std = self.init_std if self.init_std is not None else 1.0 / math.sqrt(n_a)
        if self._init_weight is not None:
            w = torch.as_tensor(self._init_weight).detach().clone()
            if not w.is_floating_point():
                w = w.to(torch.get_default_dtype())
            if w.shape != (n_b, n_a):
                raise ValueError(f"{where}: weight has shape {tuple(w.shape)}, expected (n_b, n_a) = {(n_b, n_a)}")
        else:
            w = torch.randn(n_b, n_a) * std
        self.weight = nn.Parameter(w)
        self._init_weight = None
        if self.has_bias:
            self.bias = nn.Parameter(torch.zeros(n_b))
        if not self.symmetric:
            self.weight_fb = nn.Parameter(torch.randn(n_a, n_b) * (1.0 / math.sqrt(n_b)))
            if self.has_bias:
                self.bias_fb = nn.Parameter(torch.zeros(n_a))

    def _forward_current(self, ga: Tensor) -> Tensor:
        out = _contract(self.weight, ga, self._baxis)
        if self.has_bias:
            out = out + _along(self.bias, self._baxis, ga.ndim)
        return out

    def _feedback_current(self, gb: Tensor) -> Tensor:
        if self.symmetric:
            return _contract(self.weight, gb, self._baxis, transpose=True)
        out = _contract(self.weight_fb, gb, self._baxis)
        if self.has_bias:
            out = out + _along(self.bias_fb, self._baxis, gb.ndim)
        return out

    def energy(self, g: dict[str, Tensor]) -> Tensor:
        a, b = self.layers
        ga, gb = g[a], g[b]
        if self.symmetric:
            return -_dot(gb, self._forward_current(ga))
        e = -0.5 * _dot(gb, _contract(self.weight, ga, self._baxis))
        e = e - 0.5 * _dot(ga, _contract(self.weight_fb, gb, self._baxis))
        if self.has_bias:
            e = e - _dot(gb, _along(self.bias, self._baxis, gb.ndim).expand_as(gb))
            e = e - _dot(ga, _along(self.bias_fb, self._baxis, ga.ndim).expand_as(ga))
        return e

    def currents(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        a, b = self.layers
        return {b: self._forward_current(g[a]), a: self._feedback_current(g[b])}
