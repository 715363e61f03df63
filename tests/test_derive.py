"""The derivation engine: adiabatic limit, discrete-time limit, contraction certificates, explanations.

Equivalence with hand-written modules and timm is in tests/test_equivalence.py.
"""

import math

import pytest
import torch

import derive
from derive import adiabatic, discretize
from hopfield import DenseSynapse, Layer, Network, Synapse, presets
from hopfield import lagrangians as lag


def randomize(module, scale=0.3, seed=0):
    """Random weights far from any initialisation (affine gains around 1, everything else N(0, scale^2))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(1 + scale * noise if name.endswith("affine.weight") else scale * noise)
    return module


def rescale_hidden(net, norm):
    """Synapses between hidden layers to spectral norm ``norm`` (below coeff: soft normalisation is then exact)."""
    with torch.no_grad():
        for syn in net.synapses:
            if "v" in syn.layers:
                continue
            for name in ("weight", "weight_fb"):
                w = getattr(syn, name, None)
                if w is not None:
                    w.mul_(norm / torch.linalg.matrix_norm(w, ord=2))
    return net


def imixer_net(kind="imixer", S=6, C=4, **kw):
    net = derive.block_network(kind, S, C, **kw).double()
    return rescale_hidden(randomize(net), 0.5)


# ------------------------------------------------------------------------------------------ adiabatic limit
def test_tree_is_found_for_chain_and_star():
    f = adiabatic(derive.block_network("limixer", 6, 4, depth=5))
    names = [br.node for br in f.branches]
    assert names == ["x1", "c"]
    chain = [br.node for br in f.branches[0].walk()]
    assert chain == ["x1", "x2", "x3", "x4"]
    assert [br.implicit for br in f.branches[0].walk()] == [True, True, True, False]
    star = adiabatic(derive.block_network("paramixer", 6, 4))
    assert [br.node for br in star.branches] == ["s", "c"] and not any(b.implicit for b in star.branches)


def test_leaf_reduced_field_is_the_mixing_step_eq12():
    """2-layer network: tau_v dv/dt = xi^T GELU(xi LN(v)) - alpha v (iMixer paper Eq. 12)."""
    torch.manual_seed(0)
    net = randomize(presets.mixing(6, 4, 5, axis=-2).double())
    v = torch.randn(3, 6, 4, dtype=torch.float64)
    W = net.synapses[0].weight
    ln = torch.nn.functional.layer_norm(v, (4,), eps=1e-5)
    expected = torch.einsum("th,bhc->btc", W.T, torch.nn.functional.gelu(torch.einsum("ht,btc->bhc", W, ln)))
    for alpha in (0.0, 1.0, 0.3):
        got = adiabatic(net, alpha=alpha)(v)
        assert (got - (expected - alpha * v)).abs().max() < 1e-12


def test_alpha_changes_the_speed_of_ln_v_not_its_path_and_matters_in_discrete_time():
    """With a LayerNorm visible layer the decay -alpha v lies in the Hessian's zero mode (Eq. 13), so at any v the
    velocity of LN(v) does not depend on alpha; but v's scale does, and LN(v) moves at speed ~ 1/scale: the
    flows for alpha = 0 and 1 trace the same path of LN(v) at different speeds. One Euler step is another
    matter: alpha dt = 1 removes the skip connection (v <- dt F(v))."""
    from torchdiffeq import odeint

    torch.manual_seed(0)
    net = randomize(presets.mixing(6, 4, 5, axis=-2, norm_axis=(-2, -1)).double())
    net.layers["v"].lagrangian.eps = 1e-12  # the zero mode is exact as eps -> 0 (Eq. 13)
    v0 = 5 * torch.randn(1, 6, 4, dtype=torch.float64)
    fields = {a: adiabatic(net, alpha=a) for a in (0.0, 1.0)}
    ln = net.layers["v"].activation
    jvp = {a: torch.func.jvp(ln, (v0,), (f(v0),))[1] for a, f in fields.items()}  # d LN(v)/dt at v0
    assert (jvp[0.0] - jvp[1.0]).abs().max() < 1e-9
    # alpha = 0 keeps v's scale, so LN(v) moves slower: a longer horizon, densely sampled, covers the path
    times = {0.0: torch.linspace(0, 40, 4001, dtype=torch.float64), 1.0: torch.linspace(0, 2, 201, dtype=torch.float64)}
    with torch.no_grad():
        paths = {a: ln(odeint(lambda _, v, f=f: f(v), v0, times[a], rtol=1e-10, atol=1e-12)).flatten(1)
                 for a, f in fields.items()}
        at_same_time = (paths[0.0][:201:20] - paths[1.0][::20]).norm(dim=1).max()  # t = 0, 0.2, ... 2 on both
        nearest = torch.cdist(paths[1.0], paths[0.0]).min(dim=1).values.max()  # every point of path 1 -> path 0
        moved = (paths[1.0][-1] - paths[1.0][0]).norm()
    assert moved > 0.5 and at_same_time > 0.3 and nearest < 0.01 * moved, (moved, at_same_time, nearest)
    # discrete time: alpha = 1 with dt = tau_v is the block v <- F(v), no skip; alpha = 0 keeps v
    no_skip, skip = discretize(net, alpha=1.0).double(), discretize(net, alpha=0.0).double()
    assert (no_skip(v0) - fields[0.0].forcing(v0)).abs().max() < 1e-12
    assert (skip(v0) - (v0 + fields[0.0].forcing(v0))).abs().max() < 1e-12
    assert (ln(no_skip(v0)) - ln(skip(v0))).abs().max() > 0.1


def test_layernorm_lagrangian_is_sqrt_n_times_the_papers():
    """The papers' L(v) = sqrt(sum (v - mean)^2) (iMixer Eqs. 8, 10; gradient LN(v)/sqrt(N)); this project's is
    N gamma sqrt(Var v + eps), gradient gamma LN(v): as eps -> 0 exactly sqrt(N) times theirs."""
    v = torch.randn(3, 6, 4, dtype=torch.float64)
    for axis, n in ((-1, 4), ((-2, -1), 24)):
        ours = lag.layernorm(axis=axis, eps=1e-24)  # eps > 0 is required; 1e-24 is 0 at float64 here
        dims = (axis,) if isinstance(axis, int) else axis
        papers = (v - v.mean(dim=[d + v.ndim for d in dims], keepdim=True)).square().sum(dim=dims).sqrt()
        papers = papers.reshape(3, -1).sum(1)  # summed over the groups of a sample
        assert (ours(v) - math.sqrt(n) * papers).abs().max() < 1e-12


def test_slow_manifold_is_a_fixed_point_of_the_fast_layers():
    """On the slow manifold every fast layer has dx/dt = 0 (Eqs. 34-35)."""
    net = imixer_net("limixer", depth=5)
    v = torch.randn(2, 6, 4, dtype=torch.float64)
    state = adiabatic(net).slow_manifold(v)
    vf = net.vector_field(state)
    for name in net.layers:
        if name != "v":
            assert vf[name].abs().max() < 1e-9, name


def test_fixed_point_solve_converges_to_the_newton_solve():
    net = imixer_net()
    v = torch.randn(3, 6, 4, dtype=torch.float64)
    exact = adiabatic(net, solver="newton")(v)
    errs = [(adiabatic(net, solver="fixed_point", n_iter=n)(v) - exact).abs().max().item() for n in (2, 5, 10, 40)]
    assert errs[-1] < 1e-12
    assert all(b < a or b < 1e-14 for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("kind", ["mixing", "imixer"])
@pytest.mark.parametrize("solver", ["newton", "anderson", "newton_krylov"])
def test_reduced_field_solves_have_the_implicit_function_gradient(kind, solver):
    """The Newton and Anderson solves run off the graph; their solution still carries dx*/dv and dx*/dW (implicit
    function theorem: Newton's held-Jacobian step, Anderson's adjoint fixed point): gradcheck in float64, and the
    same gradients as the converged fixed-point solve."""
    net = randomize(presets.mixing(6, 4, 5, axis=-2).double()) if kind == "mixing" else imixer_net()
    v = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    solve, fixed = adiabatic(net, solver=solver), adiabatic(net, solver="fixed_point", n_iter=60)
    assert torch.autograd.gradcheck(solve, (v,))
    w = net.synapses[0].weight
    grads = [torch.autograd.grad((f(v) ** 2).sum(), (v, w)) for f in (solve, fixed)]
    for a, b in zip(*grads):
        assert a.abs().max() > 0.1 and (a - b).abs().max() < 1e-10
    with torch.no_grad():
        assert not solve(v).requires_grad


def relu_chain(norm):
    torch.manual_seed(1)
    net = presets.chain([8, 12, 10, 6], other=(5,), axis=-2).double()  # v, x1, x2, x3
    return rescale_hidden(net, norm)


@pytest.mark.parametrize("case", ["imixer", "limixer5", "star", "relu_chain"])
def test_matrix_free_solve_equals_dense_newton(case):
    """The default (Anderson, matrix-free, batched) solve of the fast layers equals the dense per-sample Newton
    solve (with backtracking) where both run: float64, <= 1e-10."""
    net = {"imixer": lambda: rescale_hidden(randomize(derive.block_network("imixer", 8, 16, h_ratio=2).double()), 0.9),
           "limixer5": lambda: rescale_hidden(randomize(derive.block_network("limixer", 8, 16, depth=5).double()), 0.9),
           "star": lambda: randomize(derive.block_network("paramixer", 8, 16).double()),
           "relu_chain": lambda: relu_chain(0.8)}[case]()
    v = torch.randn(3, *net.layers["v"].shape, dtype=torch.float64)
    with torch.no_grad():
        a, n = adiabatic(net)(v), adiabatic(net, solver="newton")(v)
        k = adiabatic(net, solver="newton_krylov")(v)
    assert adiabatic(net).solver == "anderson" and (a - n).abs().max() <= 1e-10 and (k - n).abs().max() <= 1e-10


def test_float32_default_tolerance_and_failures_that_say_where_and_what_to_try():
    """In float32 the default tolerance is float32's (Newton's old 1e-12 failed here); a fast subsystem that does
    not contract fails with the layer, the worst sample, the residual reached and advice."""
    torch.manual_seed(0)
    net = derive.block_network("imixer", 8, 16)
    v = torch.randn(2, 8, 16)
    for solver in ("anderson", "newton_krylov", "newton"):
        assert torch.isfinite(adiabatic(net, solver=solver)(v)).all()
    strong = rescale_hidden(randomize(derive.block_network("imixer", 8, 16).double()), 6.0)
    with pytest.raises(derive.SlowManifoldError,
                       match=r"sample \d+'s relative residual is .* > tol 1e-12, largest in layer '[xh]'; try") as e:
        adiabatic(strong, max_iter=50)(torch.randn(2, 8, 16, dtype=torch.float64))
    assert e.value.layer in ("x", "h") and e.value.residual > 1e-12
    with pytest.raises(ValueError, match="beta"):
        adiabatic(net, beta=0.0)


@pytest.mark.slow
def test_reduced_field_of_the_mixer_s16_size_imixer_network_runs():
    """196 x 512 visible, h_ratio 2: the matrix-free solve evaluates it, batch 8 in float32 and 2 in float64 (the
    dense Newton solve needs a 794,624^2 Jacobian per sample here)."""
    torch.manual_seed(0)
    for dtype, batch in ((torch.float32, 8), (torch.float64, 2)):
        net = derive.block_network("imixer", 196, 512, h_ratio=2).to(dtype)
        with torch.no_grad():
            f = adiabatic(net)(torch.randn(batch, 196, 512, dtype=dtype))
        assert f.shape == (batch, 196, 512) and torch.isfinite(f).all()


def test_adiabatic_errors_name_the_offending_thing():
    net = presets.star(6, 4)
    with pytest.raises(ValueError, match="unknown visible layer 'w'"):
        adiabatic(net, visible="w")
    with pytest.raises(ValueError, match="neither visible nor fast"):
        adiabatic(net, fast=["s"])
    loop = Network({"v": Layer((4,), lag.layernorm()), "a": Layer((3,), lag.relu(), 0.1),
                    "b": Layer((3,), lag.relu(), 0.1)},
                   [DenseSynapse("v", "a"), DenseSynapse("a", "b"), DenseSynapse("b", "v")])
    with pytest.raises(ValueError, match="closes a loop"):
        adiabatic(loop)

    class Quartic(Synapse):
        layers = ("v", "a")

        def energy(self, g):
            return -(g["v"].sum(-1) * g["a"].sum(-1)) ** 2

    odd = Network({"v": Layer((4,), lag.layernorm()), "a": Layer((3,), lag.relu(), 0.1)}, [Quartic()])
    with pytest.raises(TypeError, match="synapse 'v-a' is a Quartic"):
        adiabatic(odd)
    chain = derive.block_network("limixer", 6, 4, depth=4)
    assert adiabatic(chain).order == ["x1", "c", "x2", "x3"]
    with pytest.raises(ValueError, match="puts layer 'x3' before its parent 'x2'"):
        adiabatic(chain, order=["x1", "x3", "x2", "c"])
    with pytest.raises(ValueError, match="groups"):
        discretize(presets.star(6, 4), splitting="sequential", groups=[["s"]])


# ------------------------------------------------------------------------------------------ discrete limit
@pytest.mark.parametrize("kind", ["mixer", "imixer", "limixer", "paramixer"])
def test_block_parameters_are_the_networks_interaction_matrices(kind):
    block = derive.derived_block(kind, 6, 4)
    assert {id(p) for p in block.parameters()} == {id(p) for p in block.net.parameters()}
    with torch.no_grad():
        block.net.synapses[0].weight.zero_()  # editing the network edits the block
    assert block.branches[0].synapse.weight.abs().max() == 0


def test_tied_network_gives_a_weight_tied_block():
    tied = derive.derived_block("paramixer", 6, 4, form="tied")
    untied = derive.derived_block("paramixer", 6, 4, form="untied")
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 6 * 2 + 4 * 16  # one free feedback matrix per branch: S x T and C x 4C


@pytest.mark.parametrize("kind, depth, n_iter", [("imixer", 3, 60), ("limixer", 4, 40), ("limixer", 5, 22),
                                                 ("paramixer", 2, 1)])
def test_block_is_one_euler_step_of_the_reduced_field(kind, depth, n_iter):
    """(a) block(v) = v + tau_v F^v(v) with dt = tau_v, alpha = 0, the fixed-point iteration run to convergence,
    against Newton's joint solve of all fast layers (float64 <= 1e-10)."""
    net = imixer_net(kind, depth=depth)
    block = discretize(net, n_iter=n_iter, splitting="parallel").double().eval()
    v = torch.randn(3, 6, 4, dtype=torch.float64)
    exact = v + net.layers["v"].tau * adiabatic(net, solver="newton")(v)
    assert (block(v) - exact).abs().max() < 1e-10


