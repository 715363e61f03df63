"""JAX/HAMUX side of the side-by-side CPU benchmark of a three-layer hierarchical Hopfield network.

Run inside the separate environment made by ``benchmarks/setup_hamux.sh``::

    .venv-hamux/bin/python benchmarks/hamux_side.py --npz IN.npz --out OUT.json
    .venv-hamux/bin/python benchmarks/hamux_side.py --make-npz IN.npz    # random test problem

The network is built from hamux's own pieces (``hamux`` 0.2.2): three ``NeuronLayer``s with hamux
Lagrangians, two hypersynapses and a ``HAM`` that is ``vectorize()``-d over the batch. Every state has a
(token, channel) shape:

- ``v`` (196, 512): ``lagr_layernorm`` over the last axis (per token over 512 channels), gamma=1,
  delta=0, eps=1e-5; L = sum_tokens D * gamma * sqrt(Var(x_row) + eps), D = 512.
- ``x`` (256, 512): ``lagr_relu``; L = 1/2 sum relu(x)^2.
- ``h`` (512, 512): ``lagr_softmax`` over axis -2 (the 512 hidden units, per channel column), beta=1;
  hamux returns one logsumexp per column, which is summed here to make the scalar L.
- synapses v-x (W_vx, (256, 196)) and x-h (W_xh, (512, 256)) mix along the token axis and are shared
  over channels: E = -sum_{j,i,c} g_post[j, c] W[j, i] g_pre[i, c]. hamux's ``LinearSynapse`` contracts
  the last axis only, so ``TokenMixSynapse`` below is a hypersynapse written the way hamux intends
  (an equinox module mapping the activations of its layers to a scalar energy).

Energy per sample (hamux's HAM energy): sum_A [<x_A, g_A> - L_A(x_A)] + synapse energies, g_A = dL_A/dx_A.
Dynamics: tau_A dx_A/dt = -dE/dg_A (= currents into A minus x_A), integrated with classic fixed-step RK4,
one step per interval of the given time grid, inside ``jax.lax.scan`` under ``jax.jit``. float32, CPU.

The input npz holds W_vx (256, 196), W_xh (512, 256), x0_v (B, 196, 512), x0_x (B, 256, 512),
x0_h (B, 512, 512), taus (3,) in the order v, x, h, and t (N+1,) starting at 0, all float32.
"""

from __future__ import annotations

import os

# CPU only, float32 only; set before jax is imported so no other backend is initialised.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import contextlib
import functools as ft
import importlib.metadata
import io
import json
import platform
import resource
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")

import hamux as hmx  # noqa: E402

LAYERS = ("v", "x", "h")
CHANNELS = 512


class TokenMixSynapse(eqx.Module):
    """Linear hypersynapse between two (token, channel) layers, mixing along the token axis (-2).

    E(g_pre, g_post) = -sum_{j,i,c} g_post[j, c] W[j, i] g_pre[i, c], with W of shape
    (n_post_tokens, n_pre_tokens); the same W acts on every channel. Works on single samples (the
    vectorized HAM vmaps over the batch) and returns a scalar energy.
    """

    W: jax.Array

    def __call__(self, g_pre: jax.Array, g_post: jax.Array) -> jax.Array:
        return -jnp.einsum("...jc,ji,...ic->...", g_post, self.W, g_pre)


def lagr_softmax_columns(x: jax.Array, beta: float = 1.0) -> jax.Array:
    """hamux's softmax Lagrangian over axis -2, summed over the columns to make the scalar L.

    ``hmx.lagr_softmax`` returns 1/beta * logsumexp(beta * x, axis) without reducing the remaining axes
    (one value per column here), which ``jax.grad`` in ``NeuronLayer.activations`` cannot take.
    """
    return hmx.lagr_softmax(x, beta=beta, axis=-2).sum()


def build_ham(W_vx: np.ndarray, W_xh: np.ndarray, channels: int = CHANNELS) -> hmx.VectorizedHAM:
    """The three-layer HAM, vectorized over the batch (leading axis of every state)."""
    n_v, n_x, n_h = W_vx.shape[1], W_vx.shape[0], W_xh.shape[0]
    assert W_xh.shape[1] == n_x, (W_vx.shape, W_xh.shape)
    # NeuronLayer.__post_init__ in hamux 0.2.2 prints "Post init" for every layer; keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        neurons = {
            "v": hmx.NeuronLayer(
                lagrangian=ft.partial(hmx.lagr_layernorm, gamma=1.0, delta=0.0, axis=-1, eps=1e-5),
                shape=(n_v, channels),
            ),
            "x": hmx.NeuronLayer(lagrangian=hmx.lagr_relu, shape=(n_x, channels)),
            "h": hmx.NeuronLayer(
                lagrangian=ft.partial(lagr_softmax_columns, beta=1.0), shape=(n_h, channels)
            ),
        }
    hypersynapses = {
        "vx": TokenMixSynapse(W=jnp.asarray(W_vx, jnp.float32)),
        "xh": TokenMixSynapse(W=jnp.asarray(W_xh, jnp.float32)),
    }
    connections = [(("v", "x"), "vx"), (("x", "h"), "xh")]
    return hmx.HAM(neurons=neurons, hypersynapses=hypersynapses, connections=connections).vectorize()


