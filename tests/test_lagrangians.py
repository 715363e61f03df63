"""Every Lagrangian: closed-form activation = autograd gradient, Hessian products, convexity claims."""

import re

import numpy as np
import pytest
import sympy
import torch
import torch.nn.functional as F

from hopfield import lagrangians as lag

# name -> (Lagrangian, layer shape, input scale used for the "large magnitude" draw)
CASES = {
    "identity": (lag.identity(), (5, 7), 1e3),
    "relu": (lag.relu(), (5, 7), 1e3),
    "repu3": (lag.repu(3), (5, 7), 1e2),
    "repu2.5": (lag.repu(2.5), (5, 7), 1e2),
    "exp": (lag.exp(0.5), (5, 7), 20.0),
    "tanh": (lag.tanh(), (5, 7), 1e3),
    "tanh_beta": (lag.tanh(2.0), (5, 7), 1e3),
    "sigmoid": (lag.sigmoid(), (5, 7), 1e3),
    "softmax": (lag.softmax(beta=1.5, axis=-1), (5, 7), 1e2),
    "softmax_tokens": (lag.softmax(axis=-2), (5, 7), 1e2),
    "softmax_both": (lag.softmax(axis=(0, 1)), (5, 7), 1e2),
    "layernorm": (lag.layernorm(gamma=1.3, axis=-1), (5, 7), 1e3),
    "layernorm_delta": (lag.layernorm(delta=torch.linspace(-1, 1, 7)), (5, 7), 1e3),
    "layernorm_tokens": (lag.layernorm(axis=0), (5, 7), 1e3),
    "layernorm_matrix": (lag.layernorm(axis=(-2, -1), eps=1e-6), (5, 7), 1e3),
    "spherical": (lag.spherical(gamma=0.7, axis=-1), (5, 7), 1e3),
    "gelu": (lag.gelu(), (5, 7), 30.0),
    "symbolic_logcosh": (lag.symbolic("log(cosh(x))"), (5, 7), 30.0),
}


