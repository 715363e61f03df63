"""Adaptive Dormand-Prince 5(4) integration (``method="dopri5"``) for ``simulate`` when no gradient is wanted:
torchdiffeq's dopri5 step for step, each sample of the batch with its own steps, in buffers allocated once.

Each sample is integrated as torchdiffeq integrates that sample alone (tests/test_stepping.py: 1e-12 in float64):
the same tableau, initial step (Hairer, Norsett & Wanner, Sec. II.4), error norm for a tuple of states (the
largest of the layers' RMS norms), step-size rule (safety 0.9, growth <= 10, shrink >= 0.2 on a rejection) and
quartic dense output at the output times. Controlling each sample on its own, one sample's stiff patch does not
shrink every other sample's steps, and a sample's trajectory does not depend on the batch it came in.

Why not a library's loop (docs/benchmarks.md): at the Mixer-S size a state is (batch, 500k) floats, so each pass
over it costs as much as a small GEMM. torchdiffeq and torchode allocate every stage afresh and make several
passes per stage, and torchode's dense output gathers the stages per sample and output; at batch 8 their own
arithmetic took longer than the vector field's GEMMs. Here every stage is one ``baddbmm`` that reads the stages it
needs and writes the next stage's input (per-sample step sizes are its batch of 1 x s coefficients), the error
norm is taken in cache-sized pieces without materialising the error, and each output is one ``addmm`` per layer
straight into its slot of the solution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stepping import _Field

__all__ = ["ADAPTIVE_OWN", "integrate_dopri5"]

ADAPTIVE_OWN = ("dopri5",)
MAX_STEPS = 1_000_000  # a solve that cannot finish stops here (an error) rather than running forever
_PIECE = 1 << 16  # units per piece of the error norm: a few of these stay in cache

# Dormand & Prince (1980): stage matrix (row i: the coefficients of k_1..k_i in stage i+1's input; the last row is
# the 5th-order solution, so the 7th stage is f(y_1): first same as last), error weights (5th minus 4th order)
_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_E = (35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
      -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)
# Shampine's (1986) midpoint weights, which fix the quartic dense output together with y_0, y_1, f_0 and f_1
_MID = (6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
        187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)
_SAFETY, _IFACTOR, _DFACTOR, _ORDER = 0.9, 10.0, 0.2, 5


def _dense_weights(x: float) -> list[float]:
    """w_j(x) with y(t_0 + x dt) = y_0 + dt sum_j w_j(x) k_j: torchdiffeq's quartic through y_0, y_1, y_mid, f_0 = k_1
    and f_1 = k_7 (``_interp_fit``), written in the stages (the y_0 terms of its coefficients cancel)."""
    b = _A[-1] + (0.0,)
    w = []
    for j in range(7):
        d1, d7 = float(j == 0), float(j == 6)
        a4 = 2 * (d7 - d1) - 8 * b[j] + 16 * _MID[j]
        a3 = 5 * d1 - 3 * d7 + 14 * b[j] - 32 * _MID[j]
        a2 = d7 - 4 * d1 - 5 * b[j] + 16 * _MID[j]
        w.append((((a4 * x + a3) * x + a2) * x + d1) * x)
    return w


def _next_step(dt: float, ratio: float) -> float:
    """torchdiffeq's ``_optimal_step_size``: dt * min(10, max(0.9 / ratio^(1/5), 0.2)), no shrinking below 1 on an
    accepted step; NaN for a NaN ratio (the step then underflows: an error)."""
    if ratio == 0:
        return dt * _IFACTOR
    lower = 1.0 if ratio < 1 else _DFACTOR
    if math.isnan(ratio):
        return math.nan
    return dt * min(_IFACTOR, max(_SAFETY / ratio ** (1 / _ORDER), lower))


class _Flat:
    """A (batch, N) tensor of every layer's units, with per-layer (batch, *shape) views for the vector field."""

    def __init__(self, data: Tensor, shapes, sizes):
        self.data = data
        self.layers = [p.view(data.shape[0], *s) for p, s in zip(data.split(sizes, dim=1), shapes)]


def _rms_max(v: Tensor, sizes) -> Tensor:
    """Per sample, the largest of the layers' RMS norms (torchdiffeq's norm for a tuple of states)."""
    return torch.stack([p.square().mean(1).sqrt() for p in v.split(sizes, dim=1)], dim=1).amax(1)


