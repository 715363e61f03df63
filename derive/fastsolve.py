"""The fast layers' fixed point x_A = (currents into A)(x, v), every fast layer at once, for the adiabatic limit.

``solve_fast(net, start, visible)`` solves the joint system straight from the network's own currents (it does not
use the nested recursion of ``ReducedField``'s ``"fixed_point"`` solver), in one of two ways:

- ``"anderson"`` (the default): matrix-free, batched over samples. Anderson acceleration (type II, memory ``m``,
  mixing ``beta``) of the damped iteration x <- (1 - beta) x + beta c(x), c the currents into the fast layers;
  memory O(m x state), so a Mixer-S/16-size state (196 x 512) runs.
- ``"newton_krylov"``: Newton's method, batched and matrix-free, each step's linear system solved by GMRES with
  Jacobian-vector products (``torch.func.jvp``); memory O(30 x state);
- ``"newton"``: Newton's method with the dense per-sample Jacobian (``torch.func``), with backtracking so that the
  residual falls at every step. O(state^2) memory: small states only.

The solution is differentiable in v and the weights by the implicit function theorem: ``"newton"`` through one
more Newton step with the Jacobian held, ``"anderson"`` and ``"newton_krylov"`` through a backward hook that
solves the adjoint system g = grad + J^T g by Anderson-accelerated iteration (vector-Jacobian products only). The
default tolerance is dtype-aware: ``tol`` of max |x - c(x)| relative to max(1, max |x|), 1e-12 in float64, 1e-4
in float32 (the currents carry float32 round-off of that order at these sizes). A failure raises
``SlowManifoldError`` naming the layer, the worst sample, the residual reached and what to try.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hopfield import Network

__all__ = ["METHODS", "SlowManifoldError", "anderson", "default_tol", "solve_fast"]

METHODS = ("anderson", "newton_krylov", "newton")

ADVICE = ("try max_iter=..., damping (beta=0.5), solver='newton' on a small state, or check that the fast "
          "subsystem contracts (block.certificate(v)): without a contraction it may have several fixed points or none")


class SlowManifoldError(RuntimeError):
    """The fast layers' fixed point was not found: the message names the layer, sample and residual."""

    def __init__(self, msg: str, layer: str, sample: int, residual: float):
        super().__init__(msg)
        self.layer, self.sample, self.residual = layer, sample, residual


def default_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-4


def anderson(f: Callable[[Tensor], Tensor], x0: Tensor, tol: float, max_iter: int, m: int = 5,
             beta: float = 1.0, lam: float = 1e-8) -> tuple[Tensor, Tensor, int]:
    """Anderson-accelerated fixed-point iteration of ``f`` on a batch of flat states ``x0`` (B, N): returns x,
    each sample's relative residual max |f(x) - x| / max(1, max |x|) at x (B,), and the iterations taken. Stops
    when every sample is below ``tol`` or after ``max_iter`` evaluations of f."""
    B, N = x0.shape
    m = max(1, int(m))
    X = x0.new_zeros(B, m, N)
    Fx = x0.new_zeros(B, m, N)

    def rel(fx, x):
        return (fx - x).abs().amax(1) / x.abs().amax(1).clamp_min(1.0)

    x = x0
    fx = f(x)
    res = rel(fx, x)
    best, best_res, k = x, res, 1
    X[:, 0], Fx[:, 0] = x, fx
    while k < max_iter and float(res.max()) > tol:
        n = min(k, m)
        Xh, Fh = X[:, :n], Fx[:, :n]
        G = Fh - Xh  # residuals of the stored iterates
        H = G @ G.transpose(1, 2) + lam * G.abs().amax((1, 2)).square().clamp_min(1e-30)[:, None, None] * \
            torch.eye(n, dtype=x0.dtype, device=x0.device)
        w = torch.linalg.solve(H, x0.new_ones(B, n, 1))
        alpha = (w / w.sum(1, keepdim=True)).transpose(1, 2)  # weights summing to 1: min || sum alpha_i g_i ||
        x = beta * (alpha @ Fh)[:, 0] + (1 - beta) * (alpha @ Xh)[:, 0]
        fx = f(x)
        res = rel(fx, x)
        better = res < best_res
        best = torch.where(better[:, None], x, best)
        best_res = torch.minimum(best_res, res)
        X[:, k % m], Fx[:, k % m] = x, fx
        k += 1
    return best, best_res, k