def test_dt_and_alpha_enter_as_euler_step():
    net = imixer_net("paramixer")
    v = torch.randn(2, 6, 4, dtype=torch.float64)
    block = discretize(net, dt=0.3, alpha=0.5).double()
    f = adiabatic(net, alpha=0.5)
    assert (block(v) - (v + 0.3 * f(v))).abs().max() < 1e-12


def test_sequential_splitting_is_lie_trotter():
    """sequential = the Euler step of the token branch, then that of the channel branch at the new state."""
    net = imixer_net("imixer")
    v = torch.randn(2, 6, 4, dtype=torch.float64)
    seq = discretize(net, n_iter=3, splitting="sequential").double().eval()
    par = discretize(net, n_iter=3, splitting="parallel").double().eval()
    g = seq.field.act("v", v)
    x_br, c_br = seq.branches
    v1 = v + par.branch_update(x_br, g)
    v2 = v1 + par.branch_update(c_br, par.field.act("v", v1))
    assert (seq(v) - v2).abs().max() < 1e-13
    assert (par(v) - v2).abs().max() > 1e-3  # the two splittings differ


def test_repeated_steps_are_weight_tied_iterations():
    block = randomize(derive.derived_block("paramixer", 6, 4).double())
    twice = derive.derived_block("paramixer", 6, 4, steps=2).double()
    twice.load_state_dict(block.state_dict())
    v = torch.randn(2, 6, 4, dtype=torch.float64)
    assert (twice(v) - block(block(v))).abs().max() < 1e-13


