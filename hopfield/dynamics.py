"""Continuous-time dynamics with energy tracking, integrated by torchdiffeq.

``simulate`` solves tau_A dx_A/dt = I_A(g) - x_A with any torchdiffeq method (adaptive, fixed-grid,
``scipy_solver`` for stiff problems via Radau/BDF/LSODA, optionally the adjoint method) and returns a
``Trajectory`` with the energy at every output time and a descent report. ``relax`` integrates until
the network reaches a fixed point.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torchdiffeq
from torch import Tensor, nn

from .adaptive import ADAPTIVE_OWN, integrate_dopri5
from .lagrangians.base import _real
from .network import Network, State
from .stepping import FIXED_METHODS, integrate_fixed

__all__ = [
    "DescentReport",
    "NonFiniteStateError",
    "NotConvergedError",
    "StepUnderflowError",
    "Trajectory",
    "relax",
    "simulate",
]


def _solver_names() -> list[str]:
    try:
        from torchdiffeq._impl.odeint import SOLVERS

        return sorted(SOLVERS)
    except ImportError:  # layout changed: let torchdiffeq validate
        return []


def _solver_options(method: str) -> set[str] | None:
    """The options torchdiffeq's solver for ``method`` takes (its constructor's keywords); None if unknown."""
    try:
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError:  # layout changed: let torchdiffeq validate
        return None
    if method not in SOLVERS:
        return None
    keys = set()
    for cls in SOLVERS[method].__mro__:
        if "__init__" in cls.__dict__:
            keys |= {p.name for p in inspect.signature(cls.__init__).parameters.values()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return keys - {"self", "func", "y0", "rtol", "atol"}


SCIPY_SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")  # scipy.integrate.solve_ivp's methods


def _check_options(method: str, options, who: str) -> None:
    """``options`` is a dict of ``method``'s own options (torchdiffeq warns about an unknown one and goes on with
    its default, so a misspelt ``stepsize`` would pass unnoticed); ValueError naming the key."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise TypeError(f"{who}: options must be a dict of solver options, got {type(options).__name__}")
    known = _solver_options(method)
    unknown = sorted(set(options) - known) if known is not None else []
    if unknown:
        raise ValueError(f"{who}: {unknown} not among the options of method {method!r}: {sorted(known)}")
    if method == "scipy_solver" and options.get("solver", "LSODA") not in SCIPY_SOLVERS:
        raise ValueError(f"{who}: options['solver'] is one of scipy's {SCIPY_SOLVERS}, got {options['solver']!r}")
    if options.get("step_size") is not None:
        _check_positive("options['step_size']", options["step_size"], who)


ADAPTIVE = {"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5", "scipy_solver"}


class NonFiniteStateError(FloatingPointError):
    """A layer's state is NaN or infinite: given so (``initial``), or become so during a simulation."""

    def __init__(self, layer: str, time: float, initial: bool = False):
        self.layer, self.time, self.initial = layer, time, initial
        if initial:
            msg = (f"the initial state of layer {layer!r} is not finite (NaN or inf): check the state passed in, "
                   "nothing was integrated")
        else:
            msg = (f"non-finite state in layer {layer!r} at t={time:.6g}: the dynamics diverged "
                   "(check the weights' scale, the time constants and the solver's step size)")
        super().__init__(msg)


class StepUnderflowError(FloatingPointError):
    """The adaptive solver's step size underflowed: the state blows up (finite time) or is too stiff."""

    def __init__(self, time: float, sizes: dict[str, float]):
        self.time, self.sizes = time, sizes
        worst = max(sizes, key=sizes.get)
        self.layer = worst
        super().__init__(
            f"the solver's step size underflowed at t={time:.6g}; largest |x| is {sizes[worst]:.3g} in layer "
            f"{worst!r}: the state is blowing up (an energy unbounded below) or the problem is too stiff for "
            "this method (try method='scipy_solver', options={'solver': 'Radau'})")


