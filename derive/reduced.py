"""The adiabatic limit: eliminate the fast layers of a hierarchical Hopfield network.

With tau_A -> 0 for every hidden layer A, each hidden state sits on its fixed point given the layers above it
(iMixer paper Eqs. 21-22, Appendix B Eqs. 33-35). The synapse graph must be a tree rooted at the visible
layer v. For a fast layer A with parent P and children C (Eqs. 38-41):

    G^A = xi^(A,P) g^P (+ bias)              the current from the parent          (Eq. 41)
    H^A = xi^(P,A) g^A (+ bias)              the current sent back to the parent  (Eq. 41)
    F^A = sum_C H^C o S^C o G^C              A's feedback from its subtree        (Eqs. 39-40)
    S^A = (1 - F^A)^-1                       x^A solves x^A = G^A + F^A(x^A)      (Eq. 38)
    S^A = identity when A is a leaf          x^A = G^A (explicit)                 (Eq. 11, 35)

and the slow layer moves by the reduced vector field

    tau_v dv/dt = F^v(v) - alpha v,          F^v = sum_B H^B o S^B o G^B          (Eqs. 12, 33, 42)

where alpha = 1 is the network's own decay. When L_v is a LayerNorm Lagrangian, whose Hessian annihilates v
(Eq. 13), every alpha gives LN(v) the same velocity at a given v, so the flows of LN(v) for different alpha trace
the same path; but alpha changes the scale of v, and LN(v) moves at a speed ~ 1/scale, so they trace it at
different speeds. In discrete time alpha matters: one Euler step with alpha dt = tau_v removes the skip
connection (v <- F^v(v)). Leaves make the 2-layer Mixer step, a chain makes the iMixer's nested inverses, a star
(two leaves) the parallelized Mixer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hopfield import Network
from hopfield.synapses import DenseSynapse

from .fastsolve import solve_fast

__all__ = ["SOLVERS", "Branch", "ReducedField", "adiabatic"]

SOLVERS = ("anderson", "newton_krylov", "newton", "fixed_point")

# maps a branch to the functions its G and H apply (default: ``(br.G, br.H)``, the synapse's own currents); a
# derived block passes ones with spectrally normalised matrices, or BatchNorm after them
MapsFn = Callable[["Branch"], tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]]


@dataclass
class Branch:
    """Fast layer ``node`` hanging off ``parent`` through ``synapse``, with its own subtree ``children``."""

    parent: str
    node: str
    synapse: DenseSynapse
    children: list[Branch] = field(default_factory=list)
    depth: int = 1  # 1 for a layer coupled to the visible one

    @property
    def down(self) -> bool:
        """True when the synapse's forward current (a -> b) runs parent -> node."""
        return self.synapse.layers == (self.parent, self.node)

    @property
    def implicit(self) -> bool:
        """x^A = (1 - F^A)^-1 (G^A) needs a solve exactly when A has a subtree (Eq. 38)."""
        return bool(self.children)

    def walk(self) -> Iterable[Branch]:
        yield self
        for c in self.children:
            yield from c.walk()

    def G(self, g_parent: Tensor, weight: Tensor | None = None) -> Tensor:
        """Current from the parent into this layer, xi^(A,P) g^P (+ bias) (Eq. 41)."""
        if self.down:
            return self.synapse.forward_current(g_parent, weight)
        return self.synapse.feedback_current(g_parent, weight)

    def H(self, g_node: Tensor, weight: Tensor | None = None) -> Tensor:
        """Current from this layer back into the parent, xi^(P,A) g^A (+ bias) (Eq. 41)."""
        if self.down:
            return self.synapse.feedback_current(g_node, weight)
        return self.synapse.forward_current(g_node, weight)