def _newton(residual: Callable[[Tensor, Tensor], Tensor], x: Tensor, v: Tensor, tol: float, max_iter: int):
    """Per-sample Newton's method on residual(x, v) = x - c(x, v) with the exact Jacobian and backtracking: a
    step is halved (up to 12 times) until the residual falls; where no halving makes it fall (at the kinks of a
    ReLU, where the Jacobian jumps), that sample takes a plain fixed-point step x <- c(x) instead."""
    jac_fn = torch.func.vmap(torch.func.jacrev(residual))
    res_fn = torch.func.vmap(residual)

    def rel(r, x):
        return r.abs().amax(1) / x.abs().amax(1).clamp_min(1.0)

    r = res_fn(x, v)
    k = 0
    while k < max_iter and float(rel(r, x).max()) > tol:
        step = torch.linalg.solve(jac_fn(x, v), r.unsqueeze(-1)).squeeze(-1)
        t = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        norm = r.norm(dim=1)
        for _ in range(12):
            trial = x - t * step
            r_trial = res_fn(trial, v)
            worse = r_trial.norm(dim=1) > norm * (1 - 1e-4 * t[:, 0])
            if not bool(worse.any()):
                break
            t = torch.where(worse[:, None], 0.5 * t, t)
        if bool(worse.any()):  # no Newton step helps these samples: a fixed-point step x - r = c(x)
            trial = torch.where(worse[:, None], x - r, trial)
            r_trial = res_fn(trial, v)
        x, r = trial, r_trial
        k += 1
    return x, rel(r, x), k


def _gmres(matvec: Callable[[Tensor], Tensor], b: Tensor, m: int, tol: float) -> Tensor:
    """Per sample, the x minimising ||A x - b|| over the Krylov space of dimension ``m`` (one GMRES cycle from 0),
    batched: b (B, N), matvec applies each sample's A to its row."""
    B = b.shape[0]
    beta = b.norm(dim=1)
    V = [b / beta.clamp_min(1e-300)[:, None]]
    Hm = b.new_zeros(B, m + 1, m)
    k = 0
    for k in range(m):
        w = matvec(V[k])
        for i in range(k + 1):  # modified Gram-Schmidt, per sample
            hij = (w * V[i]).sum(1)
            Hm[:, i, k] = hij
            w = w - hij[:, None] * V[i]
        hn = w.norm(dim=1)
        Hm[:, k + 1, k] = hn
        V.append(w / hn.clamp_min(1e-300)[:, None])
        e1 = b.new_zeros(B, k + 2, 1)
        e1[:, 0, 0] = beta
        y = torch.linalg.lstsq(Hm[:, : k + 2, : k + 1], e1).solution
        res = (Hm[:, : k + 2, : k + 1] @ y - e1).norm(dim=(1, 2))
        if float((res / beta.clamp_min(1e-300)).max()) <= tol:
            break
    return (torch.stack(V[: k + 1], dim=2) @ y)[..., 0]


def _newton_krylov(f: Callable[[Tensor], Tensor], x: Tensor, tol: float, max_iter: int, m: int = 30):
    """Newton's method on r(x) = x - f(x), batched and matrix-free: each step solves J d = r by GMRES with
    Jacobian-vector products (``torch.func.jvp``; the samples are independent, so one batched product serves them
    all), then backtracks as ``_newton`` does, a fixed-point step where no halving helps."""
    def res(z):
        return z - f(z)

    def rel(r, z):
        return r.abs().amax(1) / z.abs().amax(1).clamp_min(1.0)

    r = res(x)
    k = 0
    while k < max_iter and float(rel(r, x).max()) > tol:
        step = _gmres(lambda d, x=x: torch.func.jvp(res, (x,), (d,))[1], r, m, 1e-3)
        t = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        norm = r.norm(dim=1)
        for _ in range(12):
            trial = x - t * step
            r_trial = res(trial)
            worse = r_trial.norm(dim=1) > norm * (1 - 1e-4 * t[:, 0])
            if not bool(worse.any()):
                break
            t = torch.where(worse[:, None], 0.5 * t, t)
        if bool(worse.any()):
            trial = torch.where(worse[:, None], x - r, trial)
            r_trial = res(trial)
        x, r = trial, r_trial
        k += 1
    return x, rel(r, x), k