def test_symmetry_breaking_with_zero_term_is_the_tied_block_and_has_a_penalty():
    tied = randomize(derive.derived_block("paramixer", 6, 4, form="tied").double())
    broken = derive.derived_block("paramixer", 6, 4, form="broken").double()
    state = {k: v for k, v in tied.state_dict().items()}
    missing = broken.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == ["net.synapses.0.weight_break", "net.synapses.1.weight_break"]
    v = torch.randn(3, 6, 4, dtype=torch.float64)
    assert torch.equal(broken(v), tied(v))
    assert broken.penalty() == 0
    with torch.no_grad():
        broken.net.synapses[0].weight_break.fill_(0.5)
    assert abs(broken.penalty().item() - 0.25 * 6 * 2) < 1e-12  # W_break of the token synapse: S x T
    assert (broken(v) - tied(v)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ dynamics consistency
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["imixer", "paramixer"])
def test_full_network_velocity_converges_to_reduced_field_as_eps_to_zero(kind):
    """(b) tau_fast / tau_v = eps: after the fast transient the visible velocity of the full network differs from
    the reduced field (alpha = 1, the network's own decay) by O(eps). Seeded: docs/theory.md quotes its errors."""
    torch.manual_seed(0)
    net = imixer_net(kind)
    v0 = torch.randn(2, 6, 4, dtype=torch.float64)
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        layers = {n: Layer(l.shape, l.lagrangian, 1.0 if n == "v" else eps) for n, l in net.layers.items()}
        full = Network(layers, list(net.synapses))
        state = full.init_state(2, scale=0.0, dtype=torch.float64)
        state["v"] = v0
        traj = full.simulate(state, torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5", rtol=1e-10,
                             atol=1e-12, track_energy=False)
        end = traj.final()
        vel = full.vector_field(end)["v"]
        red = adiabatic(full, alpha=1.0)(end["v"])
        errs.append(((vel - red).abs().max() / red.abs().max()).item())
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert errs[-1] < 1e-2
    assert all(4 < r < 25 for r in ratios), (errs, ratios)  # roughly proportional to eps


