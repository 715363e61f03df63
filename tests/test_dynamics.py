"""Simulation: energy descent (property-based), pseudo-energy rises, relax, adjoint, solvers, errors."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopfield import (
    DenseSynapse,
    Layer,
    Network,
    NonFiniteStateError,
    NotConvergedError,
    StepUnderflowError,
    presets,
)
from hopfield import lagrangians as lag

BOUNDED = ["tanh", "sigmoid", "softmax", "layernorm", "spherical"]  # activations bounded in norm
UNBOUNDED = ["identity", "relu"]


def _convex_lagrangian(draw, axis, bounded):
    # The descent theorem also needs E bounded below (Krotov 2021). E is, if no synapse couples two
    # layers whose activations are both unbounded: the synapse term is then at most linear in the
    # unbounded activation, whose Legendre term grows quadratically. exp and repu(n > 2) are left out:
    # next to an unbounded activation E is unbounded below and the state blows up in finite time.
    kind = draw(st.sampled_from(BOUNDED if bounded else BOUNDED + UNBOUNDED))
    return {
        "identity": lambda: lag.identity(),
        "relu": lambda: lag.relu(),
        "tanh": lambda: lag.tanh(),
        "sigmoid": lambda: lag.sigmoid(),
        "softmax": lambda: lag.softmax(beta=draw(st.floats(0.5, 2.0)), axis=axis),
        "layernorm": lambda: lag.layernorm(gamma=draw(st.floats(0.5, 2.0)), axis=axis),
        "spherical": lambda: lag.spherical(axis=axis),
    }[kind]()


@st.composite
def random_networks(draw):
    """Chains of 2-5 layers or stars, random small token x channel shapes, convex Lagrangians, random
    symmetric weights, time constants including stiff ratios (1 : 0.01)."""
    kind = draw(st.sampled_from(["chain", "star"]))
    depth = draw(st.integers(2, 5)) if kind == "chain" else draw(st.integers(3, 4))
    other = draw(st.integers(1, 4))
    axis = draw(st.sampled_from([-1, -2]))
    sizes = [draw(st.integers(1, 5)) for _ in range(depth)]
    taus = [1.0] + [draw(st.sampled_from([1.0, 0.3, 0.1, 0.01])) for _ in range(depth - 1)]
    names = [f"l{k}" for k in range(depth)]

    def shape(n):
        return (n, other) if axis == -2 else (other, n)

    # chain: even layers bounded; star: the centre (layer 0) bounded
    bounded = [k % 2 == 0 if kind == "chain" else k == 0 for k in range(depth)]
    layers = {n: Layer(shape(s), _convex_lagrangian(draw, axis, b), tau)
              for n, s, tau, b in zip(names, sizes, taus, bounded)}
    pairs = list(zip(names, names[1:])) if kind == "chain" else [(names[0], n) for n in names[1:]]
    scale = draw(st.floats(0.3, 2.0))
    syn = [DenseSynapse(a, b, axis=axis, init_std=scale) for a, b in pairs]
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    net = Network(layers, syn).double()
    return net, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_networks())
def test_energy_never_rises_beyond_solver_tolerance(case):
    net, seed = case
    assert net.descent_guaranteed, net.descent_caveats()
    state = net.init_state(3, scale=1.5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        traj = net.simulate(state, torch.linspace(0, 2, 21, dtype=torch.float64), rtol=1e-9, atol=1e-11)
    assert traj.descent.ok, str(traj.descent)
    e = traj.energy
    assert (e[1:] - e[:-1] <= 1e-7 * e[:-1].abs().clamp_min(1.0)).all()
    # and at every output time the rate predicted by Eq. 18 is <= 0 and matches finite differences
    rate = torch.stack([net.energy_rate({n: s[k] for n, s in traj.states.items()}) for k in range(21)])
    assert (rate <= 1e-12).all()


def test_eq18_rate_matches_the_simulated_energy_curve():
    torch.manual_seed(0)
    net = presets.chain([5, 4, 3], other=(3,), lagrangians=[lag.layernorm(), lag.tanh(), lag.softmax()],
                        taus=[1.0, 0.5, 0.3]).double()
    state = net.init_state(2)
    t = torch.linspace(0, 1, 401, dtype=torch.float64)
    with torch.no_grad():
        traj = net.simulate(state, t, rtol=1e-11, atol=1e-13)
    rate = torch.stack([net.energy_rate({n: s[k] for n, s in traj.states.items()}) for k in range(len(t))])
    # trapezoidal integral of dE/dt reproduces the energy change
    integral = torch.cumulative_trapezoid(rate, t, dim=0)
    change = traj.energy[1:] - traj.energy[0]
    assert (integral - change).abs().max() < 1e-5 * change.abs().max()


def test_asymmetric_network_pseudo_energy_rises_and_is_reported():
    # two scalar identity units: E = (a^2 + b^2)/2 - (w + u)/2 a b, adot = u b - a, bdot = w a - b;
    # with w = 2, u = 0 and (a, b) = (1, 2): dE/dt = (a - b)(b - 3a) = 1 > 0
    layers = {"a": Layer((1,), lag.identity()), "b": Layer((1,), lag.identity())}
    syn = DenseSynapse("a", "b", symmetric=False, weight=torch.tensor([[2.0]], dtype=torch.float64))
    net = Network(layers, [syn]).double()
    with torch.no_grad():
        syn.weight_fb.zero_()
    state = {"a": torch.tensor([[1.0]], dtype=torch.float64), "b": torch.tensor([[2.0]], dtype=torch.float64)}
    with torch.no_grad():
        traj = net.simulate(state, torch.linspace(0, 0.5, 11), rtol=1e-10, atol=1e-12)
    rep = traj.descent
    assert rep.max_rise > 0 and not rep.ok and not rep.guaranteed
    assert any("'a-b'" in c and "pseudo-energy" in c for c in rep.caveats)
    assert "BEYOND" in str(rep) and "NOT guaranteed" in str(rep)
    # the same network made symmetric (u = w) descends
    with torch.no_grad():
        syn.weight_fb.copy_(syn.weight.T)
        assert net.simulate(state, torch.linspace(0, 0.5, 11), rtol=1e-10, atol=1e-12).descent.max_rise <= 0


def test_relax_reaches_a_fixed_point_where_state_equals_currents():
    torch.manual_seed(1)
    net = presets.chain([6, 5, 4], other=(3,), lagrangians=[lag.layernorm(), lag.tanh(), lag.softmax()],
                        taus=[1.0, 0.5, 0.2]).double()
    state = net.init_state(2)
    inputs = {"v": torch.randn(2, 3, 6, dtype=torch.float64)}
    tol = 1e-8
    fp = net.relax(state, tol=tol, inputs=inputs)
    cur = net.currents(fp, inputs)
    for n, layer in net.layers.items():
        assert (fp[n] - cur[n]).abs().max() < layer.tau * tol  # tau |xdot| = |I - x|
    # a relaxed state is not moved any more
    assert all((net.relax(fp, tol=tol, inputs=inputs)[n] == fp[n]).all() for n in fp)


def test_relax_raises_with_the_state_when_it_cannot_converge():
    # an antisymmetric coupling of two linear units rotates and decays slowly: not converged by t_max
    layers = {"a": Layer((2,), lag.identity(), 1.0), "b": Layer((2,), lag.identity(), 1.0)}
    syn = DenseSynapse("a", "b", symmetric=False, weight=torch.eye(2, dtype=torch.float64) * 50)
    net = Network(layers, [syn]).double()
    with torch.no_grad():
        syn.weight_fb.copy_(-syn.weight.T)
    with pytest.raises(NotConvergedError, match="t_max = 2") as e:
        net.relax(net.init_state(2), tol=1e-12, t_max=2.0, rtol=1e-8, atol=1e-10)
    assert set(e.value.state) == {"a", "b"} and e.value.residual > 1e-12


def _stiff_chain(dtype):
    torch.manual_seed(3)
    net = presets.chain([6, 5, 4], other=(3,), lagrangians=[lag.layernorm(), lag.tanh(), lag.softmax()],
                        taus=[0.05, 0.02, 0.01])
    return net.to(dtype), net.init_state(2, scale=3.0, dtype=dtype)


def test_relax_refuses_a_tol_below_the_float32_rounding_floor():
    # tau dx/dt = I - x is known to eps max|x| only: about 1e-4 / s for |x| ~ 3 and tau = 0.01 in float32
    net, state = _stiff_chain(torch.float32)
    with pytest.raises(ValueError, match=r"tol=1e-06 is below what torch.float32 resolves in layer 'x2'.*"
                                         r"smallest reachable tol is about ([0-9.e-]+)") as e:
        net.relax(state, tol=1e-6, t_max=50.0)  # before the check it ran into t_max (or forever)
    reachable = float(str(e.value).rsplit(" about ", 1)[1].split()[0])
    assert 1e-4 < reachable < 1e-2
    fp = net.relax(state, tol=reachable)  # the suggested tol is reached
    assert max(d.abs().max() for d in net.vector_field(fp).values()) < reachable
    net64, state64 = _stiff_chain(torch.float64)
    fp64 = net64.relax(state64, tol=1e-6)  # float64 resolves it
    assert max(d.abs().max() for d in net64.vector_field(fp64).values()) < 1e-6


def test_relax_default_tol_follows_the_dtype():
    """relax(state) with no tol works in float32 as in float64: 1e-3 and 1e-6 (1e-6 is below float32's floor)."""
    net = presets.imixer_chain(8, 16)
    state = net.init_state(2, generator=torch.Generator().manual_seed(0))
    fp = net.relax(state, clamped=("v",))
    assert max(float(d.detach().abs().max()) for d in net.vector_field(fp, clamped=("v",)).values()) < 1e-3
    net64 = net.double()
    fp64 = net64.relax({k: v.double() for k, v in state.items()}, clamped=("v",))
    assert max(float(d.detach().abs().max()) for d in net64.vector_field(fp64, clamped=("v",)).values()) < 1e-6


def test_relax_default_rtol_is_resolvable_in_float32(monkeypatch):
    # a slow float32 layer resolves tol = 5e-6, but the default rtol = tol / 100 = 5e-8 is below eps = 1.2e-7
    import hopfield.dynamics as dyn

    seen, odeint = [], dyn._odeint

    def spy(*args, **kwargs):
        seen.append(kwargs["rtol"])
        return odeint(*args, **kwargs)

    monkeypatch.setattr(dyn, "_odeint", spy)
    net = presets.chain([3, 2], lagrangians=[lag.tanh(), lag.tanh()], taus=[1.0, 1.0])
    net.relax(net.init_state(2, scale=0.1), tol=5e-6)
    assert seen and min(seen) >= 10 * torch.finfo(torch.float32).eps


def test_relax_stops_at_its_evaluation_budget_with_the_state_reached():
    net, state = _stiff_chain(torch.float64)
    with pytest.raises(NotConvergedError, match=r"used up max_nfe = 300 evaluations.*fastest tau 0.01") as e:
        net.relax(state, tol=1e-9, max_nfe=300)
    assert set(e.value.state) == set(net.layers) and e.value.residual > 1e-9
    for bad in (0, 2.5, "300"):
        with pytest.raises(ValueError, match="max_nfe must be an int >= 1 or None"):
            net.relax(state, max_nfe=bad)
    for bad in (0.0, "1e-3", float("nan")):
        with pytest.raises(ValueError, match="relax: tol must be a finite number > 0"):
            net.relax(state, tol=bad)


def test_clamped_layer_is_held_and_inputs_enter_the_energy():
    torch.manual_seed(2)
    net = presets.chain([4, 3], other=(2,), lagrangians=[lag.tanh(), lag.relu()]).double()
    state = net.init_state(2)
    inputs = {"x1": torch.ones(1, 2, 3, dtype=torch.float64)}
    with torch.no_grad():
        traj = net.simulate(state, torch.linspace(0, 2, 21), inputs=inputs, clamped=("v",), rtol=1e-9, atol=1e-11)
    assert (traj.states["v"] == state["v"]).all()  # exactly
    assert traj.descent.ok
    assert "input:x1" in net.energy_terms(state, inputs)


def _grads(net, state, adjoint):
    net.zero_grad()
    traj = net.simulate(state, torch.linspace(0, 1, 3, dtype=torch.float64), rtol=1e-10, atol=1e-12,
                        adjoint=adjoint, track_energy=False, grad=True)
    loss = sum((s[-1] ** 2).sum() for s in traj.states.values())
    loss.backward()
    return [p.grad.clone() for p in net.parameters()]


def test_gradients_through_simulate_agree_between_adjoint_and_direct():
    torch.manual_seed(3)
    net = presets.chain([5, 4, 3], other=(2,), lagrangians=[lag.layernorm(), lag.tanh(), lag.softmax()],
                        taus=[1.0, 0.3, 0.1], bias=True).double()
    state = net.init_state(2)
    direct = _grads(net, state, adjoint=False)
    adj = _grads(net, state, adjoint=True)
    for d, a in zip(direct, adj):
        assert d.abs().max() > 0
        assert (d - a).abs().max() < 1e-6 * d.abs().max()


def test_gradcheck_through_a_short_simulation():
    torch.manual_seed(4)
    net = presets.chain([3, 2], other=(1,), lagrangians=[lag.tanh(), lag.sigmoid()]).double()
    state = net.init_state(2)
    w = net.synapses[0].weight

    def final():
        traj = net.simulate(state, torch.tensor([0.0, 0.5], dtype=torch.float64), method="rk4",
                            options={"step_size": 0.05}, track_energy=False, grad=True)
        return traj.states["x1"][-1].sum()

    (g,) = torch.autograd.grad(final(), w)
    eps, num = 1e-6, torch.zeros_like(g)
    with torch.no_grad():
        w0 = w.clone()
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                w.copy_(w0)
                w[i, j] += eps
                up = final()
                w[i, j] -= 2 * eps
                num[i, j] = (up - final()) / (2 * eps)
        w.copy_(w0)
    assert g.abs().max() > 0
    assert (g - num).abs().max() < 1e-7


FIXED = {"euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams"}


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler",
                                    "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams",
                                    "fixed_adams", "scipy_solver"])
