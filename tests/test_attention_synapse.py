"""The Energy Transformer's attention energy: closed-form currents, the energy formula, descent, errors."""

import math

import pytest
import torch

from hopfield import AttentionSynapse, DenseSynapse, Layer, Network, Synapse
from hopfield import lagrangians as lag

N, D = 5, 6


def bound(heads, head_dim=3, exclude_self=False, dtype=torch.float64, scale=1.0, shape=(N, D), **kw):
    syn = AttentionSynapse("v", heads, head_dim, exclude_self=exclude_self, init_std=scale / math.sqrt(D), **kw)
    syn.bind({"v": Layer(shape, lag.layernorm())})
    return syn.to(dtype)


def et_network(exclude_self, heads=2, memory=True):
    """One LayerNorm token x channel layer, attention on it and (optionally) a ReLU Hopfield memory along channels."""
    layers = {"v": Layer((N, D), lag.layernorm(), tau=1.0)}
    syn = [AttentionSynapse("v", heads, 3, exclude_self=exclude_self, init_std=1.0)]
    if memory:
        layers["h"] = Layer((N, 8), lag.relu(), tau=0.2)
        syn.append(DenseSynapse("v", "h", axis=-1))
    return Network(layers, syn).double()


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_form_currents_equal_autograd(exclude_self, heads, dtype):
    torch.manual_seed(heads + 10 * exclude_self)
    syn = bound(heads, exclude_self=exclude_self, dtype=dtype, scale=2.0)
    g = {"v": torch.randn(4, N, D, dtype=dtype)}
    closed = syn.currents(g)["v"]
    generic = Synapse.currents(syn, g)["v"]  # -dE/dg by autograd
    assert closed.shape == g["v"].shape and torch.isfinite(closed).all()
    err = (closed - generic).abs().max().item()
    if dtype == torch.float64:
        assert err <= 1e-12
    else:
        assert err <= 1e-5 * generic.abs().max().item()


@pytest.mark.parametrize("exclude_self", [False, True])
def test_closed_form_currents_are_differentiable_in_the_weights(exclude_self):
    """Training through the currents: their weight gradients equal those of the autograd currents."""
    torch.manual_seed(1)
    syn = bound(2, exclude_self=exclude_self)
    g = {"v": torch.randn(3, N, D, dtype=torch.float64)}
    r = torch.randn(3, N, D, dtype=torch.float64)
    params = [syn.weight_q, syn.weight_k]
    want = torch.autograd.grad((Synapse.currents(syn, g)["v"] * r).sum(), params)
    got = torch.autograd.grad((syn.currents(g)["v"] * r).sum(), params)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("exclude_self", [False, True])
def test_energy_and_scores_equal_the_formula_term_by_term(exclude_self):
    torch.manual_seed(2)
    heads, y = 2, 3
    syn = bound(heads, y, exclude_self=exclude_self, beta=0.7)
    g = torch.randn(2, N, D, dtype=torch.float64)
    wq, wk = syn.weight_q.detach(), syn.weight_k.detach()
    a_syn = syn.attention_scores(g)
    assert a_syn.shape == (2, heads, N, N)
    e = syn.energy({"v": g})
    assert e.shape == (2,)
    for s in range(2):
        total = 0.0
        for h in range(heads):
            k = [[sum(wk[h, a, j].item() * g[s, bb, j].item() for j in range(D)) for bb in range(N)] for a in range(y)]
            q = [[sum(wq[h, a, j].item() * g[s, c, j].item() for j in range(D)) for c in range(N)] for a in range(y)]
            a_hbc = [[sum(k[a][bb] * q[a][c] for a in range(y)) for c in range(N)] for bb in range(N)]
            for bb in range(N):
                for c in range(N):
                    assert abs(a_syn[s, h, bb, c].item() - a_hbc[bb][c]) < 1e-12
            for c in range(N):
                keys = [bb for bb in range(N) if not (exclude_self and bb == c)]
                total -= math.log(sum(math.exp(0.7 * a_hbc[bb][c]) for bb in keys)) / 0.7
        assert abs(e[s].item() - total) < 1e-10 * max(1.0, abs(total))
    p = syn.attention_weights(g)
    assert torch.allclose(p.sum(-2), torch.ones(2, heads, N, dtype=torch.float64))
    if exclude_self:
        assert (p.diagonal(dim1=-2, dim2=-1) == 0).all()


def test_default_beta_and_transposed_token_axis():
    torch.manual_seed(3)
    syn = bound(2, head_dim=4)
    assert syn.beta == 0.5
    tr = bound(2, head_dim=4, shape=(D, N), token_axis=-1, weight_q=syn.weight_q, weight_k=syn.weight_k)
    g = torch.randn(3, N, D, dtype=torch.float64)
    assert torch.allclose(tr.energy({"v": g.transpose(-1, -2)}), syn.energy({"v": g}), rtol=0, atol=1e-12)
    assert torch.allclose(tr.currents({"v": g.transpose(-1, -2)})["v"], syn.currents({"v": g})["v"].transpose(-1, -2),
                          rtol=0, atol=1e-12)
    assert "heads=2, head_dim=4, beta=0.5, exclude_self=False" in repr(syn)


