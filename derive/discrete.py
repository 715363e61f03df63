"""The discrete-time limit: one Euler step of the reduced vector field is a residual block.

    v <- v + (dt / tau_v) (F^v(v) - alpha v)                                   (iMixer paper Eqs. 12-14)

With dt = tau_v and alpha = 0 (allowed by the LayerNorm zero mode, Eq. 13) this is v + F^v(v): the Mixer's
token or channel step for a 2-layer network (Eq. 14), the iMixer token mixer for the v - x - h chain (Eq. 30),
the L-layer iMixer for longer chains (Eq. 42), and the parallelized Mixer for the star s - v - c.
Each implicit solve (1 - F^A)^-1 becomes ``n_iter`` fixed-point iterations (Eq. 29), with the matrices
inside F^A softly spectrally normalised so that F^A can contract. ``splitting="sequential"`` takes the Euler
step one group of branches at a time (Lie-Trotter splitting: tokens, then channels, i.e. the vanilla Mixer
block); ``"parallel"`` takes it over all branches at once (the parallelized Mixer).

The block's parameters are the network's own interaction matrices (``block.net``): a tied network gives
a weight-tied block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import sympy
import torch
from torch import Tensor, nn

from hopfield import Network

from .reduced import Branch, ReducedField, count, number
from .spectral import SoftSpectralNorm

__all__ = ["INNER_NORMS", "AxisBatchNorm", "DerivedBlock", "DiscreteConfig", "SolveCertificate", "discretize"]

INNER_NORMS = ("spectral", "none", "batch")


@dataclass
class DiscreteConfig:
    """How the reduced flow becomes a block. ``dt=None`` means dt = tau_v (Eq. 14)."""

    n_iter: int = 2
    dt: float | None = None
    alpha: float = 0.0
    splitting: str = "parallel"
    groups: Sequence[Sequence[str]] | None = None  # sequential: hidden layers per sub-step; default one per branch
    # what normalises the matrices inside a contraction F^A: "spectral" (soft spectral norm, the iMixer's), "none",
    # or "batch" (BatchNorm after each of them: the iMixer's Table 3 ablation, outside the Hopfield picture)
    inner_norm: str = "spectral"
    coeff: float = 0.9
    n_power: int = 8
    drop_path: float = 0.0
    steps: int = 1  # Euler steps per block, same weights (the parallelized Mixer's n_iter)

    def __post_init__(self):
        checks = (
            ("n_iter", count(self.n_iter, 0), "an int >= 0"),
            ("dt", self.dt is None or (number(self.dt) and self.dt > 0), "None (dt = tau_v) or a number > 0"),
            ("alpha", number(self.alpha), "a finite number"),
            ("splitting", self.splitting in ("parallel", "sequential"), "'parallel' or 'sequential'"),
            ("inner_norm", self.inner_norm in INNER_NORMS, f"one of {INNER_NORMS}"),
            ("coeff", number(self.coeff) and self.coeff > 0, "a number > 0 (the spectral-norm bound)"),
            ("n_power", count(self.n_power, 1), "an int >= 1 (power iterations)"),
            ("drop_path", number(self.drop_path) and 0 <= self.drop_path < 1, "in [0, 1)"),
            ("steps", count(self.steps, 1), "an int >= 1"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"DiscreteConfig.{name} must be {want}, got {getattr(self, name)!r}")


@dataclass
class SolveCertificate:
    """A fixed-point solve x = z + F^A(x): an upper bound on Lip(F^A), and what was measured."""

    layer: str
    n_iter: int
    lipschitz_bound: float
    ratios: list[float] = field(default_factory=list)  # measured ||x^(a+1) - x^a|| / ||x^a - x^(a-1)||

    @property
    def certified(self) -> bool:
        return self.lipschitz_bound < 1

    def __str__(self) -> str:
        verdict = "contraction certified" if self.certified else "NOT certified to contract"
        s = f"FPA^{self.layer}: Lip(F^{self.layer}) <= {self.lipschitz_bound:.4g} ({verdict}), n_iter={self.n_iter}"
        if self.ratios:
            s += f"; measured residual ratios {', '.join(f'{r:.3g}' for r in self.ratios)}"
        return s


def _key(br: Branch) -> str:
    a, b = br.synapse.layers
    return f"{a}_{b}"


def _bn_gain(bn: nn.BatchNorm1d) -> float:
    """The Lipschitz constant of an eval-mode BatchNorm: max |gamma| / sqrt(running_var + eps)."""
    gamma = bn.weight.detach().abs() if bn.affine else torch.ones_like(bn.running_var)
    return float((gamma.double() / (bn.running_var.double() + bn.eps).sqrt()).max())


class AxisBatchNorm(nn.BatchNorm1d):
    """BatchNorm of a current along a layer's axis ``axis`` (its features), the statistics over every other axis
    and the batch: what ``DiscreteConfig(inner_norm="batch")`` puts after each matrix inside a contraction. Not a
    Lagrangian's gradient nor a synapse: the block with it is no longer a limit of a Hopfield network."""

    def __init__(self, num_features: int, axis: int):
        super().__init__(num_features)
        self.axis = axis

    def forward(self, x: Tensor) -> Tensor:
        y = torch.movedim(x, self.axis, -1)
        shape = y.shape
        y = super().forward(y.reshape(-1, shape[-1])).reshape(shape)
        return torch.movedim(y, -1, self.axis)