def test_every_torchdiffeq_method_runs_and_agrees(method):
    torch.manual_seed(5)
    net = presets.chain([4, 3, 2], other=(2,), lagrangians=[lag.layernorm(), lag.tanh(), lag.softmax()],
                        taus=[1.0, 0.5, 0.25]).double()
    state = net.init_state(2)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = net.simulate(state, t, rtol=1e-11, atol=1e-13)
        # Adams-Bashforth's small stability region needs the finer step on this problem
        opts = {"step_size": 1e-4 if method == "explicit_adams" else 1e-3} if method in FIXED else None
        low_order = method in ("adaptive_heun", "fehlberg2", "bosh3")
        traj = net.simulate(state, t, method=method, rtol=1e-6 if low_order else 1e-8,
                            atol=1e-8 if low_order else 1e-10, options=opts)
    tol = 1e-2 if method == "euler" else 1e-4 if low_order else 1e-5
    for n in net.layers:
        assert (traj.states[n] - ref.states[n]).abs().max() < tol, n


def test_stiff_network_with_scipy_radau_matches_dopri5():
    torch.manual_seed(6)
    net = presets.chain([3, 3, 2], other=(1,), lagrangians=[lag.identity(), lag.tanh(), lag.softmax()],
                        taus=[1.0, 1e-2, 1e-4]).double()
    state = net.init_state(2)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = net.simulate(state, t, rtol=1e-8, atol=1e-10)
        stiff = net.simulate(state, t, method="scipy_solver", options={"solver": "Radau"}, rtol=1e-8, atol=1e-10)
    assert stiff.nfe < ref.nfe / 3  # the point of an implicit solver: dopri5 is stability-limited here
    for n in net.layers:
        assert (stiff.states[n] - ref.states[n]).abs().max() < 1e-6
    assert stiff.descent.ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diverging_network_names_the_layer_and_time(dtype):
    layers = {"a": Layer((2,), lag.exp(1.0), 1.0), "b": Layer((2,), lag.exp(1.0), 1.0)}
    net = Network(layers, [DenseSynapse("a", "b", weight=torch.full((2, 2), 5.0))]).to(dtype)
    with pytest.raises((NonFiniteStateError, StepUnderflowError)) as e, torch.no_grad():
        net.simulate(net.init_state(1), torch.linspace(0, 50, 3, dtype=dtype))
    assert e.value.layer in ("a", "b") and 0 < e.value.time <= 50
    assert f"layer {e.value.layer!r}" in str(e.value) and "at t=" in str(e.value)
    # a state that is already non-finite is named as the initial state, not as a divergence
    state = net.init_state(1)
    state["b"][0, 1] = float("nan")
    with pytest.raises(NonFiniteStateError, match="the initial state of layer 'b' is not finite") as e:
        net.simulate(state, torch.linspace(0, 1, 3, dtype=dtype))
    assert e.value.initial and "diverged" not in str(e.value)
    with pytest.raises(FloatingPointError, match="energy: the state of layer 'b' is not finite"):
        net.energy(state)


