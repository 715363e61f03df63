"""Lagrangians L(x) of neuron layers and their activations g = dL/dx in closed form.

A Lagrangian maps a batched state x of shape (batch, *shape) to one value per sample, shape (batch,),
summing over every non-batch element. ``axis`` arguments index the layer's own shape (not the batch
axis): ``axis=-1`` is the last (channel) axis, ``axis=-2`` the token axis of a token x channel state, and
a non-negative axis ``k`` means axis ``k`` of the layer shape (axis ``k + 1`` of the batched tensor).

Each Lagrangian says whether its Hessian is positive semi-definite everywhere (``convex``), which the
energy-descent theorem needs (Krotov 2021, Eq. 18); when it is not, ``caveat`` says where it fails.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Lagrangian",
    "exp",
    "from_spec",
    "gelu",
    "identity",
    "layernorm",
    "relu",
    "repu",
    "sigmoid",
    "softmax",
    "spherical",
    "symbolic",
    "tanh",
    "to_spec",
]

Axis = int | Sequence[int]


def _sum_per_sample(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(-1)


_DOT_CHUNK = 1 << 20  # elements of the product a dot product may hold at once (4 MiB in float32)


def _vecdot(a: Tensor, b: Tensor) -> Tensor:
    """``torch.linalg.vecdot(a, b)`` over the last axis of two real tensors of one shape, in blocks of at most
    ``_DOT_CHUNK`` products (rows, and for long rows columns too). vecdot forms the whole product first: past 32 MiB
    (glibc's largest heap block) that temporary is a fresh mmap each call, page-faulted in, and a batch-32 state's
    dot product ran at 5 GB/s where the blocks, reusing one cached block, run at 23-60
    (benchmarks/simulate_vs_hamux.py --scale)."""
    if a.numel() <= _DOT_CHUNK or a.is_cuda:
        return torch.linalg.vecdot(a, b)
    n = a.shape[-1]
    a2, b2 = a.reshape(-1, n), b.reshape(-1, n)
    cols = n if n <= _DOT_CHUNK else _DOT_CHUNK // 8
    rows = max(1, _DOT_CHUNK // cols)
    out = a2.new_empty(a2.shape[0])
    for r in range(0, a2.shape[0], rows):
        o = out[r:r + rows]
        torch.linalg.vecdot(a2[r:r + rows, :cols], b2[r:r + rows, :cols], out=o)
        for c in range(cols, n, cols):
            o += torch.linalg.vecdot(a2[r:r + rows, c:c + cols], b2[r:r + rows, c:c + cols])
    return out.view(a.shape[:-1])


def _fast_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample <a, b>, shape (batch,), without a state-sized temporary (``_vecdot``; measured 3x faster than a
    product and a sum on CPU, a batched GEMV, bmm of (1, N) by (N, 1), 5x slower)."""
    return _vecdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _batched_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    """Map layer-shape axes to axes of the batched tensor of rank ``ndim`` (batch axis first)."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    rank = ndim - 1
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(f"axis {a} is out of range for a layer state of rank {rank}")
        out.append(a + ndim if a < 0 else a + 1)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis}")
    return tuple(sorted(out))


def _real(where: str, value, *, low: float = 0.0, strict: bool = True) -> float:
    """``value`` as a float: ValueError naming ``where`` (``"softmax(beta)"``) unless it is a finite real number
    (not a bool) > ``low`` (>= ``low`` when not ``strict``). A one-element tensor counts as its number."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > low if strict else value >= low)):
        bound = "" if low == -math.inf else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{where} must be a finite number{bound}, got {value!r}")
    return float(value)


def _check_axis(where: str, axis) -> None:
    """ValueError naming ``where`` unless ``axis`` is an int or a non-empty tuple / list of ints (the range is
    checked against the layer's rank when a state arrives)."""
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(f"{where} must be an int or a non-empty tuple of ints (axes of the layer shape), "
                         f"got {axis!r}")


def _check_delta(where: str, delta) -> None:
    """ValueError naming ``where`` unless ``delta`` is a real number or a tensor."""
    if isinstance(delta, Tensor):
        return
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not math.isfinite(delta):
        raise ValueError(f"{where} must be a finite number or a tensor (a bias per unit), got {delta!r}")


class Lagrangian:
    """Base class. Subclasses implement ``__call__`` (per-sample L) and ``activation`` (dL/dx).

    ``hvp(x, v)`` is the Hessian-vector product d^2L/dx^2 . v, by forward-mode differentiation of the
    closed-form activation unless a subclass gives it in closed form (separable Lagrangians do).
    """

    name: str = "lagrangian"
    symbol: str = "g"  # how derived update rules write the activation (LN, GELU, ...)
    convex: bool = True
    caveat: str | None = None
    lipschitz: float = math.inf  # an upper bound on the activation's Lipschitz constant (largest slope)
    # g(c x) = g(x) for c > 0 (up to eps), so the Hessian annihilates x (iMixer Eq. 13): a decay -alpha x then
    # does not move g, whatever alpha (LayerNorm, spherical)
    zero_mode: bool = False
    # L(c x) = c^degree L(x) for c > 0, so <x, g> = degree L (Euler's theorem): for degree 2 (identity, ReLU) the
    # layer's part of the energy read off dx/dt, <x, g>/2 - L, is exactly 0 (``hopfield.stepping``)
    degree: float | None = None

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def activation(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def hvp(self, x: Tensor, v: Tensor) -> Tensor:
        return torch.func.jvp(self.activation, (x,), (v,))[1]

    def activation_into(self, x: Tensor, out: Tensor, aux: dict | None = None) -> Tensor:
        """g = dL/dx written into ``out`` (a buffer the simulation reuses at every step, ``hopfield.stepping``)
        where this Lagrangian can, else computed afresh; returns the tensor that holds g. A state-sized fresh
        tensor past 32 MiB is a page-faulted mmap at each call on CPU. Into ``aux`` (a dict kept with the buffer)
        it may leave what ``half_xg_minus_value`` can use at the same x (LayerNorm: each group's 1/s)."""
        return self.activation(x)

    def terms_given(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """(<x, g>, L(x)) per sample, the two parts of the layer's Legendre energy (Eq. 17), reading what it can
        from the activation g = dL/dx already computed (the energy at every simulation step,
        ``hopfield.stepping``); equal to ``(<x, g>, self(x))`` up to round-off."""
        return _fast_dot(x, g), self(x)

    def half_xg_minus_value(self, x: Tensor, g: Tensor, aux: dict | None = None) -> Tensor:
        """<x, g>/2 - L(x) per sample, the layer's part of the energy read off dx/dt (``hopfield.stepping``): 0 for
        degree 2 (Euler's theorem), else from ``terms_given``; ``aux`` is what ``activation_into`` left at this x."""
        if self.degree == 2:
            return x.new_zeros(x.shape[0])
        xg, value = self.terms_given(x, g)
        return 0.5 * xg - value

    def __repr__(self) -> str:
        return self.name


class _Separable(Lagrangian):
    """L(x) = sum_i phi(x_i): activation phi'(x), diagonal Hessian phi''(x)."""

    def phi(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def curvature(self, x: Tensor) -> Tensor:
        """phi''(x), the diagonal of the Hessian."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return _sum_per_sample(self.phi(x))

    def hvp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.curvature(x) * v


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


def _scalar_safe(fn):
    """torch functions take tensors; lambdified code also calls them on constants such as sqrt(2)."""

    def call(a):
        return fn(a) if isinstance(a, Tensor) else fn(torch.tensor(float(a), dtype=torch.float64)).item()

    return call


_SCALAR_SAFE = {name: _scalar_safe(getattr(torch, name)) for name in (
    "sqrt", "exp", "log", "erf", "erfc", "tanh", "cosh", "sinh", "sin", "cos", "abs", "sigmoid")}


class _Symbolic(_Separable):
    """Separable Lagrangian from a sympy expression phi(x): phi' and phi'' by sympy, lambdified to torch."""

    def __init__(self, expr, symbol: sympy.Symbol | None, name: str | None, convex: bool | None):
        try:
            expr = sympy.sympify(expr)
        except (sympy.SympifyError, SyntaxError, TypeError) as e:
            why = str(e).strip().splitlines()[-1]  # sympy's last line says what failed: "SyntaxError: ..."
            raise ValueError(f"symbolic({expr!r}): not an expression sympy can read ({why})") from None
        free = sorted(expr.free_symbols, key=str)
        if symbol is None:
            if len(free) != 1:
                raise ValueError(
                    f"symbolic({expr}): give `symbol=` - the expression must have exactly one free symbol, "
                    f"found {[str(s) for s in free]}"
                )
            symbol = free[0]
        elif set(free) - {symbol}:
            raise ValueError(f"symbolic({expr}): free symbols other than {symbol}: {set(free) - {symbol}}")
        real = sympy.Symbol(symbol.name, real=True)  # a neuron's state is real, whatever the caller declared
        expr, symbol = expr.subs(symbol, real), real
        self.expr, self.var = expr, symbol  # ``symbol`` (below) is the display name of the activation
        self.d1 = sympy.simplify(sympy.diff(expr, symbol))
        self.d2 = sympy.simplify(sympy.diff(expr, symbol, 2))
        if self.d2.has(sympy.DiracDelta) or self.d1.has(sympy.DiracDelta):
            raise ValueError(
                f"symbolic({expr}): phi must be twice differentiable (Eq. 18 and the Legendre energy use phi''), "
                f"but phi''({symbol}) = {self.d2} has a Dirac delta (a kink in phi'); for relu(x)^2 / 2 use "
                "lagrangians.relu()")
        try:
            self._phi, self._d1, self._d2 = (self._lambdify(e) for e in (expr, self.d1, self.d2))
        except Exception as e:  # sympy's printers raise many types for what torch cannot compute
            raise ValueError(f"symbolic({expr}): phi, phi' or phi'' cannot be written with torch functions: "
                             f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        self.name = name or f"symbolic({expr})"
        self.symbol = name or "phi'"
        self.negative_set = None  # where phi'' < 0, when sympy could say
        self.convex = self._decide_convexity() if convex is None else bool(convex)
        if not self.convex:
            where = f" on {self.negative_set}" if self.negative_set is not None else ""
            try:
                period = sympy.periodicity(self.d2, self.var)
            except (NotImplementedError, ValueError, TypeError):
                period = None
            if where and period:  # solveset lists one period of a periodic phi''
                where += f" + {period}*k for every integer k"
            self.caveat = (f"{self.name}: phi''({self.var}) = {self.d2} takes negative values{where}, "
                           "descent not guaranteed")

    def _lambdify(self, e) -> Callable[[Tensor], Tensor]:
        f = sympy.lambdify(self.var, e, modules=[_SCALAR_SAFE, "torch"])

        def call(x: Tensor) -> Tensor:
            out = f(x)
            return out.expand_as(x) if isinstance(out, Tensor) else torch.full_like(x, float(out))

        return call

    def _decide_convexity(self) -> bool:
        """phi'' >= 0 on the reals: exactly by sympy's solveset of phi'' < 0 where it can decide (an empty or
        an explicit set), else (an unsolved ConditionSet or an error) on a dense float64 grid over [-50, 50]."""
        try:
            negative = sympy.solveset(self.d2 < 0, self.var, domain=sympy.S.Reals)
        except (NotImplementedError, TypeError, ValueError):
            negative = None
        if negative is not None and not negative.has(sympy.ConditionSet):
            if negative is sympy.S.EmptySet:
                return True
            self.negative_set = negative
            return False
        grid = torch.linspace(-50, 50, 200_001, dtype=torch.float64)
        return bool((self._d2(grid) >= -1e-12).all())

    def phi(self, x):
        return self._phi(x)

    def activation(self, x):
        return self._d1(x)

    def curvature(self, x):
        return self._d2(x)


def identity() -> Lagrangian:
    """L = 1/2 sum x^2, g = x."""
    return _Identity()


def relu() -> Lagrangian:
    """L = 1/2 sum relu(x)^2, g = relu(x)."""
    return _RePU(2)


def repu(n: float) -> Lagrangian:
    """L = 1/n sum relu(x)^n, g = relu(x)^(n-1) (rectified polynomial, Krotov & Hopfield 2016), n >= 2."""
    return _RePU(n)


def exp(beta: float = 1.0) -> Lagrangian:
    """L = 1/beta sum exp(beta x), g = exp(beta x)."""
    return _Exp(beta)


def tanh(beta: float = 1.0) -> Lagrangian:
    """L = 1/beta sum log cosh(beta x), g = tanh(beta x)."""
    return _Tanh(beta)


def sigmoid(beta: float = 1.0) -> Lagrangian:
    """L = 1/beta sum softplus(beta x), g = sigmoid(beta x)."""
    return _Sigmoid(beta)


def softmax(beta: float = 1.0, axis: Axis = -1) -> Lagrangian:
    """L = 1/beta sum logsumexp(beta x, axis), g = softmax(beta x, axis)."""
    return _Softmax(beta, axis)


def layernorm(gamma: float = 1.0, delta=0.0, axis: Axis = -1, eps: float = 1e-5) -> Lagrangian:
    """L = D gamma sqrt(Var(x) + eps) + sum delta x per group, g = gamma (x - mean)/sqrt(Var + eps) + delta.

    ``gamma`` is a scalar; ``axis`` an int or a tuple of axes (e.g. ``(-2, -1)`` normalises the whole
    token x channel matrix); ``delta`` a float or a tensor broadcastable to the layer shape.
    """
    return _LayerNorm(gamma, delta, axis, eps)


def spherical(gamma: float = 1.0, axis: Axis = -1, eps: float = 1e-5, delta=0.0) -> Lagrangian:
    """L = gamma sqrt(sum x^2 + eps) + sum delta x per group, g = gamma x / sqrt(sum x^2 + eps) + delta."""
    return _Spherical(gamma, delta, axis, eps)


def gelu() -> Lagrangian:
    """L = sum Phi(x) with Phi' = exact (erf) GELU; not convex: GELU' < 0 below x = -0.7518."""
    return _GELU()


def symbolic(expr, symbol=None, *, name: str | None = None, convex: bool | None = None) -> Lagrangian:
    """Separable L = sum phi(x) from a sympy expression (or a string sympy can parse) in one symbol.

    Activation phi' and curvature phi'' are derived by sympy and lambdified to torch. Convexity is
    decided by sympy (phi'' < 0 has no real solution) or, if sympy cannot decide, on a dense grid;
    pass ``convex=`` to state it yourself.
    """
    return _Symbolic(expr, symbol, name, convex)


# ---------------------------------------------------------------------------------------------- as data
_CONSTRUCTORS: dict[str, Callable[..., Lagrangian]] = {
    "identity": identity, "relu": relu, "repu": repu, "exp": exp, "tanh": tanh, "sigmoid": sigmoid,
    "softmax": softmax, "layernorm": layernorm, "spherical": spherical, "gelu": gelu, "symbolic": symbolic}


def _axis_data(axis: Axis):
    return axis if isinstance(axis, int) else list(axis)


def to_spec(lagrangian: Lagrangian) -> dict:
    """The Lagrangian as plain data, ``{"name": ..., parameters}``, that `from_spec` turns back into it (for
    network specs stored in YAML or a run folder). A tensor-valued ``delta`` has no such form."""
    L = lagrangian
    if isinstance(L, _Identity):
        return {"name": "identity"}
    if isinstance(L, _GELU):
        return {"name": "gelu"}
    if isinstance(L, _RePU):
        return {"name": "relu"} if L.n == 2 else {"name": "repu", "n": L.n}
    if isinstance(L, (_Exp, _Tanh, _Sigmoid)):
        return {"name": {_Exp: "exp", _Tanh: "tanh", _Sigmoid: "sigmoid"}[type(L)], "beta": L.beta}
    if isinstance(L, _Softmax):
        return {"name": "softmax", "beta": L.beta, "axis": _axis_data(L.axis)}
    if isinstance(L, (_LayerNorm, _Spherical)):
        if isinstance(L.delta, Tensor):
            raise ValueError(f"to_spec: {L.name} has a tensor delta, which has no plain-data form")
        out = {"name": "layernorm" if isinstance(L, _LayerNorm) else "spherical", "gamma": L.gamma,
               "axis": _axis_data(L.axis), "eps": L.eps}
        if L.delta != 0:
            out["delta"] = float(L.delta)
        return out
    if isinstance(L, _Symbolic):
        out = {"name": "symbolic", "expr": str(L.expr), "symbol": str(L.var), "convex": L.convex}
        if L.name != f"symbolic({L.expr})":
            out["label"] = L.name
        return out
    raise TypeError(f"to_spec: {type(L).__name__} is not one of this module's Lagrangians")


def from_spec(spec: str | dict) -> Lagrangian:
    """A Lagrangian from its name (``"gelu"``) or ``{"name": ..., parameters}`` (``{"name": "layernorm", "axis":
    [-2, -1], "eps": 1e-6}``): the constructors of this module; ValueError naming what does not fit."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"a Lagrangian is a name or a mapping with a 'name', got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name not in _CONSTRUCTORS:
        raise ValueError(f"unknown Lagrangian {name!r}; expected one of {sorted(_CONSTRUCTORS)}")
    if isinstance(params.get("axis"), list):
        params["axis"] = tuple(params["axis"])
    if name == "symbolic":
        params = {("name" if k == "label" else k): v for k, v in params.items()}
        if isinstance(params.get("symbol"), str):
            params["symbol"] = sympy.Symbol(params["symbol"])
    try:
        return _CONSTRUCTORS[name](**params)
    except TypeError as e:
        raise ValueError(f"Lagrangian {name!r}: {e}; its parameters are those of hopfield.lagrangians.{name}") from e