def energy(ham, xs):
    """Total HAM energy per sample, (B,)."""
    return ham.energy(ham.activations(xs), xs)


def vector_field(ham, taus, xs, return_energy=False):
    """dx_A/dt = -dE/dg_A / tau_A for every layer (optionally with the energy per sample at xs)."""
    xhats = ham.activations(xs)
    if return_energy:
        E, dE = ham.dEdact(xhats, xs, return_energy=True)
    else:
        E, dE = None, ham.dEdact(xhats, xs)
    dx = {k: -dE[k] / taus[k] for k in xs}
    return (dx, E) if return_energy else dx


def _axpy(a, x, y):
    return jtu.tree_map(lambda xi, yi: yi + a * xi, x, y)


def rk4_step(f, x, dt, k1=None):
    if k1 is None:
        k1 = f(x)
    k2 = f(_axpy(0.5 * dt, k1, x))
    k3 = f(_axpy(0.5 * dt, k2, x))
    k4 = f(_axpy(dt, k3, x))
    return jtu.tree_map(lambda xi, a, b, c, d: xi + dt / 6.0 * (a + 2.0 * b + 2.0 * c + d), x, k1, k2, k3, k4)


def make_functions(static):
    """Jitted functions of (params, ...) where params = the HAM's arrays and the taus."""

    def unpack(params):
        return eqx.combine(params["ham"], static), params["taus"]

    @jax.jit
    def energy_fn(params, xs):
        ham, _ = unpack(params)
        return energy(ham, xs)

    @jax.jit
    def vf_fn(params, xs):
        ham, taus = unpack(params)
        return vector_field(ham, taus, xs)

    @jax.jit
    def solve_final(params, x0, dts):
        """RK4 over the grid, keeping only the state at the final time."""
        ham, taus = unpack(params)
        f = ft.partial(vector_field, ham, taus)

        def step(x, dt):
            return rk4_step(f, x, dt), None

        xT, _ = jax.lax.scan(step, x0, dts)
        return xT

    @jax.jit
    def solve_traj(params, x0, dts):
        """RK4 over the grid, recording the states and the energy per sample at every grid point.

        The energy at each new grid point is a separate hamux energy evaluation of the recorded state.
        """
        ham, taus = unpack(params)
        f = ft.partial(vector_field, ham, taus)

        def step(x, dt):
            x_next = rk4_step(f, x, dt)
            return x_next, (x_next, energy(ham, x_next))

        _, (xs, Es) = jax.lax.scan(step, x0, dts)
        traj = jtu.tree_map(lambda a, b: jnp.concatenate([a[None], b], axis=0), x0, xs)
        return traj, jnp.concatenate([energy(ham, x0)[None], Es], axis=0)

    @jax.jit
    def solve_traj_fused(params, x0, dts):
        """Same records as ``solve_traj``, but the energy at x_n comes with the first RK4 stage
        (``dEdact(..., return_energy=True)``, a value_and_grad), so only the last point costs extra."""
        ham, taus = unpack(params)
        f = ft.partial(vector_field, ham, taus)

        def step(x, dt):
            k1, E = vector_field(ham, taus, x, return_energy=True)
            x_next = rk4_step(f, x, dt, k1=k1)
            return x_next, (x_next, E)

        xT, (xs, Es) = jax.lax.scan(step, x0, dts)
        traj = jtu.tree_map(lambda a, b: jnp.concatenate([a[None], b], axis=0), x0, xs)
        return traj, jnp.concatenate([Es, energy(ham, xT)[None]], axis=0)

    return energy_fn, vf_fn, solve_final, solve_traj, solve_traj_fused


