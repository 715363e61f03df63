"""Separable Lagrangians in closed form, L(x) = sum_i phi(x_i): identity, rectified polynomials (ReLU), exp, tanh,
sigmoid and GELU, each with its activation phi' and the diagonal of its Hessian, phi''."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import _fast_dot, _real, _Separable


class _Identity(_Separable):
    name = "identity()"
    symbol = ""
    lipschitz = 1.0
    degree = 2.0

    def phi(self, x):
        return 0.5 * x * x

    def activation(self, x):
        return x

    def curvature(self, x):
        return torch.ones_like(x)

    def terms_given(self, x, g):
        gg = _fast_dot(g, g)  # g = x: <x, g> = <g, g>, phi = x^2 / 2 = g^2 / 2
        return gg, 0.5 * gg


def _pos_power(x: Tensor, p: float) -> Tensor:
    """relu(x)^p, p > 0, with finite derivatives of every order: x <= 0 is masked before and after the power
    (the "double where"), so no 0^(negative) ever meets a zero gradient. At x = 0 a derivative that does not
    exist (order >= p) is taken from the left, i.e. 0, the convention of relu'(0) = 0."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0) ** p, 0.0)


class _RePU(_Separable):
    """phi = relu(x)^n / n, phi' = relu(x)^(n-1), phi'' = (n-1) relu(x)^(n-2) (0 for x < 0, and at x = 0
    for n > 2; relu'(0) = 0 for n = 2). n < 2 is refused: phi'' ~ x^(n-2) is unbounded as x -> 0+, so the
    Hessian of Eq. 18 does not exist at 0 and the vector field is not Lipschitz there."""

    def __init__(self, n: float):
        n = _real("repu(n)", n, low=-math.inf)
        if not n >= 2:
            raise ValueError(
                f"repu(n) needs n >= 2, got n={n}: for 1 < n < 2 the curvature (n-1) x^(n-2) is unbounded as "
                "x -> 0+ (no Hessian at 0 for Eq. 18, a non-Lipschitz vector field), and n <= 1 has no "
                "continuous activation"
            )
        self.n = float(n)
        self.name = "relu()" if n == 2 else f"repu({n:g})"
        self.symbol = "ReLU" if n == 2 else f"ReLU^{n - 1:g}"
        self.lipschitz = 1.0 if n == 2 else math.inf
        self.degree = self.n

    def phi(self, x):
        return _pos_power(x, self.n) / self.n

    def activation(self, x):
        return torch.relu(x) if self.n == 2 else _pos_power(x, self.n - 1)

    def activation_into(self, x, out, aux=None):
        return torch.clamp_min(x, 0.0, out=out) if self.n == 2 else self.activation(x)

    def terms_given(self, x, g):
        value = 0.5 * _fast_dot(g, g) if self.n == 2 else self(x)  # phi = relu(x)^2 / 2 = g^2 / 2 for n = 2
        return self.n * value, value  # <x, g> = n L (degree n)

    def curvature(self, x):
        if self.n == 2:
            return (x > 0).to(x.dtype)
        return (self.n - 1) * _pos_power(x, self.n - 2)


class _Exp(_Separable):
    def __init__(self, beta: float):
        self.beta = beta = _real("exp(beta)", beta)
        self.name = f"exp(beta={beta:g})"
        self.symbol = "exp"

    def phi(self, x):
        return torch.exp(self.beta * x) / self.beta

    def activation(self, x):
        return torch.exp(self.beta * x)

    def curvature(self, x):
        return self.beta * torch.exp(self.beta * x)


class _Tanh(_Separable):
    def __init__(self, beta: float):
        self.beta = beta = _real("tanh(beta)", beta)
        self.name = "tanh()" if beta == 1 else f"tanh(beta={beta:g})"
        self.symbol, self.lipschitz = "tanh", float(beta)

    def phi(self, x):
        # log cosh(b x) / b, overflow-free: |y| + log1p(exp(-2|y|)) - log 2
        y = (self.beta * x).abs()
        return (y + F.softplus(-2 * y) - math.log(2.0)) / self.beta

    def activation(self, x):
        return torch.tanh(self.beta * x)

    def curvature(self, x):
        return self.beta * (1 - torch.tanh(self.beta * x) ** 2)


class _Sigmoid(_Separable):
    def __init__(self, beta: float):
        self.beta = beta = _real("sigmoid(beta)", beta)
        self.name = "sigmoid()" if beta == 1 else f"sigmoid(beta={beta:g})"
        self.symbol, self.lipschitz = "sigmoid", float(beta) / 4

    def phi(self, x):
        return F.softplus(self.beta * x) / self.beta

    def activation(self, x):
        return torch.sigmoid(self.beta * x)

    def curvature(self, x):
        s = torch.sigmoid(self.beta * x)
        return self.beta * s * (1 - s)


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_SQRT2_PI = math.sqrt(2.0 / math.pi)


class _GELU(_Separable):
    """Phi(x) = 1/4 (x^2 + (x^2 - 1) erf(x/sqrt2) + x sqrt(2/pi) exp(-x^2/2)), Phi' = exact GELU."""

    name = "gelu()"
    symbol = "GELU"
    # GELU' = Phi_N(x) + x phi(x) peaks where phi(x)(2 - x^2) = 0, at x = sqrt(2): 1.1289...
    lipschitz = 0.5 * math.erfc(-1.0) + math.sqrt(2.0) * math.exp(-1.0) / math.sqrt(2 * math.pi)
    convex = False
    caveat = (
        "gelu(): the Hessian GELU'(x) is negative for x < -0.7518, so energy descent is not guaranteed "
        "once a unit of that layer goes below it"
    )

    def phi(self, x):
        gauss = _SQRT2_PI * torch.exp(-0.5 * x * x)
        x2 = x * x
        # For x < 0 write erf = erfc(-x/sqrt2) - 1 so that the tail does not cancel catastrophically.
        pos = x2 + (x2 - 1) * torch.erf(x * _SQRT1_2)
        neg = 1 + (x2 - 1) * torch.erfc(-x * _SQRT1_2)
        return 0.25 * (torch.where(x >= 0, pos, neg) + x * gauss)

    def activation(self, x):
        return F.gelu(x)

    def curvature(self, x):
        cdf = 0.5 * torch.erfc(-x * _SQRT1_2)
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return cdf + x * pdf