def integrate_dopri5(net, names: list[str], y0: tuple[Tensor, ...], t: Tensor, inputs: dict, clamped: tuple,
                     rtol: float, atol: float) -> tuple[list[Tensor], int]:
    """States at the output times ``t``, a (T, batch, *shape) tensor per layer, and the number of vector-field
    evaluations. Without autograd (callers hold ``torch.no_grad``); the caller checks that the outputs are finite.
    StepUnderflowError when a sample's step size underflows (the state blows up, or the problem is too stiff for
    an explicit method)."""
    from .dynamics import StepUnderflowError

    batch, like = y0[0].shape[0], y0[0]
    shapes = [x.shape[1:] for x in y0]
    sizes = [math.prod(s) for s in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    # trial stages may leave the finite range and be rejected: the field does not check them. A state that blows
    # up gives an infinite or NaN error norm: rejected steps until the step size underflows (torchdiffeq's way)
    field = _Field(net, names, inputs, clamped)
    kk = like.new_empty((7, batch, sum(sizes)))  # the stages, one tensor: a stage's input is one baddbmm over it
    k = [_Flat(kk[i], shapes, sizes) for i in range(7)]
    y, y_new, trial = (_Flat(like.new_empty((batch, sum(sizes))), shapes, sizes) for _ in range(3))
    scratch = torch.empty((2, min(_PIECE, max(sizes))), dtype=like.dtype, device=like.device)
    for p, x in zip(y.layers, y0):
        p.copy_(x)
    times = t.tolist()
    sol = [x.new_empty((len(times), *x.shape)) for x in y0]
    for s, x in zip(sol, y0):
        s[0] = x

    # the first step (torchdiffeq's _select_initial_step, per sample): f(y0), then f at one Euler step of h0
    field(y.layers, k[0].layers, times[0])
    scale = y.data.abs().mul_(rtol).add_(atol)
    d0 = _rms_max(y.data / scale, sizes).tolist()
    d1 = _rms_max(k[0].data / scale, sizes).tolist()
    h0 = [1e-6 if a < 1e-5 or b < 1e-5 else 0.01 * a / b for a, b in zip(d0, d1)]
    hv = torch.tensor(h0, dtype=like.dtype, device=like.device)
    torch.addcmul(y.data, hv.unsqueeze(1), k[0].data, out=trial.data)
    field(trial.layers, k[1].layers, times[0])
    d2 = (_rms_max(k[1].data.sub_(k[0].data).div_(scale), sizes) / hv).tolist()
    del scale
    dt = []
    for h, a, b in zip(h0, d1, d2):
        h1 = max(1e-6, h * 1e-3) if a <= 1e-15 and b <= 1e-15 else (0.01 / max(a, b)) ** (1 / _ORDER)  # 1/(4+1)
        dt.append(min(100 * h, h1))

    now = [times[0]] * batch  # each sample's time
    nxt = [1] * batch  # each sample's next output
    running = [len(times) > 1] * batch
    steps = 0
    coef = torch.zeros((batch, 1, 7), dtype=torch.float64)
    while any(running):
        steps += 1
        for b in range(batch):
            if running[b] and not now[b] + dt[b] > now[b]:
                raise StepUnderflowError(now[b], {n: float(x[b].abs().max()) for n, x in zip(names, y.layers)})
        if steps > MAX_STEPS:
            b = running.index(True)
            raise StepUnderflowError(now[b], {n: float(x[b].abs().max()) for n, x in zip(names, y.layers)})
        h = torch.tensor([d if r else 0.0 for d, r in zip(dt, running)], dtype=torch.float64)
        for i, row in enumerate(_A, start=1):  # stage i+1's input y + h sum_j a_ij k_j, then k_{i+1}
            dst = y_new if i == 6 else trial
            coef[:, 0, :i] = h.unsqueeze(1) * torch.tensor(row, dtype=torch.float64)
            torch.baddbmm(y.data.unsqueeze(1), coef[:, :, :i].to(like), kk[:i].transpose(0, 1),
                          out=dst.data.unsqueeze(1))
            field(dst.layers, k[i].layers, max(now))  # (the time is for error messages only: the field is autonomous)
        ratio = _error_ratios(kk, y.data, y_new.data, h, sizes, offsets, rtol, atol, scratch)
        keep = [True] * batch  # rows whose step is taken (or that have finished: their step was 0)
        for b in range(batch):
            if not running[b]:
                continue
            accept = ratio[b] <= 1
            if accept:
                t0, t1 = now[b], now[b] + dt[b]
                while nxt[b] < len(times) and times[nxt[b]] <= t1:  # outputs in this step: its dense output
                    w = _dense_weights((times[nxt[b]] - t0) / (t1 - t0))
                    wt = torch.tensor([[wj * dt[b] for wj in w]], dtype=like.dtype, device=like.device)
                    for s, o, n in zip(sol, offsets, sizes):
                        torch.addmm(y.data[b:b + 1, o:o + n], wt, kk[:, b, o:o + n],
                                    out=s[nxt[b], b].view(1, n))
                    nxt[b] += 1
                now[b] = t1
                running[b] = nxt[b] < len(times)
            keep[b] = accept
            dt[b] = _next_step(dt[b], ratio[b])
        if all(keep):
            y, y_new = y_new, y
            k[0].data.copy_(k[6].data)
        else:
            for b in range(batch):
                if keep[b]:
                    y.data[b].copy_(y_new.data[b])
                    k[0].data[b].copy_(k[6].data[b])
    return sol, field.nfe


def _error_ratios(kk: Tensor, y0: Tensor, y1: Tensor, h: Tensor, sizes, offsets, rtol: float, atol: float,
                  scratch: Tensor) -> list[float]:
    """Per sample, torchdiffeq's error ratio max over layers of RMS(err / (atol + rtol max(|y0|, |y1|))), with
    err = h sum_j e_j k_j formed piece by piece in ``scratch`` (cache-sized pieces: the error is never a full
    tensor of its own; one device-to-host transfer for all samples). NaN where a sample's error is."""
    e = (h.unsqueeze(1) * torch.tensor(_E, dtype=torch.float64)).to(kk).unsqueeze(1)  # (batch, 1, 7)
    sums = []  # per sample and layer, the sum of (err / tol)^2
    for b in range(y0.shape[0]):
        for o, n in zip(offsets, sizes):
            pieces = []
            for p in range(o, o + n, _PIECE):
                q = min(p + _PIECE, o + n)
                err, tol = scratch[0, :q - p], scratch[1, :q - p]
                torch.mm(e[b], kk[:, b, p:q], out=err.unsqueeze(0))
                torch.maximum(y0[b, p:q].abs(), y1[b, p:q].abs(), out=tol)
                err.div_(tol.mul_(rtol).add_(atol))
                pieces.append(torch.dot(err, err))
            sums.append(torch.stack(pieces).sum())
    rms = (torch.stack(sums).view(y0.shape[0], len(sizes)).double()
           / torch.tensor(sizes, dtype=torch.float64, device=kk.device)).sqrt()
    worst = rms.amax(1)  # amax propagates NaN: a NaN error rejects the step and underflows it
    return worst.tolist()