def _block(tree):
    return jtu.tree_map(lambda a: a.block_until_ready(), tree)


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy_seconds():
    """CPU seconds spent busy by the whole machine (all processes, all cores) so far, or None."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def time_best(fn, *args, repeats=3, inner=1):
    """Time `repeats` runs of `inner` calls each (the caller has warmed up). Returns a dict with the best
    wall time and, for every repeat, its wall time, the cores this process kept busy (its CPU time over
    wall time) and the cores other processes on the machine kept busy meanwhile (a shared machine skews
    timings); cpu_util and other_processes_cores are those of the best repeat."""
    walls, owns, others = [], [], []
    for _ in range(repeats):
        t0, cpu0, busy0 = time.perf_counter(), _cpu_seconds(), _machine_busy_seconds()
        for _ in range(inner):
            out = fn(*args)
        _block(out)
        wall = time.perf_counter() - t0
        own = (_cpu_seconds() - cpu0) / wall
        busy1 = _machine_busy_seconds()
        walls.append(wall)
        owns.append(own)
        others.append(None if busy0 is None or busy1 is None else max((busy1 - busy0) / wall - own, 0.0))
        del out
    i = min(range(repeats), key=walls.__getitem__)
    return {
        "best_s": walls[i],
        "cpu_util": owns[i],
        "other_processes_cores": others[i],
        "repeats_s": walls,
        "cpu_util_per_repeat": owns,
        "other_processes_cores_per_repeat": others,
    }


def _load_str(tm) -> str:
    other = tm["other_processes_cores"]
    other_s = "?" if other is None else f"{other:.2f}"
    return f"[cores busy: this process {tm['cpu_util']:.2f}, others {other_s}]"


def make_test_npz(path: str, seed: int = 0, batch: int = 8) -> None:
    """Random test problem: weights ~ N(0, 1/fan_in), states ~ N(0, 1), t = linspace(0, 10, 101)."""
    rng = np.random.default_rng(seed)
    n_v, n_x, n_h, c = 196, 256, 512, CHANNELS
    f32 = np.float32
    np.savez(
        path,
        W_vx=(rng.standard_normal((n_x, n_v)) / np.sqrt(n_v)).astype(f32),
        W_xh=(rng.standard_normal((n_h, n_x)) / np.sqrt(n_x)).astype(f32),
        x0_v=rng.standard_normal((batch, n_v, c)).astype(f32),
        x0_x=rng.standard_normal((batch, n_x, c)).astype(f32),
        x0_h=rng.standard_normal((batch, n_h, c)).astype(f32),
        taus=np.array([1.0, 0.5, 0.25], dtype=f32),
        t=np.linspace(0.0, 10.0, 101).astype(f32),
    )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _log(msg: str) -> None:
    print(f"[hamux_side] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", help="input problem (see module docstring)")
    ap.add_argument("--out", help="output JSON")
    ap.add_argument("--make-npz", metavar="PATH", help="write a random test problem to PATH and exit")
    ap.add_argument("--seed", type=int, default=0, help="seed for --make-npz")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each solve (best is kept)")
    ap.add_argument("--vf-repeats", type=int, default=5, help="timed repeats of the vector-field batch")
    ap.add_argument("--vf-inner", type=int, default=10, help="vector-field evaluations per timed repeat")
    ap.add_argument("--skip-fused", action="store_true", help="do not time the fused-energy variant")
    args = ap.parse_args(argv)

    if args.make_npz:
        make_test_npz(args.make_npz, seed=args.seed)
        _log(f"wrote {args.make_npz}")
        return 0
    if not (args.npz and args.out):
        ap.error("--npz and --out are required (or --make-npz PATH)")

    d = np.load(args.npz)
    f32 = np.float32
    t = np.asarray(d["t"], f32)
    dts = jnp.asarray(np.diff(t).astype(f32))
    taus_np = np.asarray(d["taus"], f32)
    x0 = {k: jnp.asarray(np.asarray(d[f"x0_{k}"], f32)) for k in LAYERS}
    B = int(x0["v"].shape[0])
    n_steps = len(t) - 1
    assert t[0] == 0.0 and n_steps >= 1, "t must start at 0 and have at least two points"

    ham = build_ham(np.asarray(d["W_vx"], f32), np.asarray(d["W_xh"], f32), channels=int(x0["v"].shape[-1]))
    ham_params, ham_static = eqx.partition(ham, eqx.is_array)
    params = {"ham": ham_params, "taus": {k: jnp.asarray(taus_np[i]) for i, k in enumerate(LAYERS)}}
    energy_fn, vf_fn, solve_final, solve_traj, solve_traj_fused = make_functions(ham_static)

    for leaf in jtu.tree_leaves((params, x0)):
        assert leaf.dtype == jnp.float32, leaf.dtype
    load_start = os.getloadavg()
    _log(f"jax {jax.__version__} on {jax.devices()}, B={B}, n_steps={n_steps}, load average {load_start}")

    # (a) energy of the initial state
    energy0 = np.asarray(energy_fn(params, x0))
    _log(f"energy0 = {energy0.tolist()}")

    # (c) vector field alone
    _block(vf_fn(params, x0))
    tm_vf = time_best(vf_fn, params, x0, repeats=args.vf_repeats, inner=args.vf_inner)
    vf_eps = args.vf_inner / tm_vf["best_s"]
    _log(f"vector field: {vf_eps:.2f} evals/s (batch of {B}) {_load_str(tm_vf)}")

    # (b) RK4 with the energy and the states recorded at every grid point. The warm-up call compiles and
    # gives the results; the timed calls recompute the same thing.
    t0 = time.perf_counter()
    traj, E = _block(solve_traj(params, x0, dts))
    first_traj = time.perf_counter() - t0
    energy_traj = np.asarray(E)
    final = {k: np.asarray(v[-1]) for k, v in traj.items()}
    del traj, E
    tm_e = time_best(solve_traj, params, x0, dts, repeats=args.repeats)
    _log(f"RK4 with energy: {tm_e['best_s']:.3f} s (first call {first_traj:.1f} s) {_load_str(tm_e)}")

    # (b') without energy: only the final state
    t0 = time.perf_counter()
    xT = {k: np.asarray(v) for k, v in _block(solve_final(params, x0, dts)).items()}
    first_final = time.perf_counter() - t0
    final_diff = max(float(np.max(np.abs(xT[k] - final[k]))) for k in LAYERS)
    tm_ne = time_best(solve_final, params, x0, dts, repeats=args.repeats)
    _log(f"RK4 without energy: {tm_ne['best_s']:.3f} s (first call {first_final:.1f} s) {_load_str(tm_ne)}")

    fused = tm_f = None
    if not args.skip_fused:
        traj, E_f = _block(solve_traj_fused(params, x0, dts))
        E_f = np.asarray(E_f)
        del traj
        tm_f = time_best(solve_traj_fused, params, x0, dts, repeats=args.repeats)
        fused = {
            "wall_s": tm_f["best_s"],
            "max_abs_energy_diff_vs_separate": float(np.max(np.abs(E_f - energy_traj))),
        }
        _log(f"RK4 with the energy fused into the first stage: {tm_f['best_s']:.3f} s {_load_str(tm_f)}")

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "energy0": energy0.astype(float).tolist(),
        "energy": energy_traj.astype(float).tolist(),
        "energy_max_step_increase": float(np.max(np.diff(energy_traj.astype(np.float64), axis=0))),
        "t": t.astype(float).tolist(),
        "final_sum": {k: float(final[k].astype(np.float64).sum()) for k in LAYERS},
        "final_max_abs": {k: float(np.max(np.abs(final[k]))) for k in LAYERS},
        "final_sum_per_sample": {k: final[k].astype(np.float64).sum(axis=(1, 2)).tolist() for k in LAYERS},
        "final_state_max_abs_diff_with_vs_without_energy": final_diff,
        "wall_s_with_energy": tm_e["best_s"],
        "wall_s_without_energy": tm_ne["best_s"],
        "energy_overhead_s": tm_e["best_s"] - tm_ne["best_s"],
        "wall_s_with_energy_fused": fused["wall_s"] if fused else None,
        "fused_energy": fused,
        "first_call_s_incl_compile": {"with_energy": first_traj, "without_energy": first_final},
        "vf_evals_per_s": vf_eps,
        "vf_eval_s": tm_vf["best_s"] / args.vf_inner,
        "timings": {
            "vf": tm_vf,
            "with_energy": tm_e,
            "without_energy": tm_ne,
            "with_energy_fused": tm_f if fused else None,
        },
        "n_steps": n_steps,
        "rk4_vf_evals": 4 * n_steps,
        "batch_size": B,
        "dtype": "float32",
        "timing": f"best of {args.repeats} (solves), best of {args.vf_repeats}x{args.vf_inner} "
        "(vector field), after a warm-up call, with block_until_ready",
        "notes": {
            "with_energy": "states at all grid points plus a separate hamux energy evaluation at each",
            "without_energy": "only the state at the final time",
            "fused": "energy at x_n taken from the value_and_grad of the first RK4 stage",
        },
        "versions": {
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "hamux": _version("hamux"),
            "equinox": _version("equinox"),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "device": str(jax.devices()[0]),
        "cpu_threads": affinity,
        "cpu_threads_note": "XLA:CPU sizes its intra-op thread pool to the available cores; in timings, "
        "cpu_util is this process's CPU time over wall time and other_processes_cores the cores other "
        "processes kept busy meanwhile (nonzero means the timings were taken on a loaded machine)",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