class NotConvergedError(RuntimeError):
    """``relax`` did not reach its tolerance; ``.state`` holds where it stopped."""

    def __init__(self, msg: str, state: State, residual: float):
        super().__init__(msg)
        self.state, self.residual = state, residual


class _BudgetExhausted(Exception):
    """Raised inside the solver when ``_Field.max_nfe`` evaluations are spent."""


class _Field(nn.Module):
    """torchdiffeq's f(t, y) over a tuple of layer states; counts evaluations (up to ``max_nfe``), checks
    finiteness."""

    def __init__(self, net: Network, inputs: dict, clamped: tuple, check_finite: bool):
        super().__init__()
        self.net = net
        self.names = list(net.layers)
        self.inputs, self.clamped, self.check_finite = inputs, clamped, check_finite
        self.nfe, self.max_nfe = 0, None  # max_nfe: None, or raise _BudgetExhausted once nfe reaches it
        self.last = (0.0, ())  # time and states of the latest evaluation, for error messages

    def state(self, y: tuple[Tensor, ...]) -> State:
        return dict(zip(self.names, y))

    def check(self, t, y) -> None:
        # one cheap reduction per layer; the exact test runs only when the sum is not finite
        for n, x in zip(self.names, y):
            if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
                raise NonFiniteStateError(n, float(t))

    def forward(self, t, y):
        if self.max_nfe is not None and self.nfe >= self.max_nfe:
            raise _BudgetExhausted
        self.nfe += 1
        self.last = (t, y)
        if self.check_finite:
            self.check(t, y)
        dx = self.net._vector_field(self.state(y), self.inputs, self.clamped)
        return tuple(dx[n] for n in self.names)