class DerivedBlock(nn.Module):
    """One discrete step of the visible layer of ``net`` after the adiabatic limit; see the module doc."""

    kind: str | None = None  # "mixer", "imixer", ... when built by ``derive.derived_block``: names its weights

    def __init__(self, net: Network, visible: str = "v", config: DiscreteConfig | None = None):
        super().__init__()
        self.config = cfg = config or DiscreteConfig()
        self.net = net
        self.visible = visible
        self.field = ReducedField(net, visible, solver="fixed_point", n_iter=cfg.n_iter, alpha=cfg.alpha)
        self.scale = (cfg.dt if cfg.dt is not None else self.field.tau) / self.field.tau
        self.branches = self.field.branches
        # inside contractions (branches below the first level): a soft spectral norm of each matrix, or a
        # BatchNorm after each current ("<a>_<b>": the synapse's forward current a -> b, "<a>_<b>_fb": b -> a)
        self.spectral = nn.ModuleDict()
        self.batch_norm = nn.ModuleDict()
        for top in self.branches:
            for br in top.walk():
                if br.depth < 2:
                    continue
                syn = br.synapse
                n_b, n_a = syn.weight.shape
                if cfg.inner_norm == "spectral":
                    self.spectral[_key(br)] = SoftSpectralNorm((n_b, n_a), cfg.coeff, cfg.n_power)
                    if syn.form != "tied":
                        self.spectral[_key(br) + "_fb"] = SoftSpectralNorm((n_a, n_b), cfg.coeff, cfg.n_power)
                elif cfg.inner_norm == "batch":
                    self.batch_norm[_key(br)] = AxisBatchNorm(n_b, syn.axis)
                    self.batch_norm[_key(br) + "_fb"] = AxisBatchNorm(n_a, syn.axis)
        names = [br.node for br in self.branches]
        if cfg.splitting == "parallel":
            self.groups = [names]
        else:
            self.groups = [list(g) for g in cfg.groups] if cfg.groups is not None else [[n] for n in names]
            flat = [n for g in self.groups for n in g]
            if sorted(flat) != sorted(names):
                raise ValueError(f"DiscreteConfig.groups {self.groups} must list each of the visible layer's "
                                 f"neighbours {names} exactly once")
        self.drop_path = nn.ModuleDict()
        if cfg.drop_path > 0:
            from timm.layers import DropPath

            for n in names:
                self.drop_path[n] = DropPath(cfg.drop_path)
        self.record = False
        self.trace: list[dict] = []

    # ------------------------------------------------------------------ the step
    def _weights(self, br: Branch) -> tuple[Tensor | None, Tensor | None]:
        """(matrix of G, matrix of H) for this branch, spectrally normalised inside contractions."""
        key = _key(br)
        if key not in self.spectral:
            return None, None
        syn = br.synapse
        w = self.spectral[key](syn.weight)
        v = w.T if syn.form == "tied" else self.spectral[key + "_fb"](syn.feedback_weight())
        return (w, v) if br.down else (v, w)

    def _maps(self, br: Branch):
        """(G, H) of this branch as the block applies them: normalised matrices, BatchNorm after them."""
        wg, wh = self._weights(br)
        key = _key(br)
        if key not in self.batch_norm:
            return (lambda g: br.G(g, wg)), (lambda g: br.H(g, wh))
        bn_fwd, bn_fb = self.batch_norm[key], self.batch_norm[key + "_fb"]
        bn_g, bn_h = (bn_fwd, bn_fb) if br.down else (bn_fb, bn_fwd)
        return (lambda g: bn_g(br.G(g, wg))), (lambda g: bn_h(br.H(g, wh)))

    def _on_solve(self, br: Branch, iterates: list[Tensor]) -> None:
        self.trace.append({"layer": br.node, "iterates": [x.detach() for x in iterates]})

    def branch_update(self, br: Branch, g: Tensor) -> Tensor:
        """H^B(S^B(G^B(g_v))): branch B's current into the visible layer."""
        G, H = self._maps(br)
        on = self._on_solve if self.record else None
        x = self.field.solve(br, G(g), self._maps, on)
        return H(self.field.act(br.node, x))

    def forward(self, v: Tensor) -> Tensor:
        self.field.check_visible(v)
        if self.record:
            self.trace = []
        by_name = {br.node: br for br in self.branches}
        alpha = self.config.alpha / len(self.groups)
        for _ in range(self.config.steps):
            for group in self.groups:
                g = self.field.act(self.visible, v)
                out = v if not alpha else v - (self.scale * alpha) * v
                for name in group:
                    upd = self.branch_update(by_name[name], g)
                    if self.scale != 1:
                        upd = self.scale * upd
                    if name in self.drop_path:
                        upd = self.drop_path[name](upd)
                    out = out + upd
                v = out
        return v

    def penalty(self) -> Tensor:
        """sum ||W_break||^2 over symmetry-breaking synapses (times lambda in the loss; Karakida et al. 2024)."""
        terms = [br.synapse.weight_break.square().sum() for top in self.branches for br in top.walk()
                 if br.synapse.form == "broken"]
        return sum(terms) if terms else torch.zeros(())

    # ------------------------------------------------------------------ contraction
    def _exact_norms(self, br: Branch) -> tuple[float, float]:
        syn = br.synapse
        key = _key(br)
        if key in self.spectral:
            nf = self.spectral[key].bound(syn.weight.detach())
            nb = nf if syn.form == "tied" else self.spectral[key + "_fb"].bound(syn.feedback_weight().detach())
        else:
            nf = float(torch.linalg.matrix_norm(syn.weight.detach().double(), ord=2))
            nb = float(torch.linalg.matrix_norm(syn.feedback_weight().detach().double(), ord=2))
        if key in self.batch_norm:  # the eval-mode BatchNorm: a diagonal map |gamma| / sqrt(running_var + eps)
            nf *= _bn_gain(self.batch_norm[key])
            nb *= _bn_gain(self.batch_norm[key + "_fb"])
        return (nf, nb) if br.down else (nb, nf)

    def certificate(self, v: Tensor | None = None, n_iter: int | None = None) -> list[SolveCertificate]:
        """Every implicit solve's bound Lip(F^A) <= prod ||W|| x largest activation slope (composed through
        nested inverses as 1 / (1 - Lip)); with a state ``v`` also the measured contraction ratios, from the
        block's own ``n_iter`` iterations or, with ``n_iter``, from that many (to see whether the trained F^A
        contracts beyond the iterations the block takes). Both describe the block's next forward in its current
        mode (with ``inner_norm="batch"`` the bound is the eval-mode one, BatchNorm's running statistics); the
        call leaves every buffer (power iteration, BatchNorm statistics) as it was."""
        if n_iter is not None and not (isinstance(n_iter, int) and n_iter >= 0):
            raise ValueError(f"certificate: n_iter must be an int >= 0, got {n_iter!r}")
        iters = self.config.n_iter if n_iter is None else n_iter
        out = []
        for top in self.branches:
            for br in top.walk():
                if br.implicit:
                    out.append(SolveCertificate(br.node, iters, self.field.contraction_bound(br, self._exact_norms)))
        if v is not None and out:
            was, saved = self.record, [(b, b.clone()) for b in self.buffers()]
            field_iters = self.field.n_iter
            self.record, self.field.n_iter = True, iters
            try:
                with torch.no_grad():
                    self(v)
            finally:
                self.record, self.field.n_iter = was, field_iters
                with torch.no_grad():
                    for b, copy in saved:
                        b.copy_(copy)
            by_layer = {c.layer: c for c in out}
            for rec in self.trace:
                xs = rec["iterates"]
                d = [float((b - a).norm()) for a, b in zip(xs, xs[1:])]
                ratios = [d1 / d0 for d0, d1 in zip(d, d[1:]) if d0 > 0]
                c = by_layer[rec["layer"]]
                if not c.ratios:  # first call of the solve (nested solves are called many times)
                    c.ratios = ratios
        return out

    def caveats(self, v: Tensor | None = None) -> list[str]:
        """Every assumption this block's derivation breaks, in words (``ReducedField.caveats`` of its network, with
        its own alpha), the contraction judged by the block's own certificate (its normalised matrices; with a
        state ``v`` also the measured rate of 8 iterations); empty when none."""
        out = self.field.caveats(contraction=False)
        for cert in self.certificate(v, n_iter=8 if v is not None else None):
            if not cert.certified:
                rate = ""
                tail = cert.ratios[len(cert.ratios) // 2:]
                if tail and min(tail) > 0:
                    rate = f", measured rate {math.exp(sum(math.log(r) for r in tail) / len(tail)):.3g}"
                out.append(f"fast layer {cert.layer!r}: its solve is not certified to contract (Lip(F^{cert.layer}) "
                           f"<= {cert.lipschitz_bound:.3g}{rate}), so FPA_{self.config.n_iter} need not approach "
                           "one fixed point of the network: the block is then not its adiabatic limit")
        return out

    def certified_coeff(self, target: float = 1.0) -> float:
        """The largest spectral-norm coefficient c with every Lip(F^A) bound < ``target`` when every normalised
        matrix has norm c (soft normalisation caps them there)."""
        solves = [br for top in self.branches for br in top.walk() if br.implicit]
        if not solves:
            return math.inf

        def worst(c):
            return max(self.field.contraction_bound(br, lambda _: (c, c)) for br in solves)

        lo, hi = 0.0, 1.0
        while worst(hi) < target:
            hi *= 2
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if worst(mid) < target else (lo, mid)
        return lo

    def set_coeff(self, coeff: float) -> None:
        self.config.coeff = float(coeff)
        for sn in self.spectral.values():
            sn.coeff = float(coeff)

    # ------------------------------------------------------------------ explanation
    def rule(self) -> tuple[list[sympy.Expr], dict[str, sympy.Expr]]:
        """The update as sympy expressions: one assignment per sub-step, and F^A for every implicit solve."""
        nc = {"commutative": False}
        wheres: dict[str, sympy.Expr] = {}

        def act(name, x):
            sym = self.net.layers[name].lagrangian.symbol
            return sympy.Function(sym)(x) if sym else x

        def xi(to, frm):
            return sympy.Symbol(f"xi^({to},{frm})", **nc)

        def current(br: Branch, into: str, frm: str, gx):
            syn = br.synapse
            forward = syn.layers == (frm, into)
            if forward and syn.affine is not None:
                gx = sympy.Function(f"Affine^({into},{frm})")(gx)
            e = xi(into, frm) * gx
            if (forward and syn.has_bias) or (not forward and syn.has_bias_fb):
                e = e + sympy.Symbol(f"b^({into},{frm})", **nc)
            return e

        def branch(br: Branch, gp):
            z = current(br, br.node, br.parent, gp)
            if br.implicit:
                x = sympy.Symbol(br.node, **nc)
                wheres[br.node] = sum((branch(c, act(br.node, x)) for c in br.children), sympy.S.Zero)
                z = sympy.Function(f"FPA_{self.config.n_iter}^{br.node}")(z)
            return current(br, br.parent, br.node, act(br.node, z))

        v = sympy.Symbol(self.visible, **nc)
        by_name = {br.node: br for br in self.branches}
        steps = []
        for group in self.groups:
            upd = sum((branch(by_name[n], act(self.visible, v)) for n in group), sympy.S.Zero)
            if self.scale != 1:
                upd = sympy.nsimplify(self.scale) * upd
            alpha = self.config.alpha / len(self.groups)
            if alpha:
                upd = upd - sympy.nsimplify(self.scale * alpha) * v
            steps.append(v + upd)
        return steps * self.config.steps, wheres

    def explain(self, latex: bool = False) -> str:
        """The update rule in readable math (plain text, or LaTeX with ``latex=True``)."""
        steps, wheres = self.rule()
        fmt = sympy.latex if latex else sympy.sstr
        arrow = r" \leftarrow " if latex else " <- "
        lines = [self.visible + arrow + fmt(s) for s in steps]
        for name, f in wheres.items():
            lines.append(("  where " if not latex else r"\quad F^{" + name + "}(" + name + ") = ")
                         + (f"F^{name}({name}) = " if not latex else "") + fmt(f))
        notes = []
        for top in self.branches:
            for br in top.walk():
                syn = br.synapse
                a, b = syn.layers
                if syn.form == "tied":
                    notes.append(f"xi^({a},{b}) = xi^({b},{a})^T (tied)")
                elif syn.form == "broken":
                    notes.append(f"xi^({a},{b}) = xi^({b},{a})^T + W_break (symmetry breaking)")
                if _key(br) in self.spectral:
                    which = f"xi^({b},{a})" + (f", xi^({a},{b})" if syn.form != "tied" else "")
                    notes.append(f"{which}: soft spectral norm <= {self.config.coeff:g}")
                if _key(br) in self.batch_norm:
                    notes.append(f"BatchNorm after xi^({b},{a}) and xi^({a},{b}) (not a Hopfield limit)")
        if not latex and notes:
            lines.append("  with " + "; ".join(notes))
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"splitting={self.config.splitting!r}, n_iter={self.config.n_iter}\n" + self.explain()


def discretize(net: Network, visible: str = "v", config: DiscreteConfig | None = None, **kwargs) -> DerivedBlock:
    """The derived block of ``net``: ``config`` or its fields as keyword arguments (see ``DiscreteConfig``)."""
    if config is not None and kwargs:
        raise TypeError("discretize: pass either config or keyword arguments, not both")
    return DerivedBlock(net, visible, config or DiscreteConfig(**kwargs))