def _tree(net: Network, visible: str, fast: Iterable[str] | None) -> list[Branch]:
    if visible not in net.layers:
        raise ValueError(f"adiabatic: unknown visible layer {visible!r}; layers are {list(net.layers)}")
    fast = [n for n in net.layers if n != visible] if fast is None else list(fast)
    for n in fast:
        if n not in net.layers:
            raise ValueError(f"adiabatic: unknown fast layer {n!r}; layers are {list(net.layers)}")
        if n == visible:
            raise ValueError(f"adiabatic: the visible layer {visible!r} cannot also be fast")
    slow = [n for n in net.layers if n not in fast and n != visible]
    if slow:
        raise ValueError(f"adiabatic: layers {slow} are neither visible nor fast; one slow layer is supported")
    adjacency: dict[str, list[DenseSynapse]] = {n: [] for n in net.layers}
    for syn in net.synapses:
        if not isinstance(syn, DenseSynapse):
            raise TypeError(f"adiabatic: synapse {syn.name!r} is a {type(syn).__name__}; the limit is derived "
                            "for DenseSynapse couplings (two layers, one axis)")
        a, b = syn.layers
        adjacency[a].append(syn)
        adjacency[b].append(syn)

    seen = {visible}

    def grow(parent: str, via: DenseSynapse, depth: int) -> Branch:
        node = via.layers[1] if via.layers[0] == parent else via.layers[0]
        if node in seen:
            raise ValueError(f"adiabatic: synapse {via.name!r} closes a loop through layer {node!r}; the "
                             "elimination needs a tree rooted at the visible layer")
        seen.add(node)
        br = Branch(parent, node, via, depth=depth)
        br.children = [grow(node, s, depth + 1) for s in adjacency[node] if s is not via]
        return br

    branches = [grow(visible, s, 1) for s in adjacency[visible]]
    unreached = [n for n in net.layers if n not in seen]
    if unreached:
        raise ValueError(f"adiabatic: layers {unreached} are not connected to the visible layer {visible!r}")
    return branches


def number(v) -> bool:
    """Whether ``v`` is a finite real number (not a bool): what a numeric option must be."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def count(v, low: int) -> bool:
    """Whether ``v`` is an integer (not a bool) >= ``low``."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


def _check_options(*, alpha, n_iter, tol, max_iter, m, beta) -> None:
    """ValueError naming the `ReducedField` option that is not of its kind: alpha a finite number, n_iter an int
    >= 0, tol None or a number > 0, max_iter None or an int >= 1, m an int >= 1, beta a number in (0, 1]."""
    checks = (("alpha", number(alpha), "a finite number"), ("n_iter", count(n_iter, 0), "an int >= 0"),
              ("tol", tol is None or (number(tol) and tol > 0), "None (dtype-aware) or a number > 0"),
              ("max_iter", max_iter is None or count(max_iter, 1), "None or an int >= 1"),
              ("m", count(m, 1), "an int >= 1 (the Anderson memory)"),
              ("beta", number(beta) and 0 < beta <= 1, "in (0, 1] (the mixing; < 1 damps)"))
    for name, ok, want in checks:
        if not ok:
            value = {"alpha": alpha, "n_iter": n_iter, "tol": tol, "max_iter": max_iter, "m": m, "beta": beta}[name]
            raise ValueError(f"ReducedField: {name} must be {want}, got {value!r}")


def _check_order(branches: list[Branch], order: Iterable[str] | None) -> list[str]:
    """The elimination order, slowest fast layer first (tau_1 >> tau_2 >> ...; Appendix B). The nested solve
    eliminates each layer's subtree before the layer itself, so every layer must come after its parent."""
    nodes = [b for top in branches for b in top.walk()]
    if order is None:
        return [b.node for b in sorted(nodes, key=lambda b: b.depth)]
    order = list(order)
    if sorted(order) != sorted(b.node for b in nodes):
        raise ValueError(f"adiabatic: order {order} must list every fast layer {[b.node for b in nodes]} once")
    rank = {n: i for i, n in enumerate(order)}
    for b in nodes:
        if b.depth > 1 and rank[b.node] < rank[b.parent]:
            raise ValueError(f"adiabatic: order puts layer {b.node!r} before its parent {b.parent!r}; the nested "
                             "elimination needs each layer slower than the layers below it (tau_parent >> tau_child)")
    return order