@dataclass
class DescentReport:
    """Largest energy increase between consecutive outputs, absolute and relative to |E| there."""

    max_rise: float
    max_rise_rel: float
    time: float
    sample: int
    tolerance: float
    guaranteed: bool
    caveats: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no relative rise exceeds ``tolerance``."""
        return self.max_rise_rel <= self.tolerance

    def __str__(self) -> str:
        if math.isnan(self.max_rise):
            head = "the energy became non-finite (overflow): is it bounded below?"
        elif self.max_rise <= 0:
            head = "energy never rose"
        else:
            head = (f"largest energy rise {self.max_rise:.3g} ({self.max_rise_rel:.3g} relative) "
                    f"at t={self.time:.4g}, sample {self.sample}")
        verdict = "within" if self.ok else "BEYOND"
        lines = [f"{head}; {verdict} tolerance {self.tolerance:.1g}"]
        lines.append("descent guaranteed (symmetric synapses, convex Lagrangians)" if self.guaranteed
                     else "descent NOT guaranteed:")
        lines += [f"  - {c}" for c in self.caveats]
        return "\n".join(lines)


def descent_report(energy: Tensor, t: Tensor, tolerance: float, net: Network) -> DescentReport:
    e = energy.detach().double()
    if e.shape[0] < 2:
        rise = rel = torch.zeros(1, *e.shape[1:], dtype=e.dtype)
    else:
        rise = e[1:] - e[:-1]
        rel = rise / e[:-1].abs().clamp_min(torch.finfo(e.dtype).tiny)
    k = int(rel.argmax())
    step, sample = divmod(k, rel.shape[1]) if rel.ndim == 2 else (k, 0)
    return DescentReport(
        max_rise=float(rise.max()), max_rise_rel=max(float(rel.max()), 0.0),
        time=float(t[min(step + 1, len(t) - 1)]), sample=sample, tolerance=tolerance,
        guaranteed=net.descent_guaranteed, caveats=net.descent_caveats(),
    )


@dataclass
class Trajectory:
    """A solution: output times ``t`` (T,), ``states`` per layer (T, batch, *shape), ``energy`` (T, batch)."""

    t: Tensor
    states: State
    energy: Tensor | None
    nfe: int
    method: str
    descent: DescentReport | None

    def final(self) -> State:
        return {n: s[-1] for n, s in self.states.items()}

    def table(self, rows: int = 11) -> str:
        """Energy over time: mean, min and max over the batch, at up to ``rows`` output times."""
        if self.energy is None:
            raise ValueError("this trajectory was simulated with track_energy=False")
        idx = torch.linspace(0, len(self.t) - 1, min(rows, len(self.t))).round().long().unique()
        lines = [f"{'t':>10}  {'E mean':>14}  {'E min':>14}  {'E max':>14}"]
        for i in idx.tolist():
            e = self.energy[i].detach().double()
            lines.append(f"{float(self.t[i]):>10.4g}  {float(e.mean()):>14.7g}  {float(e.min()):>14.7g}  "
                         f"{float(e.max()):>14.7g}")
        return "\n".join(lines)

    def plot(self, path, title: str | None = None):
        """Save a PNG of energy against time (and of E - E_final on a log scale); returns the path."""
        from .plot import plot_energy

        return plot_energy(self, path, title=title)


def _check_method(method: str) -> None:
    names = _solver_names()
    if names and method not in names:
        raise ValueError(f"unknown solver {method!r}; torchdiffeq offers {names}")


def _odeint(func, y0, t, *, method, rtol, atol, options, adjoint, adjoint_options):
    kw = dict(rtol=rtol, atol=atol, method=method, options=options)
    try:
        if adjoint:
            params = tuple(p for p in func.parameters() if p.requires_grad)
            params += tuple(i for i in func.inputs.values() if i.requires_grad)
            return torchdiffeq.odeint_adjoint(func, y0, t, adjoint_params=params, **kw, **(adjoint_options or {}))
        return torchdiffeq.odeint(func, y0, t, **kw)
    except AssertionError as err:
        if "underflow in dt" not in str(err):
            raise
        t_last, y_last = func.last
        sizes = {n: float(x.detach().abs().max()) for n, x in zip(func.names, y_last)}
        raise StepUnderflowError(float(t_last), sizes) from err


DEFAULT_RTOL = {torch.float64: 1e-7, torch.float32: 1e-4}  # float32's: 6 digits of the energy, 1/6 the work


def _check_positive(name: str, value, where: str = "simulate") -> float:
    return _real(f"{where}: {name}", value)  # "simulate: rtol must be a finite number > 0, got ..."


def _check_times(t, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t`` (a tensor, or a sequence of numbers) as a 1-D tensor of ``dtype`` (the state's) on ``device``:
    finite, real and strictly increasing, also after the cast (float32 cannot tell 1 from 1 + 1e-9)."""
    try:  # Python numbers are float64: a list must not pass through float32 on its way to a float64 state
        given = t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"simulate: t must be a 1-D tensor of output times, got {type(t).__name__}") from e
    if given.ndim != 1 or len(given) < 1 or given.is_complex() or given.dtype == torch.bool:
        raise ValueError(f"simulate: t must be a 1-D real tensor of strictly increasing output times, got shape "
                         f"{tuple(given.shape)} and dtype {given.dtype}")
    if not bool(torch.isfinite(given).all()):
        raise ValueError(f"simulate: t must hold finite times, got {given.tolist() if len(given) <= 8 else given}")
    cast = given.to(device=device, dtype=dtype)
    for times, what in ((given, ""), (cast, f" in {dtype}, the state's dtype (pass a float64 state for finer times)")):
        if len(times) > 1 and not bool((times[1:] > times[:-1]).all()):
            i = int((times[1:] <= times[:-1]).nonzero()[0])
            raise ValueError(f"simulate: t must be strictly increasing{what}; t[{i}] = {float(times[i])!r} and "
                             f"t[{i + 1}] = {float(times[i + 1])!r}")
    return cast


