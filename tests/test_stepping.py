"""hopfield.stepping, the fixed-step loop ``simulate`` uses for euler, midpoint and rk4 without gradients: it equals
torchdiffeq's same method (1e-12 in float64, round-off in float32), and its energy, read off the step's own currents
(or off dx/dt), equals ``Network.energy`` of the same states."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq

from hopfield import AttentionCoupling, DenseSynapse, Layer, Network
from hopfield import lagrangians as lag
from hopfield.dynamics import _Field
from hopfield.stepping import FIXED_METHODS
from hopfield.stepping import _Field as StepField


def network(form: str, bias: bool, affine, dtype) -> Network:
    """Four layers, synapses along tokens (axis -2), channels (-1) and the leading axis, random weights."""
    torch.manual_seed(0)
    layers = {"v": Layer((7, 6), lag.layernorm(axis=-1), 1.0), "x": Layer((5, 6), lag.tanh(), 0.5),
              "h": Layer((5, 4), lag.softmax(axis=-2), 0.25), "c": Layer((7, 9), lag.relu(), 0.3)}
    synapses = [DenseSynapse("v", "x", axis=-2, form=form, bias=bias, affine=affine),
                DenseSynapse("c", "v", axis=-1, form="untied", bias=True),
                DenseSynapse("x", "h", axis=1, form=form, bias=bias)]
    net = Network(layers, synapses).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))  # random, not freshly initialised: biases, gains, W_break nonzero
    return net


def reference(net, state, t, method, options, inputs, clamped):
    """torchdiffeq.odeint with the same method on the same vector field, and Network.energy along it."""
    f = _Field(net, inputs, tuple(clamped), check_finite=False)
    with torch.no_grad():
        ys = torchdiffeq.odeint(f, tuple(state[n] for n in net.layers), t, method=method, options=options)
        states = dict(zip(net.layers, ys))
        energy = torch.stack([net.energy({n: s[k] for n, s in states.items()}, inputs) for k in range(len(t))])
    return states, energy, f.nfe


@pytest.mark.parametrize("method", FIXED_METHODS)
@pytest.mark.parametrize(("form", "bias", "affine"), [("tied", False, None), ("tied", True, (6,)),
                                                      ("untied", True, (7, 6)), ("broken", False, (6,))])
def test_fixed_step_equals_torchdiffeq_in_float64(method, form, bias, affine):
    net = network(form, bias, affine, torch.float64)
    state = net.init_state(3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 2, 21, dtype=torch.float64)
    inputs = {"x": torch.randn(3, 5, 6, dtype=torch.float64)}
    for options in (None, {"step_size": 0.03}):  # the output grid; a finer grid with linear interpolation
        for clamped in ((), ("v",)):
            traj = net.simulate(state, t, method=method, options=options, inputs=inputs, clamped=clamped)
            states, energy, nfe = reference(net, state, t, method, options, inputs, clamped)
            err = max(float((traj.states[n] - states[n]).abs().max()) for n in net.layers)
            assert err <= 1e-12, (options, clamped, err)
            scale = float(energy.abs().max())
            assert float((traj.energy - energy).abs().max()) <= 1e-12 * scale, (options, clamped)
            assert traj.nfe == nfe


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_fixed_step_equals_torchdiffeq_in_float32(method):
    net = network("untied", True, (6,), torch.float32)
    state = net.init_state(4, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0, 2, 11)
    traj = net.simulate(state, t, method=method)
    states, energy, _ = reference(net, state, t, method, None, {}, ())
    assert max(float((traj.states[n] - states[n]).abs().max()) for n in net.layers) <= 1e-5
    assert float((traj.energy - energy).abs().max()) <= 1e-5 * float(energy.abs().max())


def test_both_energy_routes_equal_network_energy():
    """The energy from dx/dt (every synapse dense, no tied affine, nothing clamped) and from each synapse's
    currents (otherwise: here an attention coupling and a tied LayerNorm affine), at random states."""
    torch.manual_seed(3)
    dense = network("tied", True, None, torch.float64)
    mixed = Network({"v": Layer((4, 6), lag.layernorm(axis=-1), 1.0), "s": Layer((2, 4, 4), lag.softmax(), 0.1),
                     "x": Layer((4, 3), lag.gelu(), 0.2)},
                    [AttentionCoupling("v", "s", heads=2, head_dim=3, affine=(6,)),
                     DenseSynapse("v", "x", axis=-1, affine=(6,))]).double()
    with torch.no_grad():
        for p in mixed.parameters():
            p.add_(0.2 * torch.randn_like(p))
    for net, route in ((dense, True), (mixed, False)):
        names = list(net.layers)
        field = StepField(net, names, {}, ())
        assert field.from_field is route
        state = net.init_state(3, dtype=torch.float64, scale=1.3)
        out = [torch.empty_like(state[n]) for n in names]
        with torch.no_grad():
            e = field([state[n] for n in names], out, 0.0, energy=True)
            ref = net.energy(state)
            dx = net.vector_field(state)
        assert float((e - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
        assert max(float((o - dx[n]).abs().max()) for o, n in zip(out, names)) <= 1e-12


def test_gradients_and_other_methods_keep_torchdiffeq():
    """grad=True (autograd through the steps) and methods the loop does not have go to torchdiffeq, unchanged."""
    net = network("tied", False, None, torch.float64)
    state = net.init_state(2, dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    traj = net.simulate(state, t, method="rk4", grad=True)
    traj.energy[-1].sum().backward()
    assert net.synapses[0].weight.grad is not None
    assert net.simulate(state, t, method="heun3").nfe == 4 * 3


@pytest.mark.parametrize("lagrangian", [lag.identity(), lag.relu(), lag.repu(3), lag.tanh(), lag.softmax(axis=-2),
                                        lag.softmax(beta=2.5, axis=-1), lag.softmax(axis=(-2, -1)),
                                        lag.layernorm(axis=-1)], ids=str)
def test_lagrangian_terms_given_its_activation(lagrangian):
    """<x, g> and L(x) read off g = dL/dx (the shortcuts the per-step energy takes) equal <x, g> and L(x), and
    the activation written into a buffer equals the activation."""
    x = 3 * torch.randn(4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # and the states where a shortcut does not hold (its fallback): a group of equal units (LayerNorm's Var = 0),
    # a first unit far below the others (softmax's probability there underflows)
    flat = x.clone()
    flat[0, 1, :] = 0.7
    flat[1, 0, :] = -200.0
    flat[2, :, 0] = -200.0
    for state in (x, flat, x.float()):
        g = lagrangian.activation(state)
        buf, aux = torch.full_like(state, float("nan")), {}
        assert torch.equal(lagrangian.activation_into(state, buf, aux), g)
        want_xg, want = (state * g).sum((1, 2)), lagrangian(state)
        got_xg, got = lagrangian.terms_given(state, g)
        tol = 1e-12 if state.dtype == torch.float64 else 1e-5
        assert float((got - want).abs().max()) <= tol * float(want.abs().max()), state.dtype
        # the layer's part of the energy read off dx/dt, <x, g>/2 - L (LayerNorm's from the 1/s left in aux)
        half = 0.5 * want_xg - want
        got_half = lagrangian.half_xg_minus_value(state, g, aux)
        assert float((got_half - half).abs().max()) <= tol * float(want.abs().max() + want_xg.abs().max())
        # LayerNorm leaves what the energy needs in aux (so the check above tested that route)
        assert bool(aux) == (str(lagrangian) == "layernorm(gamma=1, axis=-1, eps=1e-05)")
        assert float((got_xg - want_xg).abs().max()) <= tol * float(want_xg.abs().max()), state.dtype


@pytest.mark.parametrize(("form", "bias", "affine"), [("tied", True, (6,)), ("untied", True, (7, 6)),
                                                      ("broken", False, (6,))])
def test_dopri5_equals_torchdiffeq_per_sample_in_float64(form, bias, affine):
    """dopri5 without gradients runs hopfield.adaptive: each sample as torchdiffeq's dopri5 integrates that sample
    alone (same initial step, steps, rejections and dense output), to round-off in float64, at loose and tight
    tolerances, with inputs and with a clamped layer; the energy is Network.energy of those states."""
    net = network(form, bias, affine, torch.float64)
    state = net.init_state(3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.linspace(0, 2, 6, dtype=torch.float64)
    inputs = {"h": torch.randn(3, 5, 4, dtype=torch.float64)}
    for rtol, clamped in ((1e-4, ()), (1e-9, ("c",))):
        traj = net.simulate(state, t, method="dopri5", rtol=rtol, atol=rtol / 100, inputs=inputs, clamped=clamped)
        nfe = 0
        for b in range(3):
            one = {n: x[b:b + 1] for n, x in state.items()}
            f = _Field(net, {"h": inputs["h"][b:b + 1]}, clamped, check_finite=False)
            with torch.no_grad():
                ys = torchdiffeq.odeint(f, tuple(one[n] for n in net.layers), t, method="dopri5", rtol=rtol,
                                        atol=rtol / 100)
            err = max(float((traj.states[n][:, b:b + 1] - y).abs().max()) for n, y in zip(net.layers, ys))
            assert err <= 1e-12, (rtol, b, err)
            nfe = max(nfe, f.nfe)
        assert traj.nfe == nfe  # the batch steps until its slowest sample is done
        assert all(torch.equal(traj.states[n][-1], state[n]) for n in clamped)
        with torch.no_grad():
            energy = torch.stack([net.energy({n: s[k] for n, s in traj.states.items()}, inputs)
                                  for k in range(len(t))])
        assert torch.equal(traj.energy, energy)


def test_dopri5_in_float32_is_as_close_to_float64_as_torchdiffeqs():
    """In float32 the solve's distance from the float64 one is that of torchdiffeq's own float32 dopri5 (its
    round-off floor here: 2.8e-3, softmax and tanh layers with tau down to 0.25), not more than twice it."""
    net = network("untied", True, (7, 6), torch.float64)
    state = net.init_state(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    want = net.simulate(state, t, rtol=1e-10, atol=1e-12)
    net, state = net.to(torch.float32), {n: x.float() for n, x in state.items()}
    got = net.simulate(state, t, rtol=1e-5, atol=1e-7)
    f = _Field(net, {}, (), check_finite=False)
    with torch.no_grad():
        ys = torchdiffeq.odeint(f, tuple(state[n] for n in net.layers), t.float(), method="dopri5", rtol=1e-5,
                                atol=1e-7)
    floor = max(float((y.double() - want.states[n]).abs().max()) for n, y in zip(net.layers, ys))
    err = max(float((got.states[n].double() - want.states[n]).abs().max()) for n in net.layers)
    assert err <= max(2 * floor, 1e-4), (err, floor)


def test_dopri5_step_underflow_names_the_layer():
    """A state that blows up in finite time (dx/dt = x^2 through a cubic Lagrangian's activation) ends the solve
    with StepUnderflowError naming the layer, not with NaN states."""
    from hopfield import StepUnderflowError

    net = Network({"a": Layer((2, 3), lag.identity(), 1.0), "b": Layer((2, 3), lag.identity(), 1.0)},
                  [DenseSynapse("a", "b", axis=-1, form="tied")])
    with torch.no_grad():
        net.synapses[0].weight.copy_(3.0 * torch.eye(3))  # spectral radius 3 > 1: the energy is unbounded below
    state = {"a": torch.ones(2, 2, 3, dtype=torch.float64), "b": torch.ones(2, 2, 3, dtype=torch.float64)}
    net = net.double()
    with pytest.raises(StepUnderflowError) as e:
        net.simulate(state, torch.tensor([0.0, 1e4], dtype=torch.float64), method="dopri5")
    assert e.value.layer in ("a", "b")


@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize("grid", ["outputs", "step_size"])
def test_fixed_step_divergence_names_the_first_non_finite_state(method, grid):
    """The fixed-step loop checks finiteness per step (on the output grid every few steps, then finds the first
    non-finite stored state): the error names the layer and the first output time whose state is not finite, as
    a scan of the same run without the check finds it; a finite run raises nothing."""
    from hopfield import NonFiniteStateError

    net = Network({"a": Layer((3,), lag.identity(), 1.0), "b": Layer((3,), lag.identity(), 1.0)},
                  [DenseSynapse("a", "b", form="tied")])
    with torch.no_grad():
        net.synapses[0].weight.copy_(40.0 * torch.eye(3))  # dx/dt grows ~39x per unit time: overflows float32
    state = {n: torch.ones(2, 3) for n in net.layers}
    t = torch.linspace(0, 40, 41) if grid == "outputs" else torch.linspace(0, 40, 11)
    options = None if grid == "outputs" else {"step_size": 0.5}
    with torch.no_grad():
        free = net.simulate(state, t, method=method, options=options, check_finite=False, track_energy=False)
        with pytest.raises(NonFiniteStateError) as e:
            net.simulate(state, t, method=method, options=options)
    if grid == "outputs":  # every step is stored: the time is exact
        first = min(k for k in range(len(t)) if not all(torch.isfinite(s[k]).all() for s in free.states.values()))
        assert e.value.time == pytest.approx(float(t[first]))
        assert not torch.isfinite(free.states[e.value.layer][first]).all()
    else:  # the step's end time, at or before the first non-finite output
        first = min(k for k in range(len(t)) if not torch.isfinite(free.states["a"][k]).all())
        assert 0 < e.value.time <= float(t[first])
    assert "diverged" in str(e.value) and f"layer {e.value.layer!r}" in str(e.value)
    with torch.no_grad():
        net.synapses[0].weight.copy_(0.5 * torch.eye(3))
        assert torch.isfinite(net.simulate(state, t, method=method, options=options).energy).all()


@pytest.mark.parametrize("shape", [(3, 7, 50), (2, 4000), (5, 3, 16), (6, 40, 5), (20, 300)], ids=str)
def test_chunked_dot_products_equal_vecdot(shape, monkeypatch):
    """The energy's dot products in pieces (rows in blocks, long rows in column blocks too) equal linalg.vecdot."""
    from hopfield.lagrangians import base as lags

    monkeypatch.setattr(lags, "_DOT_CHUNK", 64)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float64, torch.float32):
        a, b = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        want = torch.linalg.vecdot(a, b)
        assert float((lags._vecdot(a, b) - want).abs().max()) <= tol * float(want.abs().max())
        want = (a * b).reshape(shape[0], -1).sum(-1)
        assert float((lags._fast_dot(a, b) - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_simulation_leaves_no_reference_cycle(method):
    """The stored states are freed as soon as the trajectory is, without the garbage collector: a cycle through
    the vector field once held every state of every run until a full collection (gigabytes at Mixer size)."""
    import gc
    import weakref

    net = network("untied", True, None, torch.float64)
    state = net.init_state(3, generator=torch.Generator().manual_seed(0))
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            traj = net.simulate(state, torch.linspace(0, 1, 5), method=method)
        refs = [weakref.ref(s) for s in traj.states.values()]
        del traj
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
