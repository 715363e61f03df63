"""Network energy, closed-form currents, Eq. 18, the API contract and clear errors."""

import pytest
import torch

from hopfield import DenseSynapse, Layer, Network, Synapse, presets
from hopfield import lagrangians as lag


def contract_network():
    """The network of the API contract (3 layers on a 16 x 32 token x channel state)."""
    return Network(
        layers={
            "v": Layer((16, 32), lag.layernorm(gamma=1.0, axis=-1, eps=1e-5), tau=1.0),
            "x": Layer((16, 64), lag.relu(), tau=0.1),
            "h": Layer((16, 128), lag.softmax(beta=1.0, axis=-1), tau=0.01),
        },
        synapses=[DenseSynapse("v", "x", axis=-1), DenseSynapse("x", "h", axis=-1)],
    )


def small_network(axis=-1, bias=False, symmetric=True):
    """Five small layers of rank-3 states coupled along one axis, every synapse kind."""
    other = [3, 4]
    def shape(n):
        s = list(other)
        s.insert(axis % 3, n)
        return tuple(s)
    layers = {
        "v": Layer(shape(5), lag.layernorm(axis=axis), 1.0),
        "a": Layer(shape(6), lag.tanh(), 0.5),
        "b": Layer(shape(4), lag.softmax(axis=axis), 0.2),
        "c": Layer(shape(7), lag.sigmoid(), 0.3),
    }
    syn = [DenseSynapse("v", "a", axis=axis, bias=bias, symmetric=symmetric),
           DenseSynapse("a", "b", axis=axis, bias=bias, symmetric=symmetric),
           DenseSynapse("v", "c", axis=axis, bias=bias, symmetric=symmetric)]
    net = Network(layers, syn).double()
    with torch.no_grad():  # random weights and biases, far from the initialisation
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def test_api_contract_shapes():
    torch.manual_seed(0)
    net = contract_network()
    assert tuple(net.synapses[0].weight.shape) == (64, 32)
    state = net.init_state(batch=4)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"v": (4, 16, 32), "x": (4, 16, 64), "h": (4, 16, 128)}
    assert net.energy(state).shape == (4,)
    dx = net.vector_field(state)
    cur = net.currents(state)
    for n, layer in net.layers.items():
        assert torch.allclose(dx[n], (cur[n] - state[n]) / layer.tau)
    with torch.no_grad():
        traj = net.simulate(state, t=torch.linspace(0, 0.05, 6), method="dopri5", rtol=1e-6, atol=1e-8)
    assert traj.energy.shape == (6, 4)
    assert traj.states["v"].shape == (6, 4, 16, 32)
    assert traj.nfe > 0 and traj.descent.ok and traj.descent.guaranteed



def test_init_state_names_a_bad_batch_or_scale():
    net = contract_network()
    for bad in (0, -1, "2", 2.0, True):
        with pytest.raises(ValueError, match=r"batch must be a positive integer"):
            net.init_state(batch=bad)
    with pytest.raises(ValueError, match=r"scale must be a finite number"):
        net.init_state(batch=2, scale=float("nan"))
    assert all(x.abs().max() == 0 for x in net.init_state(batch=2, scale=0).values())


def test_network_is_an_nn_module():
    net = contract_network().double()
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert net.init_state(2)["v"].dtype == torch.float64
    assert len(list(net.parameters())) == 2
    assert set(net.state_dict()) == {"synapses.0.weight", "synapses.1.weight"}


@pytest.mark.parametrize("axis", [-1, -2, 0])
@pytest.mark.parametrize("bias", [False, True])
def test_closed_form_currents_equal_autograd_gradient_of_synapse_energy(axis, bias):
    torch.manual_seed(1)
    net = small_network(axis=axis, bias=bias)
    state = net.init_state(3)
    g = net.activations(state)
    for syn in net.synapses:
        closed = syn.currents(g)
        generic = Synapse.currents(syn, g)  # -dE_syn/dg by autograd
        for n in syn.layers:
            assert (closed[n] - generic[n]).abs().max().item() < 1e-12