def simulate(net: Network, state: Mapping[str, Tensor], t: Tensor, *, method: str = "dopri5",
             rtol: float | None = None, atol: float | None = None, options: dict | None = None,
             adjoint: bool = False, adjoint_options: dict | None = None, inputs: Mapping[str, Tensor] | None = None,
             clamped: Iterable[str] | str = (), track_energy: bool = True, check_finite: bool = True,
             descent_tol: float | None = None, grad: bool = False) -> Trajectory:
    """Integrate tau_A dx_A/dt = I_A - x_A from ``state`` over the output times ``t`` (1-D, increasing).

    ``method``/``rtol``/``atol``/``options`` go to ``torchdiffeq.odeint``, except that "euler", "midpoint" and
    "rk4" without gradients (on the output grid, or with ``options={"step_size": h}``) run ``hopfield.stepping``'s
    loop: the same steps (equal to torchdiffeq's to round-off, tested), in reused buffers, with the energy read off
    each step's own currents; "dopri5" without gradients or options runs ``hopfield.adaptive``: torchdiffeq's
    dopri5 for each sample on its own (its own steps), in reused buffers. ``rtol`` defaults to the dtype's:
    1e-7 in float64, 1e-4 in float32 (the energy to about 6 digits either way); ``atol`` to rtol / 100.
    ``grad=False`` (the default, for exploring) integrates without an autograd graph; ``grad=True`` keeps it, so
    that losses on the trajectory backpropagate into the weights, inputs and initial state (``adjoint=True``
    implies it: ``odeint_adjoint``, O(1) memory in the number of steps). For stiff time-constant ratios use
    ``method="scipy_solver", options={"solver": "Radau"}`` (or "BDF", "LSODA"), which has no gradient.
    ``inputs`` are constant external currents per layer; ``clamped`` layers (a name or names) are held at their
    initial state. With ``track_energy`` the energy is evaluated at every output time and the descent report
    compares consecutive values with ``descent_tol`` (default max(10 rtol, 100 eps) for adaptive
    methods, 1e-6 for fixed grids, relative to |E|).
    """
    net.check_state(state)
    inputs, clamped = net._check_inputs(inputs, clamped, state)
    _check_method(method)
    for name, flag in (("adjoint", adjoint), ("track_energy", track_energy), ("check_finite", check_finite),
                       ("grad", grad)):
        if not isinstance(flag, bool):
            raise TypeError(f"simulate: {name} must be True or False, got {flag!r}")
    names = list(net.layers)
    y0 = tuple(state[n] for n in names)
    dtype = y0[0].dtype if y0[0].is_floating_point() else torch.float64
    t = _check_times(t, dtype, y0[0].device)
    rtol = _check_positive("rtol", DEFAULT_RTOL.get(dtype, 1e-7) if rtol is None else rtol)
    atol = _check_positive("atol", rtol / 100 if atol is None else atol)
    _check_options(method, options, "simulate")
    net.check_parameters("simulate")
    for n, x in zip(names, y0):
        if not torch.isfinite(x).all():
            raise NonFiniteStateError(n, float(t[0]), initial=True)
    with contextlib.nullcontext() if grad or adjoint else torch.no_grad():
        return _simulate(net, names, y0, t, inputs, clamped, method, rtol, atol, options, adjoint, adjoint_options,
                         track_energy, check_finite, descent_tol)