def test_simulate_validates_tolerances_takes_one_clamped_name_and_explores_without_a_graph():
    """rtol/atol must be finite and positive; clamped may be one name; the default tolerance is the dtype's, and
    without grad=True no autograd graph is kept (states do not require grad), with it gradients flow."""
    torch.manual_seed(0)
    net = presets.chain([4, 3], other=(2,))
    state = net.init_state(2)
    t = torch.linspace(0, 1, 3)
    for key, value in (("rtol", -1), ("atol", 0.0), ("rtol", float("nan"))):
        with pytest.raises(ValueError, match=f"simulate: {key} must be a finite number > 0"):
            net.simulate(state, t, **{key: value})
    traj = net.simulate(state, t, clamped="v")
    assert torch.equal(traj.states["v"][-1], state["v"])
    assert not any(s.requires_grad for s in traj.states.values()) and not traj.energy.requires_grad
    float(traj.energy[-1, 0])  # no warning about a tensor that requires grad
    loose = net.simulate(state, t)
    tight = net.simulate(state, t, rtol=1e-7, atol=1e-9)
    assert loose.nfe < tight.nfe and (loose.energy - tight.energy).abs().max() < 1e-4 * tight.energy.abs().max()
    traj = net.simulate(state, t, grad=True)
    traj.states["x1"][-1].sum().backward()
    assert net.synapses[0].weight.grad is not None


