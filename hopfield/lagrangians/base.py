"""The base classes of every Lagrangian (`Lagrangian`, and `_Separable` for L = sum_i phi(x_i)) and the helpers
the energy, the layers and the synapses share: per-sample sums and dot products without a state-sized temporary,
layer axes mapped to axes of the batched tensor, and the checks of a constructor's arguments."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

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