def solve_fast(net: Network, start: dict[str, Tensor], visible: str, *, method: str = "anderson",
               tol: float | None = None, max_iter: int | None = None, m: int = 5, beta: float = 1.0
               ) -> dict[str, Tensor]:
    """Every fast layer's state at the fixed point given the visible state ``start[visible]``, from the initial
    guess ``start`` (the other layers); see the module doc."""
    if method not in METHODS:
        raise ValueError(f"solve_fast: method must be one of {METHODS}, got {method!r}")
    fast = [n for n in net.layers if n != visible]
    shapes = [net.layers[n].shape for n in fast]
    sizes = [net.layers[n].size for n in fast]
    v_in = start[visible]
    v = v_in.detach()
    batch = v.shape[0]
    tol = default_tol(v.dtype) if tol is None else float(tol)
    max_iter = (1000 if method == "anderson" else 50) if max_iter is None else int(max_iter)

    def unflat(flat: Tensor, vis: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, sizes, dim=-1)
        state = {n: p.reshape(p.shape[0], *sh) for n, p, sh in zip(fast, parts, shapes)}
        state[visible] = vis
        return state

    def currents(flat: Tensor, vis: Tensor) -> Tensor:
        cur = net.currents(unflat(flat, vis))
        return torch.cat([cur[n].reshape(flat.shape[0], -1) for n in fast], dim=1)

    def residual(flat1: Tensor, v1: Tensor) -> Tensor:  # one sample, for Newton's Jacobian
        return flat1 - currents(flat1.unsqueeze(0), v1.unsqueeze(0))[0]

    x0 = torch.cat([start[n].detach().reshape(batch, -1) for n in fast], dim=1)
    with torch.no_grad():  # (torch.func's jacrev inside still differentiates)
        if method == "anderson":
            x, res, iters = anderson(lambda z: currents(z, v), x0, tol, max_iter, m=m, beta=beta)
        elif method == "newton_krylov":
            x, res, iters = _newton_krylov(lambda z: currents(z, v), x0, tol, max_iter)
        else:
            x, res, iters = _newton(residual, x0, v, tol, max_iter)
    if not bool(torch.isfinite(res).all()) or float(res.max()) > tol:
        net.check_parameters("the fast layers' fixed point")  # a NaN weight, not the dynamics, is then the cause
        bad = (~torch.isfinite(v.reshape(batch, -1))).any(-1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"the fast layers' fixed point: the visible state of sample(s) {bad[:8]} is not finite "
                             "(NaN or inf)")
        worst = int(torch.nan_to_num(res, nan=float("inf")).argmax())
        with torch.no_grad():
            r = (currents(x[worst:worst + 1], v[worst:worst + 1]) - x[worst:worst + 1])[0]
        per_layer = [float(p.abs().max()) for p in torch.split(r, sizes)]
        layer = fast[max(range(len(fast)), key=lambda i: per_layer[i])]
        raise SlowManifoldError(
            f"the fast layers' fixed point was not found ({method}, {iters} iterations): sample {worst}'s relative "
            f"residual is {float(res[worst]):.3g} > tol {tol:g}, largest in layer {layer!r}; {ADVICE}",
            layer, worst, float(res[worst]))
    on_graph = torch.is_grad_enabled() and (v_in.requires_grad or any(p.requires_grad for p in net.parameters()))
    if on_graph:
        if method == "newton":  # one Newton step with the Jacobian held: the implicit function theorem's gradient
            jac = torch.func.vmap(torch.func.jacrev(residual))(x, v).detach()
            x = x - torch.linalg.solve(jac, (x - currents(x, v_in)).unsqueeze(-1)).squeeze(-1)
        else:
            x = _implicit(lambda z: currents(z, v_in), x, tol, max_iter if method == "anderson" else 1000, m)
    parts = torch.split(x, sizes, dim=1)
    out = {n: p.reshape(batch, *sh) for n, p, sh in zip(fast, parts, shapes)}
    out[visible] = v_in
    return out


def _implicit(f: Callable[[Tensor], Tensor], x_star: Tensor, tol: float, max_iter: int, m: int) -> Tensor:
    """x* re-attached to the graph with the implicit function theorem's gradient: the forward value is f(x*) (one
    more step, equal to x* within tol), and the backward pass turns an incoming gradient g0 into the solution g of
    g = g0 + J^T g (J = df/dx at x*) before it flows into f's inputs (v, the weights)."""
    z = x_star.detach().requires_grad_(True)
    fz = f(z)

    def hook(grad: Tensor | None) -> Tensor | None:
        if grad is None:
            return None

        def adjoint(g: Tensor) -> Tensor:
            vjp = torch.autograd.grad(fz, z, g, retain_graph=True, allow_unused=True)[0]
            return grad if vjp is None else grad + vjp  # None: the currents do not depend on the fast layers

        g, res, iters = anderson(adjoint, grad, tol, max_iter, m=m)
        if float(res.max()) > tol:
            raise SlowManifoldError(f"the adjoint of the fast layers' fixed point did not converge ({iters} "
                                    f"iterations, relative residual {float(res.max()):.3g} > tol {tol:g}); "
                                    f"{ADVICE}", "?", int(res.argmax()), float(res.max()))
        return g

    out = fz.clone() if fz.requires_grad else fz
    if out.requires_grad:
        out.register_hook(hook)
    return out