@pytest.mark.slow
def test_symmetric_star_energy_descends_untied_is_flagged():
    """(c) tied star: its energy never rises along the continuous flow (full network and reduced flow);
    untied: a pseudo-energy, reported with the reason."""
    torch.manual_seed(0)
    tied = randomize(derive.block_network("paramixer", 6, 4, form="tied").double(), scale=0.5)
    with torch.no_grad():
        for syn in tied.synapses:
            syn.affine.weight.fill_(1.0)  # a unit gain keeps the tied synapse energy-exact
    state = tied.init_state(3, dtype=torch.float64)
    traj = tied.simulate(state, torch.linspace(0, 5, 26, dtype=torch.float64), rtol=1e-9, atol=1e-11)
    assert traj.descent.max_rise <= 1e-9
    assert all("gelu" in c for c in traj.descent.caveats)  # only the non-convex hidden Lagrangian is a caveat

    field = adiabatic(tied, alpha=1.0)
    assert field.caveats() == []
    v = torch.randn(3, 6, 4, dtype=torch.float64)
    e = [field.energy(v)]
    for _ in range(200):  # small explicit Euler steps of the reduced flow
        v = v + 0.01 * field(v)
        e.append(field.energy(v))
    e = torch.stack(e)
    assert (e[1:] - e[:-1]).max() <= 1e-10 and (e[0] - e[-1]).min() > 0

    untied = randomize(derive.block_network("paramixer", 6, 4, form="untied").double(), scale=0.5)
    traj = untied.simulate(untied.init_state(3, dtype=torch.float64), torch.linspace(0, 2, 11, dtype=torch.float64))
    assert not traj.descent.guaranteed
    assert any("untied" in c and "pseudo-energy" in c for c in traj.descent.caveats)
    assert any("untied" in c for c in adiabatic(untied).caveats())


