"""Synapses: energy terms that couple layers through their activations g.

A synapse is any ``nn.Module`` with the names of the layers it couples and an ``energy(g)`` of shape
(batch,). The current it sends into layer A is -dE_syn/dg_A; the base class gets it by autograd, and
``DenseSynapse`` gives it in closed form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .lagrangians.base import _fast_dot as _dot  # per-sample <a, b> without a state-sized temporary
from .layers import Layer

__all__ = ["Affine", "DenseSynapse", "Synapse"]

FORMS = ("tied", "untied", "broken")


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

    def caveats(self) -> list[str]:
        """Why this synapse's currents are not the negative gradient of its ``energy``; empty when they are."""
        return [] if self.symmetric else [f"synapse {self.name!r} is asymmetric: its energy is a pseudo-energy"]

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



class Affine(nn.Module):
    """g -> weight * g + bias, with ``weight`` and ``bias`` of ``shape`` broadcast against a layer state.

    A LayerNorm affine (timm's per-channel gamma, beta; the parallelized Mixer's per-element one) is not the
    gradient of any Lagrangian with a scalar gain, so it lives here, on the synapse side of the visible
    layer: W (gamma * LN(v) + beta) = (W diag gamma) LN(v) + W beta. One ``Affine`` may be shared by
    several synapses (one LayerNorm feeding two branches).
    """

    def __init__(self, shape: int | tuple[int, ...]):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, g: Tensor) -> Tensor:
        return torch.addcmul(self.bias, g, self.weight)

    def has_unit_gain(self) -> bool:
        """gamma == 1 everywhere: then a tied synapse's feedback W^T g_b is still the energy's gradient."""
        return bool(torch.all(self.weight.detach() == 1))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