def test_asymmetric_synapse_currents_and_pseudo_energy():
    torch.manual_seed(2)
    net = small_network(axis=-1, bias=True, symmetric=False)
    state = net.init_state(3)
    g = net.activations(state)
    syn = net.synapses[0]
    cur = syn.currents(g)
    assert torch.allclose(cur["a"], g["v"] @ syn.weight.T + syn.bias)
    assert torch.allclose(cur["v"], g["a"] @ syn.weight_fb.T + syn.bias_fb)
    # the pseudo-energy's gradient is not the current ...
    generic = Synapse.currents(syn, g)
    assert (generic["v"] - cur["v"]).abs().max() > 1e-3
    # ... until the feedback is the transpose: then it is the symmetric energy exactly
    with torch.no_grad():
        syn.weight_fb.copy_(syn.weight.T)
        syn.bias_fb.zero_()
    sym = DenseSynapse("v", "a", bias=True, weight=syn.weight.detach())
    sym.bind({"v": net.layers["v"], "a": net.layers["a"]})
    with torch.no_grad():
        sym.double().bias.copy_(syn.bias)
    assert (syn.energy(g) - sym.energy(g)).abs().max() < 1e-12
    assert not net.descent_guaranteed
    assert any("'v-a'" in c and "untied" in c and "pseudo-energy" in c for c in net.descent_caveats())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_energy_gradient_is_legendre_consistent(dtype):
    """dE/dx_A = Hess(L_A) (x_A - I_A): the energy, activations and currents agree (Eq. 14 and 17)."""
    torch.manual_seed(3)
    net = small_network().to(dtype)
    state = {k: v.requires_grad_(True) for k, v in net.init_state(3).items()}
    inputs = {"v": torch.randn(3, 3, 4, 5, dtype=dtype)}
    grads = torch.autograd.grad(net.energy(state, inputs).sum(), list(state.values()))
    cur = net.currents(state, inputs)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for (n, x), gr in zip(state.items(), grads):
        want = net.layers[n].lagrangian.hvp(x, x - cur[n])
        assert (gr - want).abs().max().item() < tol * max(1, want.abs().max().item())


@pytest.mark.parametrize("clamped", [(), ("v",)])
def test_eq18_energy_rate(clamped):
    """dE/dt along the flow equals -sum_A tau_A xdot^T Hess(L_A) xdot (Krotov 2021, Eq. 18) at random states."""
    torch.manual_seed(4)
    net = small_network()
    inputs = {"a": torch.randn(2, 3, 4, 6, dtype=torch.float64)}
    for _ in range(3):
        state = net.init_state(2, scale=2.0)
        xdot = net.vector_field(state, inputs, clamped)
        names = list(state)
        _, dedt = torch.func.jvp(lambda *xs, names=names: net.energy(dict(zip(names, xs)), inputs),
                                 tuple(state.values()), tuple(xdot.values()))
        predicted = net.energy_rate(state, inputs, clamped)
        assert (dedt - predicted).abs().max().item() < 1e-10 * max(1, dedt.abs().max().item())
        assert (predicted <= 1e-12).all()


def test_works_under_no_grad_and_inside_autograd():
    torch.manual_seed(5)
    net = small_network()
    state = net.init_state(2)
    with torch.no_grad():
        e = net.energy(state)
        assert not e.requires_grad
    loss = net.energy(state).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_presets_build_the_mixer_family():
    net = presets.imixer_chain(tokens=8, channels=6, internal=5, hidden=7)
    assert [l.shape for l in net.layers.values()] == [(8, 6), (5, 6), (7, 6)]
    assert not net.descent_guaranteed and "gelu" in net.descent_caveats()[0]
    star = presets.star(tokens=8, channels=6, token_hidden=3, channel_hidden=9)
    assert {n: l.shape for n, l in star.layers.items()} == {"v": (8, 6), "s": (3, 6), "c": (8, 9)}
    assert tuple(star.synapses[0].weight.shape) == (3, 8) and tuple(star.synapses[1].weight.shape) == (9, 6)
    tok = presets.mixing(tokens=8, channels=6, axis=-2)
    ch = presets.mixing(tokens=8, channels=6, axis=-1)
    assert tok.layers["h"].shape == (3, 6) and ch.layers["h"].shape == (8, 24)
    deep = presets.lchain([5, 4, 3, 2], tokens=8, channels=6)
    assert list(deep.layers) == ["v", "x1", "x2", "x3", "x4"]
    assert [l.tau for l in deep.layers.values()] == [1.0, 0.1, 0.01, 0.001, 0.0001]
    krotov = presets.chain([784, 100, 10], lagrangians=[lag.identity(), lag.relu(), lag.softmax()])
    assert krotov.descent_guaranteed and krotov.layers["x2"].shape == (10,)


# ---------------------------------------------------------------------------- errors
def test_synapse_that_does_not_fit_names_everything():
    layers = {"v": Layer((16, 32), lag.layernorm(), 1.0), "x": Layer((8, 64), lag.relu(), 0.1)}
    with pytest.raises(ValueError) as e:
        Network(layers, [DenseSynapse("v", "x", axis=-1)])
    msg = str(e.value)
    assert "'v-x'" in msg and "'v'" in msg and "'x'" in msg and "(16, 32)" in msg and "(8, 64)" in msg
    assert "(16,) and (8,)" in msg
    with pytest.raises(ValueError, match=r"weight has shape \(3, 3\), expected \(n_b, n_a\) = \(64, 32\)"):
        Network({"v": layers["v"], "x": Layer((16, 64), lag.relu())},
                [DenseSynapse("v", "x", weight=torch.zeros(3, 3))])