def test_caveats_name_each_broken_assumption_and_only_those():
    """Each assumption of the derivation, with a network that breaks it and one that does not."""
    def tiny(vis_lag, tau_h=0.01, form="tied", hidden_norm=None, depth=2):
        layers = {"v": Layer((6, 4), vis_lag, 1.0), "x": Layer((5, 4), lag.gelu(), 0.1)}
        syn = [DenseSynapse("v", "x", axis=-2, form=form)]
        if depth == 3:
            layers["h"] = Layer((7, 4), lag.gelu(), tau_h)
            syn.append(DenseSynapse("x", "h", axis=-2, form=form))
        net = randomize(Network(layers, syn).double(), scale=0.3)
        return rescale_hidden(net, hidden_norm) if hidden_norm else net

    ln = lag.layernorm(axis=-1)
    # a visible layer without LayerNorm's zero mode: alpha must be the network's own (1)
    assert any("no zero mode" in c for c in adiabatic(tiny(lag.tanh()), alpha=0.0).caveats())
    assert not any("no zero mode" in c for c in adiabatic(tiny(lag.tanh()), alpha=1.0).caveats())
    assert not any("no zero mode" in c for c in adiabatic(tiny(ln), alpha=0.0).caveats())
    # a fast layer slower than its parent
    slow = adiabatic(tiny(ln, tau_h=5.0, depth=3, hidden_norm=0.3)).caveats()
    assert any("'h' is not faster than 'x': tau 5 >= 0.1 (ratio 50)" in c for c in slow)
    assert not any("not faster" in c for c in adiabatic(tiny(ln, depth=3, hidden_norm=0.3)).caveats())
    # an implicit solve not certified to contract: several fast fixed points may exist
    strong = adiabatic(tiny(ln, depth=3, hidden_norm=2.0))
    v = torch.randn(2, 6, 4, dtype=torch.float64)
    c = [c for c in strong.caveats(v) if "not certified to contract" in c]
    assert len(c) == 1 and "Lip(F^x) <= 5.1" in c[0] and "measured rate" in c[0]
    assert not any("contract" in c for c in adiabatic(tiny(ln, depth=3, hidden_norm=0.3)).caveats(v))
    # untied synapses: a pseudo-energy
    assert any("pseudo-energy" in c for c in adiabatic(tiny(ln, form="untied")).caveats())
    assert adiabatic(tiny(ln), alpha=1.0).caveats() == []
    # a derived block judges the contraction by its own (spectrally normalised) matrices
    block = derive.derived_block("imixer", 8, 6, h_ratio=2)
    assert any("'x': its solve is not certified to contract (Lip(F^x) <= 1.03" in c for c in block.caveats())
    block.set_coeff(0.85)
    assert not any("contract" in c for c in block.caveats())