class DenseSynapse(Synapse):
    """Dense coupling of layers a and b along one axis of their states; all other axes must match.

    Energy (Krotov 2021, Eq. 17, last term): E = -sum g_b[..., j, ...] W[j, i] g_a[..., i, ...] (- sum bias g_b),
    summed over every other axis. ``weight`` has shape (n_b, n_a). Currents: W g_a (+ bias) into b,
    W^T g_b into a.

    The feedback current into a has one of three forms (``form``; ``symmetric`` is a shorthand for
    "tied" / "untied"):

    - ``"tied"``: W^T g_b, the energy's own gradient (Krotov's symmetric synapse);
    - ``"untied"``: a free matrix ``weight_fb`` V (n_a, n_b): V g_b;
    - ``"broken"``: (W^T + ``weight_break``) g_b, the parallelized Mixer's symmetry-breaking term W2
      (Karakida, Ota, Taki 2024), starting at 0 so that it begins as the tied synapse.

    ``bias`` adds a current into b, ``bias_fb`` one into a (by default only when the form is not tied).
    ``affine`` (a shape, or an ``Affine`` to share) puts gamma * g_a + beta in place of g_a in the forward
    current, W (gamma * g_a + beta) + bias: a LayerNorm affine folded into the interaction. Unless the form
    is tied and the gain 1 (beta and the biases are fine), ``energy`` is a pseudo-energy:
    -1/2 g_b.(W g~_a) - 1/2 g_a.(V g_b) - bias.g_b - bias_fb.g_a with g~_a = gamma * g_a + beta and V the
    feedback matrix; ``caveats`` says why, and descent is not guaranteed.
    """

    def __init__(self, a: str, b: str, axis: int = -1, bias: bool = False, symmetric: bool = True, *,
                 form: str | None = None, bias_fb: bool | None = None, affine: tuple[int, ...] | Affine | None = None,
                 weight: Tensor | None = None, init_std: float | None = None):
        super().__init__()
        where = f"DenseSynapse('{a}', '{b}')"
        if a == b:
            raise ValueError(f"{where}: a synapse must couple two different layers")
        if not isinstance(axis, int):
            raise TypeError(f"{where}: axis must be an int, got {axis!r}")
        for name, flag in (("bias", bias), ("symmetric", symmetric), ("bias_fb", bias_fb)):
            if not (isinstance(flag, bool) or (name == "bias_fb" and flag is None)):
                raise TypeError(f"{where}: {name} must be True or False, got {flag!r}")
        form = form if form is not None else ("tied" if symmetric else "untied")
        if form not in FORMS:
            raise ValueError(f"{where}: form must be one of {FORMS}, got {form!r}")
        self.layers = (a, b)
        self.axis = axis
        self.form = form
        self.symmetric = form == "tied"
        self.has_bias = bool(bias)
        self.has_bias_fb = bool(bias and form != "tied") if bias_fb is None else bool(bias_fb)
        if affine is None or isinstance(affine, Affine):
            self.affine = affine
        else:
            self.affine = Affine(affine)
        self._init_weight = weight
        self.init_std = init_std
        self._baxis: int | None = None  # axis of the batched state, set by bind

    def extra_repr(self) -> str:
        a, b = self.layers
        return (f"{a!r} -> {b!r}, axis={self.axis}, form={self.form!r}, bias={self.has_bias}, "
                f"bias_fb={self.has_bias_fb}")

    def caveats(self) -> list[str]:
        why = []
        if self.form == "untied":
            why.append("its feedback matrix is free (untied)")
        elif self.form == "broken":
            why.append("its feedback carries the symmetry-breaking term weight_break")
        if self.affine is not None and self.form == "tied" and not self.affine.has_unit_gain():
            why.append("the LayerNorm gain gamma on its forward side is not 1, so the tied feedback W^T g_b is "
                       "not the energy's gradient (that would be gamma * W^T g_b)")
        if not why:
            return []
        return [f"synapse {self.name!r}: " + "; ".join(why) + ", so its energy is a pseudo-energy"]

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
        if self.has_bias_fb:
            self.bias_fb = nn.Parameter(torch.zeros(n_a))
        if self.form == "untied":
            self.weight_fb = nn.Parameter(torch.randn(n_a, n_b) * (1.0 / math.sqrt(n_b)))
        elif self.form == "broken":
            self.weight_break = nn.Parameter(torch.zeros(n_a, n_b))
        if self.affine is not None:
            try:
                torch.broadcast_shapes(self.affine.weight.shape, sa)
            except RuntimeError:
                raise ValueError(f"{where}: affine of shape {tuple(self.affine.weight.shape)} does not broadcast "
                                 f"against layer {a!r} of shape {sa}") from None

    def feedback_weight(self) -> Tensor:
        """The matrix V (n_a, n_b) of the feedback current V g_b: W^T, weight_fb or W^T + weight_break."""
        if self.form == "tied":
            return self.weight.T
        if self.form == "untied":
            return self.weight_fb
        return self.weight.T + self.weight_break

    def forward_current(self, ga: Tensor, weight: Tensor | None = None) -> Tensor:
        """Current into b: W (gamma * g_a + beta) + bias, W = ``weight`` when given (e.g. spectrally normalised)."""
        if self.affine is not None:
            ga = self.affine(ga)
        out = _contract(self.weight if weight is None else weight, ga, self._baxis)
        if self.has_bias:
            out = out + _along(self.bias, self._baxis, ga.ndim)
        return out

    def feedback_current(self, gb: Tensor, weight: Tensor | None = None) -> Tensor:
        """Current into a: V g_b + bias_fb, V = ``weight`` (n_a, n_b) when given, else ``feedback_weight()``."""
        # one matmul for every form ("broken": with W^T + W_break summed, not W^T g + W_break g)
        out = _contract(self.feedback_weight() if weight is None else weight, gb, self._baxis)
        if self.has_bias_fb:
            out = out + _along(self.bias_fb, self._baxis, gb.ndim)
        return out

    def energy(self, g: dict[str, Tensor]) -> Tensor:
        a, b = self.layers
        ga, gb = g[a], g[b]
        ga_in = self.affine(ga) if self.affine is not None else ga
        e = -_dot(gb, _contract(self.weight, ga_in, self._baxis))
        if self.form != "tied":
            e = 0.5 * e - 0.5 * _dot(ga, _contract(self.feedback_weight(), gb, self._baxis))
        if self.has_bias:
            e = e - _dot(gb, _along(self.bias, self._baxis, gb.ndim).expand_as(gb))
        if self.has_bias_fb:
            e = e - _dot(ga, _along(self.bias_fb, self._baxis, ga.ndim).expand_as(ga))
        return e

    def currents(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        a, b = self.layers
        return {b: self.forward_current(g[a]), a: self.feedback_current(g[b])}