def test_finite_time_blow_up_gives_a_clear_error():
    # identity - repu(3): E ~ -w^2 x1^4 / 2 is unbounded below and x1 grows like x1^2
    layers = {"a": Layer((1,), lag.identity()), "b": Layer((1,), lag.repu(3))}
    net = Network(layers, [DenseSynapse("a", "b", weight=torch.ones(1, 1, dtype=torch.float64))]).double()
    state = {"a": torch.full((1, 1), 2.0, dtype=torch.float64), "b": torch.full((1, 1), 2.0, dtype=torch.float64)}
    with pytest.raises(StepUnderflowError, match=r"step size underflowed at t=.*in layer '(a|b)'"), torch.no_grad():
        net.simulate(state, torch.linspace(0, 10, 3, dtype=torch.float64))


def test_unknown_solver_and_bad_times():
    net = presets.chain([2, 2])
    with pytest.raises(ValueError, match=r"unknown solver 'rk45'.*dopri5"):
        net.simulate(net.init_state(1), torch.linspace(0, 1, 3), method="rk45")
    with pytest.raises(ValueError, match=r"strictly increasing; t\[1\] = 1.0 and t\[2\] = 0.5"):
        net.simulate(net.init_state(1), torch.tensor([0.0, 1.0, 0.5]))
    # distinct in float64, one time in the float32 state's dtype: the cast must not pass silently
    with pytest.raises(ValueError, match=r"strictly increasing in torch.float32, the state's dtype"):
        net.simulate(net.init_state(1), torch.tensor([0.0, 1.0, 1.0 + 1e-9], dtype=torch.float64))
    for bad in (torch.tensor([0.0, float("inf")]), torch.tensor([float("nan")])):
        with pytest.raises(ValueError, match="finite times"):
            net.simulate(net.init_state(1), bad)
    with pytest.raises(ValueError, match=r"1-D real tensor.*shape \(2, 2\)"):
        net.simulate(net.init_state(1), torch.zeros(2, 2))
    with pytest.raises(TypeError, match="t must be a 1-D tensor of output times, got str"):
        net.simulate(net.init_state(1), "0 to 1")
    # integer times are fine: cast to the state's dtype
    traj = net.simulate(net.init_state(1), torch.arange(3), method="euler")
    assert traj.t.dtype == torch.float32 and traj.t.tolist() == [0.0, 1.0, 2.0]
    # a list of Python floats reaches a float64 state in float64, not through float32
    traj = net.double().simulate(net.init_state(1, dtype=torch.float64), [0.0, 0.1], method="euler")
    assert traj.t.dtype == torch.float64 and traj.t.tolist() == [0.0, 0.1]