def _equal_fast_taus(net, tau=0.1):
    return Network({n: Layer(L.shape, L.lagrangian, L.tau if n == "v" else tau) for n, L in net.layers.items()},
                   list(net.synapses))


def test_verify_reports_the_limit_on_a_well_posed_network_and_the_failure_on_one_that_is_not(tmp_path):
    """derive.verify: on a contracting iMixer network the visible velocity approaches the reduced field in
    proportion to eps, and a block iterated to convergence is one (split) Euler step of it; on a network whose
    fast subsystem does not contract the report fails and says why."""
    torch.manual_seed(0)
    net = _equal_fast_taus(imixer_net("imixer"))
    block = discretize(net, n_iter=40, splitting="sequential")
    report = derive.verify(net, block=block, path=tmp_path / "verify.png")
    assert report.ok, str(report)
    assert 0.8 < report.slope < 1.2 and report.velocity_error[-1] < 1e-3
    assert report.block_error < 1e-10 and (tmp_path / "verify.png").stat().st_size > 0
    assert "| 0.001 |" in str(report) and "is the network's adiabatic limit here" in str(report)
    few = derive.verify(net, eps=(1e-2,), block=discretize(net, n_iter=1, splitting="sequential"))
    assert few.block_error > 1e-5 and few.slope is None  # one fixed-point iteration is not the limit

    bad = _equal_fast_taus(rescale_hidden(randomize(derive.block_network("imixer", 6, 4, h_ratio=2).double()), 3.0))
    report = derive.verify(bad, eps=(1e-1, 1e-2))
    assert not report.ok and "NOT shown" in str(report)
    assert "fixed point was not found" in report.failure
    assert any("not certified to contract" in c for c in report.caveats)


