"""Adaptive integration with torchode (Lienen & Günnemann 2022): dopri5 for ``simulate`` when no
gradient is wanted.

Chosen by measurement (docs/benchmarks.md, benchmarks/simulate_vs_hamux.py): on the Mixer-S-size network at rtol
1e-5, torchode's Dopri5 over ``hopfield.stepping``'s buffered vector field takes fewer evaluations than
torchdiffeq and spends far less time around each. torchode controls the step of each sample on its own (a batch
of independent problems: one sample's stiff patch does not shrink every other sample's step), with torchdiffeq's
error norm for a tuple of states (the largest of the layers' RMS norms) over that sample's units. torchdiffeq
stays for gradients, the adjoint, options and its other methods.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stepping import _Field

__all__ = ["TORCHODE_METHODS", "integrate_adaptive"]

TORCHODE_METHODS = {"dopri5": "Dopri5"}
MAX_STEPS = 1_000_000  # torchode's default has no limit: a solve that cannot finish stops here (an error)


def integrate_adaptive(net, names: list[str], y0: tuple[Tensor, ...], t: Tensor, method: str, inputs: dict,
                       clamped: tuple, rtol: float, atol: float) -> tuple[list[Tensor], int]:
    """States at the output times ``t``, a (T, batch, *shape) tensor per layer, and the number of vector-field
    evaluations. Without autograd (callers hold ``torch.no_grad``); the caller checks that the outputs are
    finite. StepUnderflowError when a sample's step
    size underflows (the state blows up, or the problem is too stiff for an explicit method)."""
    import torchode as to

    from .dynamics import StepUnderflowError

    batch = y0[0].shape[0]
    shapes = [x.shape[1:] for x in y0]
    sizes = [math.prod(s) for s in shapes]
    # trial stages may leave the finite range and be rejected: the field does not check them. A state that blows
    # up ends the solve with an infinite error norm, reported as a step-size underflow (torchdiffeq's way)
    field = _Field(net, names, inputs, clamped, check_finite=False)

    def split(flat: Tensor) -> list[Tensor]:
        return [p.view(flat.shape[0], *s) for p, s in zip(flat.split(sizes, dim=1), shapes)]

    def f(time: Tensor, flat: Tensor) -> Tensor:
        out = torch.empty_like(flat)  # torchode keeps every stage's result: a fresh tensor per evaluation
        # the layers are strided views of torchode's flat (batch, N) layout, which the field reads and writes in
        # place; torchode steps a sample's own time: the field is autonomous, so the time is for messages only
        field(split(flat), split(out), float(time.max()))
        return out

    flat0 = torch.cat([x.reshape(batch, -1) for x in y0], dim=1)
    term = to.ODETerm(f)
    step = getattr(to, TORCHODE_METHODS[method])(term=term)

    def norm(err: Tensor) -> Tensor:
        """torchdiffeq's error norm for a tuple of states, per sample: the largest of the layers' RMS norms (an
        RMS over the concatenated layers would let a small layer's error hide among a large layer's units)."""
        return torch.stack([p.square().mean(1).sqrt() for p in err.split(sizes, dim=1)], dim=1).amax(1)

    controller = to.IntegralController(atol=atol, rtol=rtol, term=term, norm=norm)
    solver = to.AutoDiffAdjoint(step, controller, max_steps=MAX_STEPS)
    sol = solver.solve(to.InitialValueProblem(y0=flat0, t_eval=t.unsqueeze(0).expand(batch, -1)))
    failed = sol.status != 0
    if bool(failed.any()):
        k = int(failed.nonzero()[0])  # the first sample that did not reach the end
        done = torch.isfinite(sol.ys[k]).all(-1) & (sol.ts[k] <= t[-1])
        last = int(done.nonzero()[-1]) if bool(done.any()) else 0
        raise StepUnderflowError(float(sol.ts[k, last]), {n: float(x.abs().max()) for n, x in
                                                          zip(names, split(sol.ys[k, last:last + 1]))})
    ys = split(sol.ys.transpose(0, 1).reshape(len(t) * batch, -1))  # (T * batch, N) -> per layer
    return [y.reshape(len(t), batch, *s) for y, s in zip(ys, shapes)], field.nfe