def test_unknown_and_duplicate_layer_names():
    v = Layer((4,), lag.identity())
    with pytest.raises(ValueError, match=r"unknown layer 'y'.*\['v', 'x'\]"):
        Network({"v": v, "x": v}, [DenseSynapse("v", "y")])
    with pytest.raises(ValueError, match="duplicate layer name 'v'"):
        Network([("v", v), ("v", v)], [])
    net = Network({"v": v, "x": v}, [DenseSynapse("v", "x")])
    with pytest.raises(ValueError, match="state of layer 'x' must have shape"):
        net.energy({"v": torch.zeros(2, 4), "x": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match=r"missing \['x'\]"):
        net.energy({"v": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="cannot clamp unknown layer 'q'"):
        net.vector_field(net.init_state(2), clamped=("q",))
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        Layer((4,), lag.identity(), tau=0.0)


def test_input_shape_dtype_and_device_errors_name_the_layer():
    net = Network({"v": Layer((4, 6), lag.layernorm()), "h": Layer((4, 5), lag.relu(), 0.1)},
                  [DenseSynapse("v", "h")])
    s = net.init_state(2)
    for bad in (torch.randn(3), torch.randn(7), torch.randn(3, 4, 5), torch.randn(2, 4, 5, 1)):
        with pytest.raises(ValueError, match=r"input current for layer 'h' has shape .* \(2, 4, 5\)"):
            net.energy(s, inputs={"h": bad})
        with pytest.raises(ValueError, match="input current for layer 'h'"):
            net.vector_field(s, inputs={"h": bad})
    for good in (torch.randn(5), torch.randn(4, 1), torch.randn(2, 4, 5)):  # broadcastable inputs still work
        assert net.energy(s, inputs={"h": good}).shape == (2,)
    with pytest.raises(ValueError, match=r"input current for layer 'v' is torch.float64"):
        net.vector_field(s, inputs={"v": torch.randn(6, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"state of layer 'v' is torch.float64 on cpu, but the network computes "
                                         r"in torch.float32"):
        net.vector_field({k: v.double() for k, v in s.items()})
    with pytest.raises(ValueError, match=r"state of layer 'h' is torch.float64"):
        net.simulate({"v": s["v"], "h": s["h"].double()}, torch.linspace(0, 1, 3))
    with pytest.raises(TypeError, match="state of layer 'v' must be a floating-point tensor"):
        net.energy({"v": s["v"].long(), "h": s["h"]})
    # without parameters the first layer's state sets the dtype
    free = Network({"a": Layer((3,), lag.identity()), "b": Layer((3,), lag.tanh())}, [])
    with pytest.raises(ValueError, match=r"state of layer 'b' is torch\.float64"):
        free.energy({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3, dtype=torch.float64)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_state_on_another_device_names_the_layer():
    net = Network({"v": Layer((4,), lag.tanh()), "h": Layer((3,), lag.relu())}, [DenseSynapse("v", "h")])
    s = net.init_state(2)
    with pytest.raises(ValueError, match=r"state of layer 'h' is torch.float32 on cuda:0, .* on cpu"):
        net.energy({"v": s["v"], "h": s["h"].cuda()})


class QuadraticLateral(Synapse):
    """A custom synapse: E = -1/2 sum g_a M g_a with a symmetric M (lateral coupling inside one layer)."""

    def __init__(self, a, n):
        super().__init__()
        self.layers = (a,)
        m = torch.randn(n, n, dtype=torch.float64) * 0.3
        self.m = torch.nn.Parameter(m + m.T)

    def energy(self, g):
        ga = g[self.layers[0]]
        return -0.5 * ((ga @ self.m) * ga).reshape(ga.shape[0], -1).sum(-1)


def test_any_module_returning_an_energy_is_a_synapse():
    torch.manual_seed(8)
    layers = {"v": Layer((3, 4), lag.tanh(), 1.0), "h": Layer((3, 5), lag.softmax(), 0.2)}
    net = Network(layers, [DenseSynapse("v", "h"), QuadraticLateral("v", 4)]).double()
    state = net.init_state(2)
    cur = net.currents(state)
    g = net.activations(state)
    assert torch.allclose(cur["v"], g["h"] @ net.synapses[0].weight + g["v"] @ net.synapses[1].m)
    assert net.descent_guaranteed
    with torch.no_grad():
        traj = net.simulate(state, torch.linspace(0, 3, 16, dtype=torch.float64), rtol=1e-9, atol=1e-11)
    assert traj.descent.ok and traj.energy[-1].max() < traj.energy[0].min()
    rate = net.energy_rate(state)
    _, dedt = torch.func.jvp(lambda v, h: net.energy({"v": v, "h": h}), (state["v"], state["h"]),
                             tuple(net.vector_field(state).values()))
    assert (rate - dedt).abs().max() < 1e-10