# ------------------------------------------------------------------------------------------ contraction certificate
def test_paper_setting_is_not_certified_and_a_certified_coeff_is_found():
    block = derive.derived_block("imixer", 8, 6, h_ratio=2).double()
    randomize(block, scale=2.0)  # big weights: soft normalisation caps them at coeff
    block.train()
    v = torch.randn(2, 8, 6, dtype=torch.float64)
    for _ in range(20):  # converge the power iteration
        block(v)
    (cert,) = block.certificate()
    gelu = lag.gelu().lipschitz
    assert abs(gelu - 1.1289) < 1e-4
    assert abs(cert.lipschitz_bound - (0.9 * gelu) ** 2) < 1e-6  # 1.032 > 1: the paper's setting
    assert not cert.certified and "NOT certified" in str(cert)
    c = block.certified_coeff()
    assert abs(c - 1 / gelu) < 1e-9
    block.set_coeff(0.95 * c)
    for _ in range(20):
        block(v)
    block.eval()
    (cert,) = block.certificate(v)
    assert cert.certified and cert.lipschitz_bound < 0.91
    assert cert.ratios and max(cert.ratios) < cert.lipschitz_bound  # measured contraction within the bound


@pytest.mark.parametrize("train", [True, False])
def test_certificate_describes_the_next_forward_and_leaves_the_block_as_it_was(train):
    """In train mode the bound uses the power iteration the next forward runs; the measuring forward of
    ``certificate(v)`` does not advance the stored power-iteration vectors (a diagnostic must not change training)."""
    torch.manual_seed(0)  # the power iteration's random start
    block = derive.derived_block("imixer", 8, 6, h_ratio=2).double()
    randomize(block, scale=2.0)
    block.train(train)
    v = torch.randn(2, 8, 6, dtype=torch.float64)
    before = {k: b.clone() for k, b in block.named_buffers()}
    (cert,) = block.certificate(v)
    assert cert.ratios and all(torch.equal(b, before[k]) for k, b in block.named_buffers())
    block(v)  # the forward the certificate described
    block.eval()
    (after,) = block.certificate()
    assert abs(cert.lipschitz_bound - after.lipschitz_bound) < 1e-4  # the forward runs more power steps


