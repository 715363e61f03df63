"""Lagrangians that couple the units of a group (an axis or several of the layer shape): softmax (logsumexp),
LayerNorm and the spherical normalisation, with their Hessian-vector products in closed form and the shortcuts the
simulation's energy uses at every step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    Axis,
    Lagrangian,
    _batched_axes,
    _check_axis,
    _check_delta,
    _fast_dot,
    _real,
    _sum_per_sample,
    _vecdot,
)


class _Softmax(Lagrangian):
    """L = (1/beta) sum logsumexp(beta x, axis): activation softmax(beta x, axis)."""

    def __init__(self, beta: float, axis: Axis):
        _check_axis("softmax(axis)", axis)
        self.beta, self.axis = _real("softmax(beta)", beta), axis
        self.name = f"softmax(beta={beta:g}, axis={axis})"
        self.symbol, self.lipschitz = "softmax", float(beta)

    def __call__(self, x):
        dims = _batched_axes(self.axis, x.ndim)
        return _sum_per_sample(torch.logsumexp(self.beta * x, dim=dims)) / self.beta

    def activation(self, x):
        dims = _batched_axes(self.axis, x.ndim)
        z = x if self.beta == 1.0 else self.beta * x
        if len(dims) == 1:
            return torch.softmax(z, dim=dims[0])
        return torch.exp(z - torch.logsumexp(z, dim=dims, keepdim=True))

    def activation_into(self, x, out, aux=None):
        # (taking <x, g> block by block as g is written, for the energy, was measured slower than one softmax call
        # and a separate dot product: 3.6 ms against 1.8 ms + the dot at batch 8 x 512 x 512, the softmax over
        # the strided token axis being slower in small blocks)
        dims = _batched_axes(self.axis, x.ndim)
        if self.beta != 1.0 or len(dims) != 1 or x.is_cuda:
            return self.activation(x)
        return torch.ops.aten._softmax.out(x, dims[0], False, out=out)

    def hvp(self, x, v):
        dims = _batched_axes(self.axis, x.ndim)
        p = self.activation(x)
        return self.beta * p * (v - (p * v).sum(dims, keepdim=True))

    def terms_given(self, x, g):
        return _fast_dot(x, g), self._value_given(x, g)

    def _value_given(self, x, g):
        """logsumexp(z) = z_k - log softmax(z)_k for any k, z = beta x: read at the first unit (a slice, no pass
        over the state) when its probability is not tiny there (log g_k > -30: its round-off stays below 30 eps),
        else at the maximum (one max pass)."""
        dims = _batched_axes(self.axis, x.ndim)
        if len(dims) != 1:
            return self(x)
        d = dims[0]
        g0, x0 = g.narrow(d, 0, 1), x.narrow(d, 0, 1)
        log_g0 = torch.log(g0)
        if bool((log_g0 > -30.0).all()):
            return _sum_per_sample(self.beta * x0 - log_g0) / self.beta
        m, idx = x.max(dim=d, keepdim=True)
        return _sum_per_sample(self.beta * m - torch.log(g.gather(d, idx))) / self.beta


def _as_tensor_like(value, x: Tensor) -> Tensor | float:
    return value.to(dtype=x.dtype, device=x.device) if isinstance(value, Tensor) else value


class _LayerNorm(Lagrangian):
    """L = sum over groups of D gamma sqrt(Var(x) + eps) + sum delta x, D = number of normalised units.

    Activation: gamma (x - mean) / sqrt(Var + eps) + delta, LayerNorm with a scalar gain (Energy
    Transformer / HAMUX convention). The Hessian has the zero mode x - mean (iMixer Eq. 13).
    """

    def __init__(self, gamma: float, delta, axis: Axis, eps: float):
        if isinstance(gamma, Tensor) and gamma.numel() != 1:
            raise ValueError(
                "layernorm(gamma=...) must be a scalar: a per-unit gain is not the gradient of any "
                "Lagrangian of this form; fold it into the adjacent synapse instead"
            )
        gamma = _real("layernorm(gamma)", gamma, strict=False)
        eps = _real("layernorm(eps)", eps)
        _check_axis("layernorm(axis)", axis)
        _check_delta("layernorm(delta)", delta)
        self.gamma, self.delta, self.axis, self.eps = gamma, delta, axis, float(eps)
        self.name = f"layernorm(gamma={gamma:g}, axis={axis}, eps={eps:g})"
        self.symbol = "LN"
        self.zero_mode = True

    def _std(self, x, dims):
        return torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + self.eps)

    def __call__(self, x):
        dims = _batched_axes(self.axis, x.ndim)
        d = math.prod(x.shape[i] for i in dims)
        out = _sum_per_sample(d * self.gamma * self._std(x, dims))
        if self._has_delta():
            out = out + _sum_per_sample(_as_tensor_like(self.delta, x) * x)
        return out

    def _has_delta(self) -> bool:
        return isinstance(self.delta, Tensor) or self.delta != 0

    def terms_given(self, x, g):
        """With g = gamma (x - mean) / s, s = sqrt(Var + eps), each group's p = <g, x> = gamma D Var / s and
        q = <g, g> = gamma^2 D Var / s^2, so s = gamma p / q: two dot products per group instead of a variance
        pass, and <x, g> is the sum of the p. Where Var is not well above round-off (q < 1e-3 gamma^2 D) the
        ratio is ill-conditioned: then, and for a delta or several axes, L(x) directly."""
        dims = _batched_axes(self.axis, x.ndim)
        if self._has_delta() or len(dims) != 1 or dims[0] != x.ndim - 1 or self.gamma == 0:
            return super().terms_given(x, g)
        d = x.shape[-1]
        p = _vecdot(g, x)
        q = _vecdot(g, g)
        if not bool((q > 1e-3 * self.gamma**2 * d).all()):
            return _sum_per_sample(p), self(x)
        return _sum_per_sample(p), _sum_per_sample(d * self.gamma * (self.gamma * p / q))

    def activation_into(self, x, out, aux=None):
        if aux is not None:
            aux.pop("rstd", None)  # (kept below only where the fused kernel computed it for this x)
        dims = _batched_axes(self.axis, x.ndim)
        if dims != (x.ndim - 1,) or self._has_delta() or x.is_cuda:
            return self.activation(x)
        d = x.shape[-1]
        try:
            x2, out2 = x.view(-1, d), out.view(-1, d)
        except RuntimeError:  # a strided view that does not flatten to rows
            return self.activation(x)
        # in blocks of about 2^20 elements (4 MiB in float32) that stay in cache: 7 ms against 22-26 ms for one
        # call over a 32 x 784 x 512 state on the 2-core CPU; each row is normalised alike, so bit for bit the same
        rows = max(1, (1 << 20) // d)
        mean = x.new_empty(min(rows, x2.shape[0]), 1)
        rstd = x.new_empty(x2.shape[0], 1) if aux is not None else mean.new_empty(mean.shape)
        for s in range(0, x2.shape[0], rows):
            n = min(rows, x2.shape[0] - s)
            torch.ops.aten.native_layer_norm.out(x2[s:s + n], [d], None, None, self.eps, out0=out2[s:s + n],
                                                 out1=mean[:n], out2=rstd[s:s + n] if aux is not None else rstd[:n])
        if aux is not None:
            aux["rstd"] = rstd
        return out if self.gamma == 1.0 else out.mul_(self.gamma)

    def half_xg_minus_value(self, x, g, aux=None):
        """With s = sqrt(Var + eps) per group, <x, g> = gamma D Var / s = gamma D (s - eps / s) and L = gamma D s,
        so <x, g>/2 - L = -gamma D/2 (s + eps / s): read off the 1/s that ``activation_into`` kept for this x (no
        pass over the state, and no cancellation), else the general route."""
        rstd = None if aux is None else aux.get("rstd")
        if rstd is None or rstd.numel() * x.shape[-1] != x.numel():
            return super().half_xg_minus_value(x, g, aux)
        rows = (rstd.reciprocal() + self.eps * rstd).view(x.shape[0], -1).sum(1)
        return (-0.5 * self.gamma * x.shape[-1]) * rows

    def activation(self, x):
        dims = _batched_axes(self.axis, x.ndim)
        trailing = dims == tuple(range(x.ndim - len(dims), x.ndim))
        if trailing:  # fused kernel
            g = F.layer_norm(x, x.shape[dims[0]:], eps=self.eps)
        else:
            g = (x - x.mean(dim=dims, keepdim=True)) / self._std(x, dims)
        if self.gamma != 1.0:
            g = self.gamma * g
        if self._has_delta():
            g = g + _as_tensor_like(self.delta, x)
        return g

    def hvp(self, x, v):
        # H v = gamma/s (P v - n (n . P v)/D), n = normalised x, P = centring, s = sqrt(Var + eps)
        dims = _batched_axes(self.axis, x.ndim)
        d = math.prod(x.shape[i] for i in dims)
        s = self._std(x, dims)
        n = (x - x.mean(dim=dims, keepdim=True)) / s
        pv = v - v.mean(dim=dims, keepdim=True)
        return self.gamma / s * (pv - n * (n * pv).sum(dims, keepdim=True) / d)


class _Spherical(Lagrangian):
    """L = gamma sqrt(sum x^2 + eps) + sum delta x over each group: activation gamma x / ||x||_eps + delta."""

    def __init__(self, gamma: float, delta, axis: Axis, eps: float):
        gamma = _real("spherical(gamma)", gamma, strict=False)
        eps = _real("spherical(eps)", eps)
        _check_axis("spherical(axis)", axis)
        _check_delta("spherical(delta)", delta)
        self.gamma, self.delta, self.axis, self.eps = gamma, delta, axis, float(eps)
        self.name = f"spherical(gamma={gamma:g}, axis={axis}, eps={eps:g})"
        self.symbol = "Sph"
        self.zero_mode = True

    def _norm(self, x, dims):
        return torch.sqrt((x * x).sum(dim=dims, keepdim=True) + self.eps)

    def __call__(self, x):
        dims = _batched_axes(self.axis, x.ndim)
        out = _sum_per_sample(self.gamma * self._norm(x, dims))
        if isinstance(self.delta, Tensor) or self.delta != 0:
            out = out + _sum_per_sample(_as_tensor_like(self.delta, x) * x)
        return out

    def activation(self, x):
        dims = _batched_axes(self.axis, x.ndim)
        g = self.gamma * x / self._norm(x, dims)
        if isinstance(self.delta, Tensor) or self.delta != 0:
            g = g + _as_tensor_like(self.delta, x)
        return g

    def hvp(self, x, v):
        dims = _batched_axes(self.axis, x.ndim)
        r = self._norm(x, dims)
        return self.gamma / r * (v - x * (x * v).sum(dims, keepdim=True) / r**2)
