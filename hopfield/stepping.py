"""Fixed-step explicit integration of tau_A dx_A/dt = I_A - x_A (Krotov 2021, Eq. 14), with the energy (Eq. 17)
at every step for the price of a few dot products.

``simulate`` uses it for ``method`` "euler", "midpoint" and "rk4" (torchdiffeq's 3/8-rule RK4) when no gradient
is wanted; it equals ``torchdiffeq.odeint`` with the same method to round-off (tests/test_stepping.py: 1e-12 in
float64), on the output grid or on torchdiffeq's ``step_size`` grid with linear interpolation.

Why not torchdiffeq's loop: it allocates every stage's tensors afresh and evaluates the energy separately, two
GEMMs per synapse again. Here each stage writes into buffers allocated once (the state leaves no trail of
page-faulting allocations), each synapse's GEMM accumulates straight into dx/dt (baddbmm/addmm with alpha =
1/tau), and the energy of the state a step starts from is read off the currents that step's first stage computes
anyway. For a dense synapse between a and b, with forward current F = W g~_a + bias into b and feedback
B = V g_b + bias_fb into a (``DenseSynapse``'s energy, exactly):

    tied:             E_s = -g_b.F - g_a.bias_fb
    untied, broken:   E_s = -1/2 (g_b.F + g_a.B) - 1/2 (g_b.bias + g_a.bias_fb)

Other synapses add their own ``energy(g)``. benchmarks/simulate_vs_hamux.py measures what this buys.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .lagrangians.base import _fast_dot
from .synapses import DenseSynapse, _along, _contract, _dot

__all__ = ["FIXED_METHODS", "integrate_fixed"]

FIXED_METHODS = ("euler", "midpoint", "rk4")

# Buffers and stored states are plain ``new_empty`` tensors. (Advising them into transparent huge pages was measured
# both ways on the 2-core CPU: storing 101 states of 8 x 964 x 512 floats took 0.15-0.42 s against 0.59-0.68 s in
# 4 KiB faults on a freshly started machine, but once hours of training had fragmented memory the kernel compacted
# memory at each fault of an advised block, 6 s once for 1.6 GB, and a 100-step Euler run took 4.0-5.2 s against
# 3.8-4.2 s without the advice.)


class _Field:
    """dx/dt of a network into buffers, and on request its energy at the same state; counts evaluations."""

    def __init__(self, net, names: list[str], inputs: dict, clamped: tuple):
        self.net, self.names = net, names
        self.index = {n: i for i, n in enumerate(names)}
        self.layers = [net.layers[n] for n in names]
        self.inv_tau = [1.0 / layer.tau for layer in self.layers]
        self.inputs = [inputs.get(n) for n in names]
        self.free = [n not in clamped for n in names]
        # the energy read off dx/dt itself (see energy_from_field) needs every current to be a dense synapse's,
        # tied ones without a LayerNorm affine, and no clamped layer (its dx/dt is 0, not its current)
        self.from_field = all(self.free) and all(
            type(s) is DenseSynapse and (s.form != "tied" or s.affine is None) for s in net.synapses)
        self.gbuf: list[Tensor | None] = [None] * len(names)  # activations, written in place where possible
        self.aux: list[dict] = [{} for _ in names]  # what each activation left for the energy (LayerNorm's 1/s)
        self.nfe = 0

    def _gbuf(self, i: int, x: Tensor) -> Tensor:
        b = self.gbuf[i]
        if b is None or b.shape != x.shape or b.dtype != x.dtype or b.device != x.device:
            b = self.gbuf[i] = x.new_empty(x.shape)
        return b

    def __call__(self, y: list[Tensor], out: list[Tensor], t: float, energy: bool = False) -> Tensor | None:
        """Write dx/dt at state ``y`` into ``out``; return the energy per sample when ``energy``."""
        self.nfe += 1
        # what an activation leaves for the energy (aux) is asked for only when the energy is; none is left stale
        if not energy:
            for aux in self.aux:
                aux.clear()
        g = [layer.lagrangian.activation_into(x, self._gbuf(i, x), self.aux[i] if energy else None)
             for i, (layer, x) in enumerate(zip(self.layers, y))]
        from_field, energy = energy and self.from_field, energy and not self.from_field
        started = [False] * len(y)  # whether out[i] holds -x_i / tau_i (+ currents) yet
        acc = partial(self._accumulate, out, y, started)
        e_syn = None

        for syn in self.net.synapses:
            if type(syn) is DenseSynapse:  # subclasses may change the currents: they take the general path
                ia, ib = self.index[syn.layers[0]], self.index[syn.layers[1]]
                ga, gb, ax = g[ia], g[ib], syn._baxis
                if energy:  # the currents themselves, for the energy's dot products
                    fwd, fb = syn.forward_current(ga), syn.feedback_current(gb)
                    bias_terms = 0
                    if syn.has_bias_fb:
                        bias_terms = _dot(ga, _along(syn.bias_fb, ax, ga.ndim).expand_as(ga))
                    if syn.form == "tied":
                        e = -_dot(gb, fwd) - bias_terms
                    else:
                        if syn.has_bias:
                            bias_terms = bias_terms + _dot(gb, _along(syn.bias, ax, gb.ndim).expand_as(gb))
                        e = -0.5 * (_dot(gb, fwd) + _dot(ga, fb) + bias_terms)
                    e_syn = e if e_syn is None else e_syn + e
                    acc(ib, fwd)
                    acc(ia, fb)
                    continue
                if self.free[ib]:
                    acc(ib, None, syn.weight, syn.affine(ga) if syn.affine is not None else ga, ax)
                    if syn.has_bias:
                        out[ib].add_(_along(syn.bias, ax, gb.ndim), alpha=self.inv_tau[ib])
                if self.free[ia]:
                    acc(ia, None, syn.feedback_weight(), gb, ax)
                    if syn.has_bias_fb:
                        out[ia].add_(_along(syn.bias_fb, ax, ga.ndim), alpha=self.inv_tau[ia])
            else:  # any other synapse: its own currents (and energy)
                gd = dict(zip(self.names, g))
                for n, c in syn.currents(gd).items():
                    acc(self.index[n], c)
                if energy:
                    e = syn.energy(gd)
                    e_syn = e if e_syn is None else e_syn + e
        for i, x in enumerate(y):
            if not self.free[i]:
                out[i].zero_()
                continue
            if not started[i]:
                torch.mul(x, -self.inv_tau[i], out=out[i])
            if self.inputs[i] is not None:
                out[i].add_(self.inputs[i], alpha=self.inv_tau[i])
        if from_field:
            return self.energy_from_field(y, g, out)
        if not energy:
            return None
        total = 0
        for layer, x, gi in zip(self.layers, y, g):
            xg, lag = layer.lagrangian.terms_given(x, gi)
            total = total + xg - lag
        if e_syn is not None:
            total = total + e_syn
        for i, inp in enumerate(self.inputs):
            if inp is not None:
                total = total - _dot(inp.expand_as(g[i]), g[i])
        return total


    def _accumulate(self, out: list[Tensor], y: list[Tensor], started: list[bool], i: int, current: Tensor | None,
                    w: Tensor | None = None, g_in: Tensor | None = None, axis: int = 0) -> None:
        """out[i] += current / tau_i, or the GEMM w g_in along ``axis`` straight into out[i]; ``started[i]`` says
        whether out[i] holds -x_i / tau_i (+ currents) yet. (A method, not a closure in ``__call__``: a closure that
        calls itself is a reference cycle, and it held every state until the garbage collector ran.)"""
        if not self.free[i]:
            return
        a = self.inv_tau[i]
        o = out[i]
        if current is not None:
            if started[i]:
                o.add_(current, alpha=a)
            else:
                torch.sub(current, y[i], out=o).mul_(a)
                started[i] = True
            return
        # a batched GEMM along the second-to-last axis, or (as W g^T) along the last; the states may be
        # strided views of one flat (batch, N) tensor (hopfield.adaptive's layout): bmm writes those in place
        views = _as_batches(o, g_in, y[i])
        if views is None:
            self._accumulate(out, y, started, i, _contract(w, g_in, axis))
            return
        o3, g3, x3 = views
        if axis == o.ndim - 2:
            if started[i]:
                o3.baddbmm_(w.unsqueeze(0).expand(g3.shape[0], -1, -1), g3, alpha=a)
            else:
                torch.baddbmm(x3, w.unsqueeze(0).expand(g3.shape[0], -1, -1), g3, beta=-a, alpha=a, out=o3)
        elif axis == o.ndim - 1:
            wt = w.T.unsqueeze(0).expand(g3.shape[0], -1, -1)
            if started[i]:
                o3.baddbmm_(g3, wt, alpha=a)
            else:
                torch.baddbmm(x3, g3, wt, beta=-a, alpha=a, out=o3)
        else:
            self._accumulate(out, y, started, i, _contract(w, g_in, axis))
            return
        started[i] = True

    def energy_from_field(self, y: list[Tensor], g: list[Tensor], dx: list[Tensor]) -> Tensor:
        """Eq. 17 from the state, its activations and its dx/dt alone. Each dense synapse's energy is
        -1/2 (g_b.F + g_a.B) - 1/2 (g_b.bias + g_a.bias_fb) (module doc; tied ones have g_a.B = g_b.W g_a), so the
        synapses together give -1/2 sum_A g_A.I_A - (bias terms) with I_A = tau_A dx_A/dt + x_A - (input A), and

            E = sum_A [1/2 <x_A, g_A> - L_A(x_A) - 1/2 tau_A <g_A, dx_A/dt> - 1/2 <g_A, input_A>] - 1/2 (bias terms):

        two dot products per layer, and no GEMM."""
        total = 0
        for layer, x, gi, d, inp, aux in zip(self.layers, y, g, dx, self.inputs, self.aux):
            if layer.lagrangian.degree != 2:  # (for degree 2, <x, g>/2 - L = 0 exactly)
                total = total + layer.lagrangian.half_xg_minus_value(x, gi, aux)
            total = total - (0.5 * layer.tau) * _fast_dot(gi, d)
            if inp is not None:
                total = total - 0.5 * _dot(inp.expand_as(gi), gi)
        for syn in self.net.synapses:
            ga, gb, ax = g[self.index[syn.layers[0]]], g[self.index[syn.layers[1]]], syn._baxis
            if syn.has_bias:
                total = total - 0.5 * _dot(gb, _along(syn.bias, ax, gb.ndim).expand_as(gb))
            if syn.has_bias_fb:
                total = total - 0.5 * _dot(ga, _along(syn.bias_fb, ax, ga.ndim).expand_as(ga))
        return total


_CHECK_EVERY = 8  # steps between finiteness checks on the output grid (each reads every state once)


def _non_finite_layer(names: list[str], y) -> str | None:
    """The first layer whose state holds a NaN or inf (one sum per layer: either makes it non-finite), or None."""
    for n, x in zip(names, y):
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            return n
    return None


def _check(names: list[str], y: list[Tensor], time: float, sol: list[Tensor] | None, times: list[float],
           last: int) -> None:
    """NonFiniteStateError if the state ``y`` at ``time`` is not finite. With the stored solution ``sol`` (the
    output grid, ``y`` = its state ``last``), the error names the earliest non-finite state since the previous
    check, ``_CHECK_EVERY`` steps back."""
    from .dynamics import NonFiniteStateError

    layer = _non_finite_layer(names, y)
    if layer is None:
        return
    if sol is not None:
        for k in range(max(0, last - _CHECK_EVERY), last):
            layer_k = _non_finite_layer(names, [s[k] for s in sol])
            if layer_k is not None:
                raise NonFiniteStateError(layer_k, times[k])
    raise NonFiniteStateError(layer, time)


def _as_batches(*ts: Tensor) -> tuple[Tensor, ...] | None:
    """Each tensor as (batches, rows, cols) views over its last two axes, or None if one cannot be viewed so
    (a rank > 3 state that is a strided slice of a larger tensor)."""
    try:
        return tuple(t.view(-1, t.shape[-2], t.shape[-1]) for t in ts)
    except RuntimeError:
        return None


def _grid(t: Tensor, step_size: float | None) -> Tensor:
    """The steps' time grid: the output times, or torchdiffeq's grid of ``step_size`` (last point = t[-1])."""
    if step_size is None:
        return t
    niters = torch.ceil((t[-1] - t[0]) / step_size + 1).item()
    grid = torch.arange(0, niters, dtype=t.dtype, device=t.device) * step_size + t[0]
    grid[-1] = t[-1]
    return grid


def integrate_fixed(net, names: list[str], y0: tuple[Tensor, ...], t: Tensor, method: str, inputs: dict,
                    clamped: tuple, *, step_size: float | None = None, track_energy: bool = True,
                    check_finite: bool = True) -> tuple[list[Tensor], Tensor | None, int]:
    """States at the output times ``t`` (a (T, batch, *shape) tensor per layer), the energy there ((T, batch),
    or None) and the number of vector-field evaluations. Without autograd (callers hold ``torch.no_grad``)."""
    if method not in FIXED_METHODS:
        raise ValueError(f"integrate_fixed: method must be one of {FIXED_METHODS}, got {method!r}")
    # finiteness is checked per step, not per stage, and on the output grid only every _CHECK_EVERY steps: a NaN
    # or inf spreads to the states that follow, each state is stored, and the first non-finite one is found there
    field = _Field(net, names, inputs, clamped)
    grid = _grid(t, step_size)
    on_grid = step_size is None  # every output time is a grid point: its energy comes with the next step
    sol = [x.new_empty((len(t), *x.shape)) for x in y0]
    energy = torch.empty((len(t), y0[0].shape[0]), dtype=y0[0].dtype, device=y0[0].device) \
        if track_energy else None
    for s, x in zip(sol, y0):
        s[0] = x
    # on the output grid the working state is the stored one: each step writes the next state straight into its
    # slot of the solution (no copy per step); off it, the state lives in its own buffer
    y = [s[0] for s in sol] if on_grid else [x.clone(memory_format=torch.contiguous_format) for x in y0]
    buf = lambda: [x.new_empty(x.shape) for x in y0]  # noqa: E731
    k1, k2 = buf(), buf()
    k3, k4, tmp = (buf(), buf(), buf()) if method == "rk4" else (None, None, buf() if method == "midpoint" else None)
    y_prev = buf() if not on_grid else None
    times = grid.tolist()
    out_times = t.tolist()
    j = 1
    for step in range(len(times) - 1):
        t0, t1 = times[step], times[step + 1]
        dt = float(grid[step + 1] - grid[step])
        e0 = field(y, k1, t0, energy=track_energy and on_grid)
        if e0 is not None:
            energy[step] = e0
        if y_prev is not None:
            for p, x in zip(y_prev, y):
                p.copy_(x)
        nxt = [s[step + 1] for s in sol] if on_grid else y
        if method == "euler":
            for o, x, d in zip(nxt, y, k1):
                torch.add(x, d, alpha=dt, out=o)
        elif method == "midpoint":
            for m, x, d in zip(tmp, y, k1):
                torch.add(x, d, alpha=0.5 * dt, out=m)
            field(tmp, k2, t0 + 0.5 * dt)
            for o, x, d in zip(nxt, y, k2):
                torch.add(x, d, alpha=dt, out=o)
        else:  # torchdiffeq's rk4: the 3/8 rule (rk4_alt_step_func)
            third = 1.0 / 3.0
            for m, x, d in zip(tmp, y, k1):
                torch.add(x, d, alpha=dt * third, out=m)
            field(tmp, k2, t0 + dt * third)
            for m, x, a, b in zip(tmp, y, k1, k2):  # y + dt (k2 - k1 / 3)
                torch.sub(b, a, alpha=third, out=m).mul_(dt).add_(x)
            field(tmp, k3, t0 + 2 * dt * third)
            for m, x, a, b, c in zip(tmp, y, k1, k2, k3):  # y + dt (k1 - k2 + k3)
                torch.sub(a, b, out=m).add_(c).mul_(dt).add_(x)
            field(tmp, k4, t1)
            for o, x, a, b, c, d in zip(nxt, y, k1, k2, k3, k4):  # y + (k1 + 3 (k2 + k3) + k4) dt / 8
                b.add_(c).mul_(3.0).add_(a).add_(d).mul_(dt * 0.125)
                torch.add(x, b, out=o)
        y = nxt
        if check_finite and (not on_grid or (step + 1) % _CHECK_EVERY == 0):
            _check(names, y, t1, sol if on_grid else None, times, step + 1)
        while j < len(out_times) and t1 >= out_times[j]:
            if not on_grid:  # (on the grid the step wrote it)
                if out_times[j] == t1:
                    for s, x in zip(sol, y):
                        s[j] = x
                else:  # torchdiffeq's linear interpolation between the step's ends
                    slope = (out_times[j] - t0) / (t1 - t0) if out_times[j] != t0 else 0.0
                    for s, p, x in zip(sol, y_prev, y):
                        s[j] = p + slope * (x - p)
            j += 1
    if check_finite:
        _check(names, y, times[-1], sol if on_grid else None, times, len(times) - 1)
    if track_energy:
        if on_grid:
            energy[-1] = field(y, k1, times[-1], energy=True)
            field.nfe -= 1  # the energy at the last output is not a step's evaluation
        else:
            for k in range(len(t)):
                energy[k] = net.energy({n: s[k] for n, s in zip(names, sol)}, inputs)
    return sol, energy, field.nfe
