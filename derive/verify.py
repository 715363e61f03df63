"""``derive.verify``: check a derivation against the network it came from, numerically.

1. The adiabatic limit: the full network is simulated with every fast layer's tau scaled by eps (their ratios
   kept), from the fast layers at rest (x = 0) and a visible state v, until the fast transient has died out
   (``t_end``; default 30 times the slowest scaled fast tau, so every eps costs about the same number of steps);
   then the visible velocity is compared with the reduced field tau_v dv/dt = F^v(v) - v (alpha = 1, the
   network's own decay) at the same v. On a well-posed network the relative error falls in proportion to eps (a
   slope of 1 in log-log).
2. The discrete-time limit: a derived block's step is compared with one Euler step v + (dt/tau_v)(F^v(v) - alpha v)
   of the reduced field solved to tolerance, split as the block splits it (one sub-step per group of branches,
   alpha shared among them) and with the same alpha and dt: what the block's fixed-point iterations and
   normalisations leave out.
Together with ``ReducedField.caveats``: the assumptions that the numbers do not test, in words.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hopfield import Layer, Network
from hopfield.dynamics import NonFiniteStateError

from .discrete import DerivedBlock
from .fastsolve import SlowManifoldError
from .reduced import ReducedField

__all__ = ["VerifyReport", "verify"]


@dataclass
class VerifyReport:
    """What ``verify`` measured. ``velocity_error[k]``: max |full - reduced| / max |reduced| of the visible
    velocity at ``eps[k]``; ``slope``: of log error against log eps over the two smallest eps (1: proportional to
    eps); ``block_error``: max
    |block(v) - Euler step| / max |Euler step - v|; ``failure``: why a measurement could not be made."""

    eps: list[float]
    velocity_error: list[float]
    slope: float | None
    block_error: float | None = None
    caveats: list[str] = field(default_factory=list)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        """The full network's visible velocity approaches the reduced field in proportion to eps (slope 0.7-1.3)
        and ends within 1 % of it."""
        return (self.failure is None and self.slope is not None and 0.7 <= self.slope <= 1.3
                and self.velocity_error[-1] < 1e-2)

    def table(self) -> str:
        lines = ["| eps (tau_fast / its value) | visible velocity: relative error, full vs reduced |", "|---|---|"]
        lines += [f"| {e:g} | {err:.3g} |" for e, err in zip(self.eps, self.velocity_error)]
        return "\n".join(lines)

    def __str__(self) -> str:
        out = [self.table(), ""]
        if self.slope is not None:
            out.append(f"slope of log error vs log eps, smallest two eps: {self.slope:.2f} (1: the error is "
                       "proportional to eps)")
        if self.block_error is not None:
            out.append(f"derived block vs one Euler step of the reduced field: relative error {self.block_error:.3g}")
        if self.failure:
            out.append(f"FAILED: {self.failure}")
        out.append("verdict: " + ("the reduced field is the network's adiabatic limit here" if self.ok else
                                  "the reduced field is NOT shown to be this network's adiabatic limit"))
        out += [f"caveat: {c}" for c in self.caveats]
        return "\n".join(out)

    def plot(self, path) -> Path:
        """The velocity error against eps on log-log axes, beside the line proportional to eps; a PNG at ``path``
        (returned)."""
        from hopfield.plot import plt, save_figure  # pyplot on the Agg backend

        fig, ax = plt.subplots(figsize=(5, 4))
        done = [(e, r) for e, r in zip(self.eps, self.velocity_error) if math.isfinite(r)]
        if done:
            xs, ys = zip(*done)
            ax.loglog(xs, ys, "o-", label="full vs reduced visible velocity")
            ax.loglog(xs, [ys[0] * x / xs[0] for x in xs], ":", color="grey", label="proportional to eps")
        ax.set(xlabel="eps (fast taus scaled by)", ylabel="relative error",
               title="verified" if self.ok else "NOT verified")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)


def _slope(eps: list[float], err: list[float]) -> float | None:
    """The slope of log error against log eps over the two smallest eps (the asymptotic regime: the largest eps
    may still carry higher-order terms)."""
    pts = [(math.log10(e), math.log10(r)) for e, r in sorted(zip(eps, err)) if r > 0 and math.isfinite(r)][:2]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den > 0 else None


def _group_forcing(blk: DerivedBlock, v: Tensor, group: list[str]) -> Tensor:
    """The current into the visible layer from the branches ``group``, on the slow manifold solved to tolerance
    (every fast layer at its joint fixed point, independent of the block's own iterations)."""
    ref = ReducedField(blk.net, blk.visible)
    state = ref.slow_manifold(v)
    g = {n: blk.net.layers[n].activation(x) for n, x in state.items()}
    by_name = {br.node: br for br in ref.branches}
    return sum(by_name[n].synapse.currents(g)[blk.visible] for n in group)


def verify(net: Network, visible: str = "v", *, eps=(1e-1, 1e-2, 1e-3), v: Tensor | None = None, batch: int = 2,
           block: DerivedBlock | None = None, t_end: float | None = None, rtol: float = 1e-8, atol: float = 1e-10,
           seed: int = 0, path=None) -> VerifyReport:
    """Check the adiabatic limit of ``net`` (and, given ``block``, its discrete-time limit) numerically, in
    float64; see the module doc. ``v``: the visible state to start from (default: ``batch`` standard normal draws
    from ``seed``). ``path``: also write the PNG. Returns a ``VerifyReport`` (``print`` it for the table)."""
    if not isinstance(net, Network):
        raise TypeError(f"verify: net is a hopfield.Network (derive.block_network(kind, S, C), or a spec's "
                        f"derive.load_spec(...).build(S, C)), got {type(net).__name__}")
    if visible not in net.layers:
        raise ValueError(f"verify: unknown visible layer {visible!r}; layers are {list(net.layers)}")
    try:
        eps = [float(e) for e in ([eps] if isinstance(eps, (int, float)) else eps)]
    except (TypeError, ValueError):
        eps = None
    if not eps or not all(0 < e < math.inf for e in eps):
        raise ValueError("verify: eps must be one or more finite numbers > 0 (the factors of the fast layers' tau)")
    net = copy.deepcopy(net).double()
    tau_v = net.layers[visible].tau
    if v is None:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(batch, *net.layers[visible].shape, generator=g, dtype=torch.float64)
    v = v.detach().double()
    errors: list[float] = []
    failure = None
    reduced = ReducedField(net, visible, alpha=1.0)
    reduced.check_visible(v)
    caveats = reduced.caveats(v)
    for e in eps:
        layers = {n: L if n == visible else Layer(L.shape, L.lagrangian, e * L.tau) for n, L in net.layers.items()}
        full = Network(layers, list(net.synapses))
        state = full.init_state(v.shape[0], scale=0.0, dtype=torch.float64)
        state[visible] = v
        horizon = t_end if t_end is not None else 30 * max(L.tau for n, L in layers.items() if n != visible)
        try:
            with torch.no_grad():
                traj = full.simulate(state, torch.tensor([0.0, horizon], dtype=torch.float64), method="dopri5",
                                     rtol=rtol, atol=atol, track_energy=False)
                end = traj.final()
                vel = full.vector_field(end)[visible]
                red = ReducedField(full, visible, alpha=1.0)(end[visible])
        except (SlowManifoldError, NonFiniteStateError) as err:
            failure = f"eps {e:g}: {err}"
            errors.append(math.nan)
            continue
        errors.append(float((vel - red).abs().max() / red.abs().max().clamp_min(1e-300)))
    block_error = None
    if block is not None:
        blk = copy.deepcopy(block).double().eval()
        cfg = blk.config
        dt = cfg.dt if cfg.dt is not None else tau_v
        try:
            with torch.no_grad():
                x = v
                for _ in range(cfg.steps):
                    for group in blk.groups:  # the block's splitting: one Euler sub-step per group of branches
                        x = x + (dt / tau_v) * (_group_forcing(blk, x, group) - cfg.alpha / len(blk.groups) * x)
                out = blk(v)
            block_error = float((out - x).abs().max() / (x - v).abs().max().clamp_min(1e-300))
        except SlowManifoldError as err:
            failure = (failure + "; " if failure else "") + f"the block's reference step: {err}"
    report = VerifyReport(eps, errors, _slope(eps, errors), block_error, caveats, failure)
    if path is not None:
        report.plot(path)
    return report