def test_float32_simulation_and_energy_plot(tmp_path):
    torch.manual_seed(7)
    net = presets.imixer_chain(tokens=8, channels=6, internal=4, hidden=5, hidden_lagrangian=lag.relu())
    state = net.init_state(3)
    with torch.no_grad():
        traj = net.simulate(state, torch.linspace(0, 2, 21), rtol=1e-5, atol=1e-7)
    assert traj.energy.dtype == torch.float32 and traj.descent.ok
    png = traj.plot(tmp_path / "energy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = traj.table(rows=5)
    assert len(table.splitlines()) == 6 and "E mean" in table
    assert math.isclose(float(table.splitlines()[1].split()[1]), float(traj.energy[0].mean()), rel_tol=1e-6)


def test_figures_are_written_whole_where_asked_or_the_path_is_named(tmp_path):
    """A path without a suffix gets .png (matplotlib appended it silently and the returned path was wrong); a
    folder or an unwritable place is an error naming the path; no temporary file is left behind."""
    from hopfield import presets

    net = presets.imixer_chain(4, 6)
    traj = net.simulate(net.init_state(2), t=torch.linspace(0, 0.1, 3))
    assert traj.plot(tmp_path / "energy") == tmp_path / "energy.png"
    assert (tmp_path / "energy.png").read_bytes()[:4] == b"\x89PNG"
    assert traj.plot(tmp_path / "sub" / "e.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="it is a folder"):
        traj.plot(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"cannot write the figure .*file/e\.png"):
        traj.plot(tmp_path / "file" / "e.png")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["e.svg", "energy.png", "file", "sub"]
