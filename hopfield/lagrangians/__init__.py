"""Lagrangians L(x) of neuron layers and their activations g = dL/dx in closed form.

A Lagrangian maps a batched state x of shape (batch, *shape) to one value per sample, shape (batch,),
summing over every non-batch element. ``axis`` arguments index the layer's own shape (not the batch
axis): ``axis=-1`` is the last (channel) axis, ``axis=-2`` the token axis of a token x channel state, and
a non-negative axis ``k`` means axis ``k`` of the layer shape (axis ``k + 1`` of the batched tensor).

Each Lagrangian says whether its Hessian is positive semi-definite everywhere (``convex``), which the
energy-descent theorem needs (Krotov 2021, Eq. 18); when it is not, ``caveat`` says where it fails.

The constructors below are the public API; the classes live in ``base`` (`Lagrangian`, the helpers the energy
shares), ``elementwise`` (separable, closed form), ``grouped`` (softmax, LayerNorm, spherical: units coupled over an
axis) and ``from_sympy`` (`symbolic`: phi from a sympy expression). ``to_spec`` / ``from_spec`` turn a Lagrangian
into plain data and back.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
from torch import Tensor

from .base import Axis, Lagrangian
from .elementwise import _GELU, _Exp, _Identity, _RePU, _Sigmoid, _Tanh
from .from_sympy import _Symbolic
from .grouped import _LayerNorm, _Softmax, _Spherical

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