class ReducedField:
    """The visible layer's vector field after the adiabatic elimination of every fast layer.

    ``solver`` picks how the fast layers are solved:

    - ``"anderson"`` (default): all fast layers' fixed-point equations x_A = (currents into A) jointly (Eqs.
      34-35, straight from the network's own currents), matrix-free and batched, by Anderson acceleration
      (``derive.fastsolve``), to ``tol`` (default dtype-aware: 1e-12 in float64, 1e-4 in float32, relative);
      ``max_iter``, ``m`` (memory) and ``beta`` (mixing, < 1 damps) tune it;
    - ``"newton_krylov"``: the same equations by Newton's method, matrix-free (GMRES on Jacobian-vector products),
      batched, ``max_iter`` steps at most;
    - ``"newton"``: the same equations by Newton's method with the dense per-sample Jacobian and backtracking
      (O(state^2) memory: small states), ``max_iter`` steps at most;
    - ``"fixed_point"``: each implicit x^A = (1 - F^A)^-1 (z) by x^0 = z, x^(a+1) = z + F^A(x^a), ``n_iter`` times
      (the i-ResNet inverse of the iMixer, Eq. 29), nested as the tree: what a derived block computes.

    The first two are the references, independent of the nested recursion; their solution carries the implicit
    function theorem's gradient. A failure raises ``derive.fastsolve.SlowManifoldError`` naming the layer, the
    worst sample, the residual and what to try.
    """

    def __init__(self, net: Network, visible: str = "v", fast: Iterable[str] | None = None, *,
                 order: Iterable[str] | None = None, alpha: float = 0.0, solver: str = "anderson",
                 n_iter: int = 50, tol: float | None = None, max_iter: int | None = None, m: int = 5,
                 beta: float = 1.0):
        if solver not in SOLVERS:
            raise ValueError(f"ReducedField: solver must be one of {SOLVERS}, got {solver!r}")
        _check_options(alpha=alpha, n_iter=n_iter, tol=tol, max_iter=max_iter, m=m, beta=beta)
        self.net, self.visible = net, visible
        self.branches = _tree(net, visible, fast)
        self.order = _check_order(self.branches, order)
        self.alpha, self.solver, self.n_iter = float(alpha), solver, n_iter
        self.tol, self.max_iter, self.m, self.beta = tol, max_iter, m, beta
        self.tau = net.layers[visible].tau

    def act(self, name: str, x: Tensor) -> Tensor:
        return self.net.layers[name].activation(x)

    def feedback(self, name: str, children: list[Branch], x: Tensor, maps: MapsFn | None = None,
                 on_solve=None) -> Tensor:
        """F^A(x) = sum over children C of H^C(S^C(G^C(g^A(x)))) (Eqs. 39-40; F^v for the visible layer)."""
        g = self.act(name, x)
        out = None
        for br in children:
            G, H = maps(br) if maps else (br.G, br.H)
            xc = self.solve(br, G(g), maps, on_solve)
            h = H(self.act(br.node, xc))
            out = h if out is None else out + h
        return out if out is not None else torch.zeros_like(x)

    def solve(self, br: Branch, z: Tensor, maps: MapsFn | None = None, on_solve=None) -> Tensor:
        """x^A with x^A = z + F^A(x^A) (Eq. 38); x^A = z for a leaf."""
        if not br.implicit:
            return z

        def F(x):
            return self.feedback(br.node, br.children, x, maps, on_solve)

        if self.solver == "fixed_point" or not br.implicit:
            x = z
            iterates = [x]
            for _ in range(self.n_iter):
                x = z + F(x)
                if on_solve is not None:
                    iterates.append(x)
            if on_solve is not None:
                on_solve(br, iterates)
            return x
        raise RuntimeError(f"ReducedField.solve: the {self.solver!r} solver works on all fast layers at once "
                           "(forcing, slow_manifold)")

    def check_visible(self, v: Tensor) -> None:
        """ValueError naming the visible layer unless ``v`` is a (batch, *its shape) tensor, floating-point on the
        network's dtype and device (outside autocast)."""
        shape = tuple(self.net.layers[self.visible].shape)
        if not isinstance(v, Tensor) or tuple(v.shape[1:]) != shape or v.ndim != len(shape) + 1:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"the visible layer {self.visible!r} takes states of shape (batch, *{shape}), got {got}")
        if not (torch.compiler.is_compiling() or torch.is_autocast_enabled(v.device.type)):
            # under autocast the input may be bf16 with float32 weights, by design
            self.net.check_tensor(v, f"the state of the visible layer {self.visible!r}")

    def forcing(self, v: Tensor) -> Tensor:
        """F^v(v): the total current into the visible layer on the slow manifold."""
        self.check_visible(v)
        if self.solver != "fixed_point":
            return self.net.currents(self.slow_manifold(v))[self.visible]
        return self.feedback(self.visible, self.branches, v)

    def __call__(self, v: Tensor) -> Tensor:
        """dv/dt = (F^v(v) - alpha v) / tau_v (Eqs. 12, 33)."""
        f = self.forcing(v)
        return (f - self.alpha * v) / self.tau if self.alpha else f / self.tau

    def slow_manifold(self, v: Tensor) -> dict[str, Tensor]:
        """Every layer's state on the slow manifold for visible state v (Eqs. 34-35)."""
        self.check_visible(v)
        out = {self.visible: v}

        def fill(name: str, x: Tensor, children: list[Branch]):
            g = self.act(name, x)
            for br in children:
                xc = self.solve(br, br.G(g)) if self.solver == "fixed_point" else br.G(g)
                out[br.node] = xc
                fill(br.node, xc, br.children)

        if self.solver == "fixed_point":
            fill(self.visible, v, self.branches)
            return out
        with torch.no_grad():  # the initial guess: each layer driven by its parent alone
            fill(self.visible, v.detach(), self.branches)
        out[self.visible] = v
        return solve_fast(self.net, out, self.visible, method=self.solver, tol=self.tol, max_iter=self.max_iter,
                          m=self.m, beta=self.beta)

    def energy(self, v: Tensor) -> Tensor:
        """The reduced network's Lyapunov function, for leaf branches (2-layer steps and the star):

            E(v) = [<v, g_v> - L_v(v)] - sum_B sum Phi_B(G^B(g_v))        (Krotov & Hopfield 2020, Eq. 3
                                                                             with h integrated out)
        Along dv/dt = F^v(v) - v it never increases when L_v is convex and every branch is tied
        (dE/dt = -tau_v vdot^T Hess(L_v) vdot), whatever the hidden Lagrangians.
        """
        if any(br.implicit for br in self.branches):
            raise ValueError("ReducedField.energy is defined for leaf branches only (2-layer steps and stars)")
        self.check_visible(v)
        vis = self.net.layers[self.visible]
        g = vis.activation(v)
        e = vis.energy(v, g)
        for br in self.branches:
            e = e - self.net.layers[br.node].lagrangian(br.G(g))
        return e

    def contraction_bound(self, br: Branch, norms: Callable[[Branch], tuple[float, float]] | None = None) -> float:
        """An upper bound on Lip(F^A) of the implicit solve x^A = G^A + F^A(x^A) of ``br`` (Eqs. 38-40):
        sum over children C of ||H^C|| s_C Lip((1 - F^C)^-1) ||G^C|| gain s_A, with s the largest activation slopes,
        Lip((1 - F)^-1) <= 1 / (1 - Lip F), and ``norms(C)`` the spectral norms of (G^C's, H^C's) matrices (default:
        the synapses' own, exactly)."""
        norms = norms or _raw_norms
        layers = self.net.layers
        total = 0.0
        for c in br.children:
            ng, nh = norms(c)
            lip_s = 1.0
            if c.implicit:
                f = self.contraction_bound(c, norms)
                lip_s = 1.0 / (1.0 - f) if f < 1 else math.inf
            gain = 1.0
            if c.synapse.affine is not None and c.down:
                gain = float(c.synapse.affine.weight.detach().abs().max())
            total += nh * layers[c.node].lagrangian.lipschitz * lip_s * ng * gain * layers[br.node].lagrangian.lipschitz
        return total

    def caveats(self, v: Tensor | None = None, *, contraction: bool = True) -> list[str]:
        """In words, every assumption of the energy picture and of the adiabatic limit that this network breaks
        (empty when none): a non-convex visible Lagrangian (E need not decrease); a visible Lagrangian without
        LayerNorm's zero mode with alpha != 1 (then F^v - alpha v is not this network's flow, and a block's step
        not its Euler step); a fast layer not faster than its parent (tau ratio); an implicit solve not certified
        to contract (bound; with a state ``v`` also the measured rate of 8 fixed-point iterations): several fast
        fixed points may then exist; untied or broken synapses (a pseudo-energy)."""
        out = []
        layers = self.net.layers
        vis = layers[self.visible].lagrangian
        if not vis.convex:
            out.append(f"visible layer {self.visible!r}: {vis.caveat or 'not convex'}")
        if self.alpha != 1 and not vis.zero_mode:
            out.append(f"visible layer {self.visible!r} ({vis.name}) has no zero mode in its Hessian (LayerNorm's, "
                       f"Eq. 13), so the decay alpha = {self.alpha:g} is not the network's own (alpha = 1): "
                       "tau_v dv/dt = F^v(v) - alpha v is not this network's flow, and a block's step v + F^v(v) is "
                       "not its Euler step")
        for top in self.branches:
            for br in top.walk():
                tb, tp = layers[br.node].tau, layers[br.parent].tau
                if tb >= tp:
                    out.append(f"fast layer {br.node!r} is not faster than {br.parent!r}: tau {tb:g} >= {tp:g} "
                               f"(ratio {tb / tp:g}); the adiabatic limit assumes tau_{br.node} << tau_{br.parent}")
        if contraction:
            rates = self.measured_rates(v) if v is not None else {}
            for top in self.branches:
                for br in top.walk():
                    if not br.implicit:
                        continue
                    bound = self.contraction_bound(br)
                    if bound >= 1:
                        rate = f", measured rate {rates[br.node]:.3g}" if br.node in rates else ""
                        out.append(f"fast layer {br.node!r}: its solve x = G + F(x) is not certified to contract "
                                   f"(Lip(F^{br.node}) <= {bound:.3g}{rate}), so the fast layers may have several "
                                   "fixed points: a solve from another start may land elsewhere")
        for br in self.branches:
            for b in br.walk():
                out.extend(b.synapse.caveats())
        return out

    def measured_rates(self, v: Tensor, n_iter: int = 8) -> dict[str, float]:
        """Per implicit layer, the geometric mean of the later residual ratios ||x^(a+1) - x^a|| / ||x^a - x^(a-1)||
        of ``n_iter`` nested fixed-point iterations at ``v`` (the first solve of each layer): < 1 contracts there."""
        first: dict[str, list[Tensor]] = {}

        def record(br: Branch, xs: list[Tensor]) -> None:
            first.setdefault(br.node, xs)

        probe = ReducedField(self.net, self.visible, solver="fixed_point", n_iter=n_iter, alpha=self.alpha)
        with torch.no_grad():
            probe.feedback(self.visible, probe.branches, v, None, record)
        out = {}
        for node, xs in first.items():
            d = [float((b - a).norm()) for a, b in zip(xs, xs[1:])]
            ratios = [d1 / d0 for d0, d1 in zip(d, d[1:]) if d0 > 0]
            tail = ratios[len(ratios) // 2:]
            if tail and min(tail) > 0:
                out[node] = math.exp(sum(math.log(r) for r in tail) / len(tail))
        return out


def _raw_norms(br: Branch) -> tuple[float, float]:
    """Exact spectral norms of the matrices of (G, H) of a branch."""
    syn = br.synapse
    nf = float(torch.linalg.matrix_norm(syn.weight.detach().double(), ord=2))
    nb = float(torch.linalg.matrix_norm(syn.feedback_weight().detach().double(), ord=2))
    return (nf, nb) if br.down else (nb, nf)


def adiabatic(net: Network, visible: str = "v", fast: Iterable[str] | None = None, **kwargs) -> ReducedField:
    """Take tau -> 0 for the ``fast`` layers (default: all but ``visible``), in ``order`` (slowest first;
    default: by distance from ``visible``); see ``ReducedField``."""
    return ReducedField(net, visible, fast, **kwargs)