def _draw(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((3, *shape), generator=g, dtype=torch.float64) * scale


def _autograd_activation(L, x):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(L(x).sum(), x)
    return grad


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("scale_kind", ["unit", "large"])
def test_activation_is_gradient_of_lagrangian(name, scale_kind):
    L, shape, big = CASES[name]
    x = _draw(shape, 1.0 if scale_kind == "unit" else big, seed=1)
    want = _autograd_activation(L, x)
    got = L.activation(x)
    assert L(x).shape == (3,)
    assert got.shape == x.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-9 * max(1.0, want.abs().max().item()), f"{name}: max-abs error {err:.3g}"


@pytest.mark.parametrize("name", CASES)
def test_hessian_vector_product_matches_autograd(name):
    L, shape, _ = CASES[name]
    x = _draw(shape, 1.5, seed=2)
    v = _draw(shape, 1.0, seed=3)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(L(xg).sum(), xg, create_graph=True)
    (want,) = torch.autograd.grad((g * v).sum(), xg)
    got = L.hvp(x, v)
    assert (got - want).abs().max().item() <= 1e-10 * max(1.0, want.abs().max().item())


def test_layernorm_activation_is_torch_layer_norm():
    x = _draw((6, 9), 3.0, seed=4)
    assert (lag.layernorm(eps=1e-5).activation(x) - F.layer_norm(x, (9,), eps=1e-5)).abs().max() < 1e-12
    assert (lag.layernorm(axis=(-2, -1), eps=1e-6).activation(x)
            - F.layer_norm(x, (6, 9), eps=1e-6)).abs().max() < 1e-12
    # over the token axis: torch's layer_norm on the transposed state
    want = F.layer_norm(x.transpose(1, 2), (6,), eps=1e-5).transpose(1, 2)
    assert (lag.layernorm(axis=-2).activation(x) - want).abs().max() < 1e-12


def test_gelu_activation_is_torch_gelu_float32():
    x = torch.randn(4, 1000) * 5
    assert (lag.gelu().activation(x) - torch.nn.GELU()(x)).abs().max().item() <= 1e-6
    # and the Lagrangian's derivative is the exact (erf) GELU, not the tanh approximation
    x64 = torch.linspace(-8, 8, 4001, dtype=torch.float64)[None]
    grad = _autograd_activation(lag.gelu(), x64)
    assert (grad - F.gelu(x64)).abs().max().item() < 1e-12
    assert (grad - F.gelu(x64, approximate="tanh")).abs().max().item() > 1e-4


def test_gelu_lagrangian_tail_is_accurate():
    # Phi(x) -> 1/4 as x -> -inf; the naive formula cancels catastrophically there
    x = torch.tensor([[-40.0, -12.0, 0.0]], dtype=torch.float64)
    phi = lag.gelu().phi(x)
    assert abs(phi[0, 0].item() - 0.25) < 1e-15
    assert phi[0, 2].item() == 0.0


def test_softmax_activation_is_torch_softmax():
    x = _draw((4, 6), 5.0, seed=5)
    assert (lag.softmax(beta=2.0, axis=-1).activation(x) - torch.softmax(2.0 * x, -1)).abs().max() < 1e-15
    assert (lag.softmax(axis=-2).activation(x) - torch.softmax(x, -2)).abs().max() < 1e-15


CONVEX = [n for n in CASES if n != "gelu"]


def _hessian_eigenvalues(L, x):
    """Eigenvalues of the full Hessian of L at one sample x (unbatched shape)."""
    flat = x.reshape(-1)
    h = torch.autograd.functional.hessian(lambda z: L(z.reshape(1, *x.shape)).sum(), flat)
    return torch.linalg.eigvalsh(h)


@pytest.mark.parametrize("name", CONVEX)
def test_convex_lagrangians_have_psd_hessians(name):
    L, shape, _ = CASES[name]
    assert L.convex
    for seed in range(5):
        x = _draw(shape, 2.0, seed=10 + seed)[0]
        ev = _hessian_eigenvalues(L, x)
        assert ev.min().item() >= -1e-10 * max(1.0, ev.abs().max().item()), f"{name}: {ev.min().item()}"


def test_gelu_is_flagged_non_convex_and_its_hessian_says_why():
    L = lag.gelu()
    assert not L.convex and "-0.75" in L.caveat
    assert _hessian_eigenvalues(L, torch.full((3,), -1.5, dtype=torch.float64)).min() < 0
    assert _hessian_eigenvalues(L, torch.full((3,), -0.5, dtype=torch.float64)).min() > 0
    # the sign change sits at -0.7518
    c = L.curvature(torch.tensor([-0.7519, -0.7517], dtype=torch.float64))
    assert c[0] < 0 < c[1]


def test_layernorm_hessian_has_the_zero_mode_of_eq13():
    # sum_j M_ij (v_j - mean) = 0 for eps = 0; with eps > 0 it is gamma * LN(v)_i * eps / (Var + eps)
    x = _draw((1, 8), 1.0, seed=6)
    centred = x - x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    for eps in (1e-5, 1e-14):
        L = lag.layernorm(gamma=2.0, axis=-1, eps=eps)
        want = 2.0 * F.layer_norm(x, (8,), eps=eps) * eps / (var + eps)
        assert (L.hvp(x, centred) - want).abs().max() < 1e-14
    assert L.hvp(x, centred).abs().max() < 1e-12
    assert L.hvp(x, torch.ones_like(x)).abs().max() < 1e-12


def test_symbolic_lagrangian_matches_closed_form_and_decides_convexity():
    x = _draw((4, 5), 3.0, seed=7)
    sym = lag.symbolic("log(cosh(x))")
    assert (sym.activation(x) - torch.tanh(x)).abs().max() < 1e-12
    assert (sym(x) - lag.tanh()(x)).abs().max() < 1e-10
    assert sym.convex
    quartic = lag.symbolic(sympy.Symbol("u") ** 4 / 4)
    assert quartic.convex and (quartic.activation(x) - x**3).abs().max() < 1e-9
    cubic = lag.symbolic("x**3/3")
    assert not cubic.convex and "negative" in cubic.caveat
    # the GELU Lagrangian written symbolically: sympy derives GELU itself
    z = sympy.Symbol("z")
    phi = (z**2 + (z**2 - 1) * sympy.erf(z / sympy.sqrt(2)) + z * sympy.sqrt(2 / sympy.pi)
           * sympy.exp(-(z**2) / 2)) / 4
    sg = lag.symbolic(phi, convex=False)
    assert (sg.activation(x) - F.gelu(x)).abs().max() < 1e-12


def test_symbolic_convexity_is_decided_by_sympy_not_by_a_grid():
    # phi'' = 2 - exp(x - 60) < 0 only beyond x = 60 + ln 2, outside any finite grid of [-50, 50]
    late = lag.symbolic("x**2 - exp(x - 60)")
    assert not late.convex
    assert late.negative_set == sympy.Interval.open(60 + sympy.log(2), sympy.oo)
    assert "log(2) + 60" in late.caveat
    assert late.symbol == "phi'" and late.var == sympy.Symbol("x", real=True)  # display name and (real) variable apart
    assert lag.symbolic("x**2/2 + exp(x - 60)").convex
    # sympy leaves phi'' = GELU'(z) < 0 unsolved (a ConditionSet): the grid decides, and finds z < -0.75
    z = sympy.Symbol("z")
    gelu_phi = (z**2 + (z**2 - 1) * sympy.erf(z / sympy.sqrt(2)) + z * sympy.sqrt(2 / sympy.pi)
                * sympy.exp(-(z**2) / 2)) / 4
    undecided = lag.symbolic(gelu_phi)
    assert not undecided.convex and undecided.negative_set is None


def test_repu_refuses_an_unbounded_curvature_and_has_finite_derivatives():
    # 1 < n < 2: phi'' = (n-1) x^(n-2) -> inf as x -> 0+; it gave NaN at x <= 0 (0^(n-2) * 0) before
    with pytest.raises(ValueError, match=r"n >= 2, got n=1.5.*unbounded"):
        lag.repu(1.5)
    x = torch.tensor([[-1.0, 0.0, 2.0]], dtype=torch.float64)
    v = torch.ones_like(x)
    for n in (2.0, 2.5, 3.0):
        L = lag.repu(n)
        hvp = L.hvp(x, v)
        assert (hvp[0, :2] == 0).all()  # exactly 0 at x <= 0
        # (n - 1) x^(n-2) at x > 0, to round-off: torch's pow and Python's can differ in the last bit
        assert abs(float(hvp[0, 2]) - (n - 1) * 2.0 ** (n - 2)) <= 4 * torch.finfo(torch.float64).eps * 2.0 ** n
        # third derivatives too: forward mode through 0^(n-2) used to give NaN at x <= 0 for 2 < n < 3
        third = torch.func.jvp(L.curvature, (x,), (v,))[1]
        assert torch.isfinite(third).all() and (third[0, :2] == 0).all()
        assert torch.isclose(third[0, 2], torch.tensor((n - 1) * (n - 2) * 2.0 ** (n - 3), dtype=torch.float64))
        hess = torch.func.jacfwd(torch.func.jacfwd(L.activation))(x)
        assert torch.isfinite(hess).all()


def test_bad_lagrangian_arguments_are_named():
    with pytest.raises(ValueError, match="scalar"):
        lag.layernorm(gamma=torch.ones(4))
    with pytest.raises(ValueError, match="n >= 2, got n=1"):
        lag.repu(1)
    with pytest.raises(ValueError, match="exactly one free symbol"):
        lag.symbolic("x*y")
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        lag.softmax(axis=2).activation(torch.zeros(3, 4, 5))


@pytest.mark.parametrize("make, where", [
    (lambda v: lag.softmax(beta=v), "softmax(beta)"), (lambda v: lag.exp(beta=v), "exp(beta)"),
    (lambda v: lag.tanh(beta=v), "tanh(beta)"), (lambda v: lag.sigmoid(beta=v), "sigmoid(beta)"),
    (lambda v: lag.repu(v), "repu(n)"), (lambda v: lag.layernorm(eps=v), "layernorm(eps)"),
    (lambda v: lag.layernorm(gamma=v), "layernorm(gamma)"), (lambda v: lag.spherical(eps=v), "spherical(eps)"),
    (lambda v: lag.spherical(gamma=v), "spherical(gamma)"),
])
def test_a_parameter_that_is_not_a_finite_number_is_named(make, where):
    """A string, None, a bool, NaN or infinity as a Lagrangian's parameter is a ValueError naming the parameter
    (where it was a TypeError from a comparison inside, or, for infinity, a Lagrangian with an infinite slope)."""
    for bad in ("x", None, True, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=re.escape(where) + " must be a finite number"):
            make(bad)
    assert make(np.float32(2.0)) is not None  # numpy scalars are numbers


def test_axis_and_delta_of_the_wrong_type_are_named():
    for make, where in ((lambda: lag.softmax(axis="a"), "softmax(axis)"),
                        (lambda: lag.layernorm(axis=()), "layernorm(axis)"),
                        (lambda: lag.spherical(axis=[0, 1.5]), "spherical(axis)"),
                        (lambda: lag.layernorm(delta="x"), "layernorm(delta)"),
                        (lambda: lag.spherical(delta=float("nan")), "spherical(delta)")):
        with pytest.raises(ValueError, match=re.escape(where)):
            make()
    assert lag.layernorm(axis=[-2, -1], delta=torch.zeros(3)).axis == [-2, -1]


def test_symbolic_lagrangians_need_two_derivatives_take_real_symbols_and_state_periodic_caveats():
    """A kink (Abs, a rectifier written with Max) is refused with the reason; a symbol not declared real is
    treated as real; a periodic phi'' states its negative set for every period."""
    for expr in ("Abs(x)", "Max(x, 0)**2/2"):
        with pytest.raises(ValueError, match=r"phi must be twice differentiable .* Dirac delta"):
            lag.symbolic(expr)
    with pytest.raises(ValueError, match="not an expression sympy can read"):
        lag.symbolic("x**")
    x = sympy.Symbol("x")  # not declared real
    L = lag.symbolic(x**2 / 2 + sympy.cos(x) / 4, symbol=x)
    v = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(L.activation(v), v - torch.sin(v) / 4)
    caveat = lag.symbolic("cos(x)").caveat
    assert "+ 2*pi*k for every integer k" in caveat
