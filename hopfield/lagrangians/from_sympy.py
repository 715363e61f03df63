"""A separable Lagrangian of the user's own design from a sympy expression phi(x): phi' and phi'' by sympy,
lambdified to torch; its convexity decided by sympy where it can, else on a dense grid."""

from __future__ import annotations

from collections.abc import Callable

import sympy
import torch
from torch import Tensor

from .base import _Separable


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