def _simulate(net, names, y0, t, inputs, clamped, method, rtol, atol, options, adjoint, adjoint_options,
              track_energy, check_finite, descent_tol) -> Trajectory:
    energy = None
    if _own_fixed_step(method, options, adjoint):
        ys, energy, nfe = integrate_fixed(net, names, y0, t, method, inputs, clamped,
                                          step_size=(options or {}).get("step_size"), track_energy=track_energy,
                                          check_finite=check_finite)
    elif _own_adaptive(method, options, adjoint):
        ys, nfe = integrate_dopri5(net, names, y0, t, inputs, clamped, rtol, atol)
        if check_finite:
            func = _Field(net, inputs, clamped, check_finite)
            for k in range(len(t)):
                func.check(t[k], tuple(s[k] for s in ys))
    else:
        func = _Field(net, inputs, clamped, check_finite)
        ys = _odeint(func, y0, t, method=method, rtol=rtol, atol=atol, options=options, adjoint=adjoint,
                     adjoint_options=adjoint_options)
        nfe = func.nfe
        if check_finite:  # the solver may stop on a non-finite step before evaluating it
            for k in range(len(t)):
                func.check(t[k], tuple(s[k] for s in ys))
    states = dict(zip(names, ys))
    for n in clamped:  # held exactly (the solver's interpolation would add round-off)
        states[n] = y0[names.index(n)].unsqueeze(0).expand_as(states[n])
    report = None
    if track_energy:
        if energy is None:
            energy = torch.stack([net.energy({n: s[k] for n, s in states.items()}, inputs) for k in range(len(t))])
        elif not bool(torch.isfinite(energy).all()):
            net.energy({n: s[int(torch.isfinite(energy).all(-1).logical_not().nonzero()[0])]
                        for n, s in states.items()}, inputs)  # raises, naming the layer or the term
        if descent_tol is None:
            eps = torch.finfo(energy.dtype).eps
            descent_tol = max(10 * rtol, 100 * eps) if method in ADAPTIVE else 1e-6
        report = descent_report(energy, t, descent_tol, net)
    return Trajectory(t=t, states=states, energy=energy, nfe=nfe, method=method, descent=report)


def _own_adaptive(method: str, options: dict | None, adjoint: bool) -> bool:
    """Whether ``hopfield.adaptive`` integrates (torchdiffeq's dopri5 per sample, faster): dopri5 without
    gradients or options."""
    return method in ADAPTIVE_OWN and not adjoint and not torch.is_grad_enabled() and not options


def _own_fixed_step(method: str, options: dict | None, adjoint: bool) -> bool:
    """Whether ``hopfield.stepping`` integrates (equal to torchdiffeq's same method, faster): a fixed-step
    explicit method it has, without gradients, on the output grid or a ``step_size`` grid (linear
    interpolation, torchdiffeq's default)."""
    opts = dict(options or {})
    return (method in FIXED_METHODS and not adjoint and not torch.is_grad_enabled()
            and set(opts) <= {"step_size", "interp"} and opts.get("interp", "linear") == "linear")


def _max_speed(dx) -> float:
    return float(torch.stack([d.abs().amax() for d in dx]).amax())


RELAX_TOL_MARGIN = 10.0  # how far tol must clear the rounding floor: the currents add rounding of their own


def _check_tol(net: Network, func: _Field, y, dx, tol: float) -> None:
    """Refuse a ``tol`` that rounding alone keeps out of reach. tau dx/dt = I - x (Eq. 14) is a difference of
    numbers of size m = max(|x|, |I|), known to eps m, so max |dx/dt| cannot fall below eps m / tau; the layer
    where that floor is highest is named."""
    floors = {}
    for n, x, d in zip(func.names, y, dx):
        if n not in func.clamped:
            tau = net.layers[n].tau
            size = max(float(x.abs().amax()), float((x + tau * d).abs().amax()))  # I = x + tau dx/dt
            floors[n] = (torch.finfo(x.dtype).eps * size / tau, size, tau, x.dtype)
    if not floors:
        return
    n = max(floors, key=lambda k: floors[k][0])
    floor, size, tau, dtype = floors[n]
    if tol < RELAX_TOL_MARGIN * floor:
        raise ValueError(
            f"relax: tol={tol:g} is below what {dtype} resolves in layer {n!r}: with tau={tau:g} and "
            f"max(|x|, |I|) = {size:.3g}, rounding alone leaves |dx/dt| ~ eps max|x| / tau = {floor:.2g}; "
            f"the smallest reachable tol is about {RELAX_TOL_MARGIN * floor:.2g} (or relax in float64)")


DEFAULT_RELAX_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}  # float32: above its rounding floor (eps |x| / tau)