def test_certificate_without_spectral_norm_and_with_batchnorm():
    """inner_norm "none": the bound is the product of the exact matrix norms and GELU's slope; "batch": each
    eval-mode BatchNorm multiplies it by its gain max |gamma| / sqrt(running_var + eps). ``n_iter`` measures the
    contraction over more iterations than the block takes, and leaves every buffer (BatchNorm statistics) as it was."""
    s = lag.gelu().lipschitz
    block = randomize(derive.derived_block("imixer", 8, 6, h_ratio=2, n_iter=1, inner_norm="none").double())
    syn = block.net.synapses[1]
    norms = [float(torch.linalg.matrix_norm(w.detach(), ord=2)) for w in (syn.weight, syn.feedback_weight())]
    (cert,) = block.certificate()
    assert abs(cert.lipschitz_bound - norms[0] * norms[1] * s * s) < 1e-9
    v = torch.randn(3, 8, 6, dtype=torch.float64)
    (cert,) = block.eval().certificate(v)
    assert cert.ratios == []  # one iteration: no ratio to measure
    (cert,) = block.certificate(v, n_iter=6)
    assert cert.n_iter == 6 and len(cert.ratios) == 5 and block.field.n_iter == 1

    bn = randomize(derive.derived_block("imixer", 8, 6, h_ratio=2, n_iter=2, inner_norm="batch").double())
    with torch.no_grad():
        for m in bn.batch_norm.values():
            m.weight.fill_(1.0)
            m.running_var.fill_(4.0 - m.eps)  # gain 1/2 each
    syn = bn.net.synapses[1]
    norms = [float(torch.linalg.matrix_norm(w.detach(), ord=2)) for w in (syn.weight, syn.feedback_weight())]
    (cert,) = bn.certificate()
    assert abs(cert.lipschitz_bound - norms[0] * norms[1] * s * s / 4) < 1e-9
    before = {k: b.clone() for k, b in bn.named_buffers()}
    (cert,) = bn.train().certificate(v, n_iter=5)
    assert len(cert.ratios) == 4 and all(torch.equal(b, before[k]) for k, b in bn.named_buffers())
    with pytest.raises(ValueError, match="n_iter"):
        bn.certificate(v, n_iter=-1)
    with pytest.raises(ValueError, match="inner_norm"):
        derive.derived_block("imixer", 8, 6, inner_norm="layer")
    with pytest.raises(ValueError, match="inner_norm does not apply"):
        derive.derived_block("mixer", 8, 6, inner_norm="batch")


def test_nested_certificate_composes_inverses():
    block = derive.derived_block("limixer", 8, 6, depth=4).double()
    certs = {c.layer: c for c in block.certificate()}
    assert set(certs) == {"x1", "x2"}
    c = block.certified_coeff()
    s = lag.gelu().lipschitz
    inner = (c * s) ** 2
    assert abs((c * s) ** 2 / (1 - inner) - 1) < 1e-6  # Lip(F^x1) = (c s)^2 / (1 - (c s)^2) at the limit
    assert math.isfinite(c) and c < 1 / s


# ------------------------------------------------------------------------------------------ explanation
def test_block_explains_its_update_rule():
    block = derive.derived_block("imixer", 8, 6)
    text = block.explain()
    assert "v <- " in text.splitlines()[0] and "FPA_2^x(" in text and "GELU(" in text and "LN(v)" in text
    assert "F^x(x) = " in text and "soft spectral norm <= 0.9" in text
    assert "Affine^(x,v)(LN(v))" in text  # the folded LayerNorm affine
    tex = block.explain(latex=True)
    assert r"\operatorname{FPA}^{x}_{2}" in tex and r"\xi^{(v,x)}" in tex and r"\leftarrow" in tex
    para = derive.derived_block("paramixer", 8, 6, form="tied")
    lines = para.explain().splitlines()
    assert lines[0].count("GELU") == 2  # one parallel step: both branches in one line
    assert "tied" in para.explain()
    two = derive.derived_block("mixer", 8, 6).explain().splitlines()
    assert two[0].startswith("v <- ") and two[1].startswith("v <- ")  # sequential: two sub-steps
    assert "xi^(v,x)" in repr(block)