def test_large_scores_stay_finite():
    """logsumexp keeps the energy and currents finite where exp(beta A) overflows, masked diagonal included."""
    torch.manual_seed(4)
    syn = bound(2, exclude_self=True, dtype=torch.float32, scale=200.0)
    g = {"v": torch.randn(2, N, D)}
    assert syn.attention_scores(g).abs().max() > 1e4
    e = syn.energy(g)
    cur = syn.currents(g)["v"]
    assert torch.isfinite(e).all() and torch.isfinite(cur).all()
    assert torch.isfinite(Synapse.currents(syn, g)["v"]).all()


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("memory", [False, True])
def test_energy_descends_along_the_flow(exclude_self, memory):
    torch.manual_seed(5)
    net = et_network(exclude_self, memory=memory)
    assert net.descent_guaranteed, net.descent_caveats()
    state = net.init_state(2, scale=1.5)
    with torch.no_grad():
        traj = net.simulate(state, torch.linspace(0, 3, 16, dtype=torch.float64), method="dopri5",
                            rtol=1e-9, atol=1e-11)
    assert traj.descent.ok and traj.descent.guaranteed
    assert traj.descent.max_rise <= 1e-8, str(traj.descent)
    assert (traj.energy[-1] < traj.energy[0]).all()


@pytest.mark.parametrize("exclude_self", [False, True])
def test_eq18_energy_rate(exclude_self):
    """dE/dt along the flow equals -sum_A tau_A xdot^T Hess(L_A) xdot (Krotov 2021, Eq. 18)."""
    torch.manual_seed(6)
    net = et_network(exclude_self)
    inputs = {"h": torch.randn(2, N, 8, dtype=torch.float64)}
    for _ in range(3):
        state = net.init_state(2, scale=2.0)
        xdot = net.vector_field(state, inputs)
        names = list(state)
        _, dedt = torch.func.jvp(lambda *xs, names=names: net.energy(dict(zip(names, xs)), inputs),
                                 tuple(state.values()), tuple(xdot.values()))
        predicted = net.energy_rate(state, inputs)
        assert (dedt - predicted).abs().max().item() < 1e-10 * max(1, dedt.abs().max().item())
        assert (predicted <= 1e-12).all()


def test_parameters_in_the_network():
    net = et_network(True)
    assert {"synapses.0.weight_q", "synapses.0.weight_k"} <= set(net.state_dict())
    assert tuple(net.synapses[0].weight_q.shape) == (2, 3, D)
    net.synapses[0].bind({"v": net.layers["v"]})  # rebinding to the same shape is fine
    with pytest.raises(ValueError, match=r"weight_q has shape \(2, 3, 6\), expected \(heads, head_dim, D\)"):
        net.synapses[0].bind({"v": Layer((N, 7), lag.layernorm())})


# ---------------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ValueError, match=r"AttentionSynapse 'v' \(layer 'v' of shape \(5, 6, 2\)\).*rank 2"):
        Network({"v": Layer((N, D, 2), lag.layernorm())}, [AttentionSynapse("v", 2, 3)])
    with pytest.raises(ValueError, match=r"AttentionSynapse 'v' \(layer 'v' of shape \(6,\)\).*rank 2"):
        Network({"v": Layer((D,), lag.layernorm())}, [AttentionSynapse("v", 2, 3)])
    with pytest.raises(ValueError, match=r"'v'.*exclude_self needs at least 2 tokens, got N = 1"):
        Network({"v": Layer((1, D), lag.layernorm())}, [AttentionSynapse("v", 2, 3, exclude_self=True)])
    Network({"v": Layer((1, D), lag.layernorm())}, [AttentionSynapse("v", 2, 3)])  # N = 1 is fine otherwise
    for bad in (0, -1):
        with pytest.raises(ValueError, match="heads must be a positive int"):
            AttentionSynapse("v", bad, 3)
        with pytest.raises(ValueError, match="head_dim must be a positive int"):
            AttentionSynapse("v", 2, bad)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="heads must be a positive int"):
            AttentionSynapse("v", bad, 3)
        with pytest.raises(TypeError, match="head_dim must be a positive int"):
            AttentionSynapse("v", 2, bad)
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        AttentionSynapse("v", 2, 3, beta=0.0)
    with pytest.raises(ValueError, match=r"weight_k has shape \(2, 3, 5\), expected \(heads, head_dim, D\) "
                                         r"= \(2, 3, 6\)"):
        Network({"v": Layer((N, D), lag.layernorm())}, [AttentionSynapse("v", 2, 3, weight_k=torch.zeros(2, 3, 5))])
    with pytest.raises(ValueError, match="token_axis 2 is out of range"):
        Network({"v": Layer((N, D), lag.layernorm())}, [AttentionSynapse("v", 2, 3, token_axis=2)])