def relax(net: Network, state: Mapping[str, Tensor], tol: float | None = None, *, t_max: float = 1e4,
          max_nfe: int | None = 100_000, method: str = "dopri5", rtol: float | None = None,
          atol: float | None = None, options: dict | None = None, inputs: Mapping[str, Tensor] | None = None,
          clamped: Iterable[str] = ()) -> State:
    """Integrate until every unit's |dx/dt| < ``tol`` and return that state (a fixed point to ``tol``).

    ``tol`` defaults to the state's dtype's (``DEFAULT_RELAX_TOL``: 1e-6 in float64, 1e-3 in float32). It must be
    resolvable in that dtype: rounding leaves |dx/dt| ~ eps max|x| / tau in each layer (about 1e-4 for float32,
    |x| ~ 1 and tau = 0.01), so a ``tol`` within ``RELAX_TOL_MARGIN`` (10x) of that raises ``ValueError`` naming
    the layer and the smallest reachable ``tol``, checked at the start and after every horizon. The solver's own error
    sets a floor under the speed too, so ``rtol`` defaults to min(1e-6, tol / 100), but at least 10 eps of
    the dtype, and ``atol`` to rtol / 100.

    Integrates over horizons that double (starting at the largest tau) and checks max |dx/dt| after each;
    raises ``NotConvergedError`` (carrying the state reached at the last horizon) if ``t_max`` comes first,
    as it does for networks that oscillate, or once ``max_nfe`` evaluations of the vector field are spent
    (``None``: no limit), as it does for stiff networks that relax slowly. Runs without autograd: the fixed
    point is returned detached (differentiate through ``simulate`` instead). Any torchdiffeq method works,
    e.g. ``"scipy_solver"`` with ``options={"solver": "Radau"}`` for small stiff networks.
    """
    net.check_state(state)
    inputs, clamped = net._check_inputs(inputs, clamped, state)
    _check_method(method)
    _check_options(method, options, "relax")
    net.check_parameters("relax")
    if tol is None:
        tol = DEFAULT_RELAX_TOL.get(next(iter(state.values())).dtype, 1e-6)
    _check_positive("tol", tol, "relax")
    if max_nfe is not None and (isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1):
        raise ValueError(f"relax: max_nfe must be an int >= 1 or None, got {max_nfe!r}")
    names = list(net.layers)
    y = tuple(state[n].detach() for n in names)
    eps = max(torch.finfo(x.dtype).eps for x in y)
    rtol = max(min(1e-6, tol / 100), 10 * eps) if rtol is None else rtol
    atol = rtol / 100 if atol is None else atol
    func = _Field(net, inputs, clamped, check_finite=True)
    with torch.no_grad():
        t, horizon = 0.0, max(layer.tau for layer in net.layers.values())
        dx = func(0.0, y)
        while not (speed := _max_speed(dx)) < tol:
            _check_tol(net, func, y, dx, tol)
            if t >= t_max:
                raise NotConvergedError(
                    f"relax: max |dx/dt| = {speed:.3g} > tol = {tol:g} at t_max = {t_max:g}; the network may "
                    "oscillate (asymmetric synapses) or relax slower than t_max", dict(zip(names, y)), speed)
            t_next = min(t + horizon, t_max)
            grid = torch.tensor([t, t_next], dtype=torch.float64)
            func.max_nfe = max_nfe
            try:
                y = tuple(s[-1] for s in _odeint(func, y, grid, method=method, rtol=rtol, atol=atol,
                                                 options=options, adjoint=False, adjoint_options=None))
            except _BudgetExhausted:
                raise NotConvergedError(
                    f"relax: used up max_nfe = {max_nfe} evaluations of the vector field on the way from t = {t:g} "
                    f"to {t_next:g}; max |dx/dt| = {speed:.3g} > tol = {tol:g} at t = {t:g} (the state returned). "
                    "A stiff network (fastest tau "
                    f"{min(layer.tau for layer in net.layers.values()):g}) that relaxes slowly: raise max_nfe, "
                    "loosen tol or clamp the slow layers", dict(zip(names, y)), speed) from None
            func.max_nfe = None  # the speed check is not part of the budget
            t, horizon = t_next, 2 * horizon
            dx = func(0.0, y)
    return dict(zip(names, y))
