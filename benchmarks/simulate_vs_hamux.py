"""Simulation speed of a Mixer-S-size 3-layer network against HAMUX (fixed steps) and diffrax (dopri5), all in
one process, interleaved round by round.

    bash benchmarks/setup_hamux.sh            # once: .venv-hamux with jax, hamux, diffrax (imported from here)
    .venv/bin/python benchmarks/simulate_vs_hamux.py [--rounds 3] [--write-docs]

Network (float32, batch 8, CPU): v (196, 512) LayerNorm over channels, tau 1; x (256, 512) ReLU, tau 0.5;
h (512, 512) softmax over the 512 hidden units, tau 0.25; token-mixing synapses v-x (256 x 196) and
x-h (512 x 256); t in [0, 10]. Every side gets the same weights and initial states. Measures (each round runs
every variant once, in turn, so that the machine's drift hits all alike; medians and ranges over rounds):

- one vector-field evaluation;
- RK4 (ours: torchdiffeq's 3/8 rule, HAMUX side: the classic rule; both 4 evaluations a step) and Euler, 100
  steps, all 101 states kept, with the energy at every one (HAMUX: from the first stage's value_and_grad) and
  without it;
- dopri5 at rtol 1e-5, atol 1e-7, 51 outputs with their energies: ``hopfield`` (``hopfield.adaptive``:
  torchdiffeq's dopri5 for each sample) against diffrax's ``Dopri5`` with a PID controller, jitted, as it
  runs by default (one RMS norm over the whole batch) and vmapped over the samples with torchdiffeq's norm (the
  largest of the layers' RMS norms), the error control hopfield.adaptive keeps;
- the same dopri5 solve without energies by the torch libraries on our own vector field (torchdiffeq's
  ``odeint``, and torchode's ``Dopri5`` when torchode is installed: ``pip install torchode``), against
  ``hopfield.adaptive``: what the project's own loop buys.

The JAX side is ``benchmarks/hamux_side.py`` (the HAM built from hamux's own pieces). JAX and torch each use
every core; they run one after the other, never at once. Pause other jobs while it runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from derived_vs_handwritten import write_docs  # noqa: E402

from hopfield import DenseSynapse, Layer, Network  # noqa: E402
from hopfield import lagrangians as lag  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
B, S, C, X, H = 8, 196, 512, 256, 512
TAUS = (1.0, 0.5, 0.25)
GFLOP_PER_EVAL = 2 * 2 * B * C * (S * X + X * H) / 1e9  # two GEMMs (forward and feedback) per synapse


def build(seed: int = 0, batch: int = B, tokens: int = S):
    torch.manual_seed(seed)
    net = Network(
        {"v": Layer((tokens, C), lag.layernorm(axis=-1, eps=1e-5), TAUS[0]),
         "x": Layer((X, C), lag.relu(), TAUS[1]),
         "h": Layer((H, C), lag.softmax(axis=-2), TAUS[2])},
        [DenseSynapse("v", "x", axis=-2), DenseSynapse("x", "h", axis=-2)],
    )
    return net, net.init_state(batch)


def jax_side():
    """Import JAX, hamux and diffrax from .venv-hamux (the numpy they need is this environment's)."""
    site = sorted((ROOT / ".venv-hamux" / "lib").glob("python3*/site-packages"))
    if not site:
        return None
    sys.path.append(str(site[0]))
    os.environ["JAX_PLATFORMS"] = "cpu"
    import hamux_side

    return hamux_side


def make_jax(hs, net, state, t_np):
    """Jitted HAMUX functions on the same weights, states and grid: dict name -> callable returning arrays."""
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.tree_util as jtu

    ham = hs.build_ham(net.synapses[0].weight.detach().numpy(), net.synapses[1].weight.detach().numpy())
    params, static = eqx.partition(ham, eqx.is_array)
    taus = {k: jnp.asarray(v, jnp.float32) for k, v in zip(("v", "x", "h"), TAUS)}
    x0 = {k: jnp.asarray(state[k].numpy()) for k in ("v", "x", "h")}
    dts = jnp.asarray(np.diff(t_np).astype(np.float32))

    def field(h, x, energy=False):
        return hs.vector_field(h, taus, x, return_energy=energy)

    def fixed(method, with_energy):
        def step_fn(h):
            f = lambda x: field(h, x)  # noqa: E731

            def step(x, dt):
                if with_energy:
                    k1, e = field(h, x, energy=True)
                else:
                    k1, e = f(x), None
                if method == "euler":
                    nxt = jtu.tree_map(lambda a, k: a + dt * k, x, k1)
                else:
                    nxt = hs.rk4_step(f, x, dt, k1=k1)
                return nxt, (nxt, e)
            return step

        @jax.jit
        def solve(p, x0, dts):
            h = eqx.combine(p, static)
            xT, (xs, es) = jax.lax.scan(step_fn(h), x0, dts)
            traj = jtu.tree_map(lambda a, b: jnp.concatenate([a[None], b]), x0, xs)
            if not with_energy:
                return traj
            return traj, jnp.concatenate([es, hs.energy(h, xT)[None]])
        return lambda: solve(params, x0, dts)

    t51 = jnp.asarray(np.linspace(0, 10, 51, dtype=np.float32))

    @jax.jit
    def dopri(p, x0):
        h = eqx.combine(p, static)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, x, args: field(h, x)), diffrax.Dopri5(), t0=0.0, t1=10.0, dt0=None, y0=x0,
            saveat=diffrax.SaveAt(ts=t51), stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-7),
            max_steps=100_000)
        energy = jax.vmap(lambda x: hs.energy(h, x))(sol.ys)
        return sol.ys, energy, sol.stats["num_steps"]

    def max_rms(tree):  # torchdiffeq's norm for a tuple of states: the largest of the layers' RMS norms
        return jnp.max(jnp.stack([jnp.sqrt(jnp.mean(jnp.square(a))) for a in jtu.tree_leaves(tree)]))

    @jax.jit
    def dopri_per_sample(p, x0):
        """diffrax vmapped over the samples with torchdiffeq's norm: each sample its own steps and error control,
        the contract of hopfield.adaptive (the batched while loop runs until the slowest sample is done)."""
        h = eqx.combine(p, static)
        one = lambda x: jtu.tree_map(lambda a: a[0], field(h, jtu.tree_map(lambda a: a[None], x)))  # noqa: E731

        def solve(x):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, args: one(y)), diffrax.Dopri5(), t0=0.0, t1=10.0, dt0=None, y0=x,
                saveat=diffrax.SaveAt(ts=t51),
                stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-7, norm=max_rms), max_steps=100_000)
            return sol.ys, sol.stats["num_steps"]
        ys, steps = jax.vmap(solve)(x0)
        ys = jtu.tree_map(lambda a: jnp.swapaxes(a, 0, 1), ys)  # (T, batch, ...)
        energy = jax.vmap(lambda x: hs.energy(h, x))(ys)
        return ys, energy, jnp.max(steps)

    vf = jax.jit(lambda p, x: field(eqx.combine(p, static), x))
    fns = {"vf": lambda: vf(params, x0), "dopri5": lambda: dopri(params, x0),
           "dopri5_per_sample": lambda: dopri_per_sample(params, x0),
           "energy0": lambda: jax.jit(lambda p, x: hs.energy(eqx.combine(p, static), x))(params, x0)}
    for method in ("rk4", "euler"):
        for e in (True, False):
            fns[f"{method}_{'energy' if e else 'plain'}"] = fixed(method, e)
    return fns


def library_dopri5(net, state, t, rtol: float, atol: float) -> dict:
    """The same dopri5 solve by the torch libraries on our vector field (no energies): name -> callable."""
    import torchdiffeq

    from hopfield.dynamics import _Field
    from hopfield.stepping import _Field as FlatField

    names = list(net.layers)
    y0 = tuple(state[n] for n in names)
    fns = {"dopri5_torchdiffeq": lambda: torchdiffeq.odeint(_Field(net, {}, (), check_finite=False), y0, t,
                                                            method="dopri5", rtol=rtol, atol=atol)}
    try:
        import torchode as to
    except ImportError:
        return fns
    shapes = [x.shape[1:] for x in y0]
    sizes = [int(np.prod(s)) for s in shapes]
    batch = y0[0].shape[0]

    def torchode_solve():  # each sample its own steps, the GEMMs writing into torchode's flat layout
        field = FlatField(net, names, {}, ())

        def split(flat):
            return [p.view(flat.shape[0], *s) for p, s in zip(flat.split(sizes, dim=1), shapes)]

        def f(time, flat):
            out = torch.empty_like(flat)
            field(split(flat), split(out), float(time.max()))
            return out

        def norm(err):  # torchdiffeq's norm for a tuple of states, per sample
            return torch.stack([p.square().mean(1).sqrt() for p in err.split(sizes, dim=1)], dim=1).amax(1)

        term = to.ODETerm(f)
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=atol, rtol=rtol, term=term,
                                                                                norm=norm))
        flat0 = torch.cat([x.reshape(batch, -1) for x in y0], dim=1)
        return solver.solve(to.InitialValueProblem(y0=flat0, t_eval=t.unsqueeze(0).expand(batch, -1))).ys

    fns["dopri5_torchode"] = torchode_solve
    return fns


def block(out):
    import jax

    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out)


def timed(fn, jax_fn: bool, device: torch.device | None = None) -> float:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if jax_fn:
        block(out)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write-docs", action="store_true", help="append the results to docs/benchmarks.md")
    p.add_argument("--scale", action="store_true", help="only the scale table: time per Euler step and GFLOP/s "
                   "at batch 1, 8, 32 and 49, 196, 784 tokens (ours alone)")
    p.add_argument("--device", default="cpu", help="the scale table's device (cpu, cuda)")
    p.add_argument("--tiny", action="store_true", help="the scale table at batch 1, 2 and 49 tokens (a smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.scale:
        report = scale_table(args.rounds, torch.device(args.device), args.tiny)
        print(report)
        if args.write_docs:
            write_docs(DOCS, report, *markers("scale" if args.device == "cpu" else f"scale, {args.device}"))
        return {}
    net, state = build()
    t = torch.linspace(0, 10, 101)
    t51 = torch.linspace(0, 10, 51)
    ours = {
        "vf": lambda: net.vector_field(state),
        "rk4_energy": lambda: net.simulate(state, t, method="rk4"),
        "rk4_plain": lambda: net.simulate(state, t, method="rk4", track_energy=False),
        "euler_energy": lambda: net.simulate(state, t, method="euler"),
        "euler_plain": lambda: net.simulate(state, t, method="euler", track_energy=False),
        "dopri5": lambda: net.simulate(state, t51, rtol=1e-5, atol=1e-7),
        "dopri5_plain": lambda: net.simulate(state, t51, rtol=1e-5, atol=1e-7, track_energy=False),
    } | library_dopri5(net, state, t51, 1e-5, 1e-7)
    hs = jax_side()
    theirs = make_jax(hs, net, state, t.numpy()) if hs is not None else {}
    if hs is None:
        print("no .venv-hamux: run `bash benchmarks/setup_hamux.sh` for the side-by-side numbers")
    with torch.no_grad():
        ref = {k: fn() for k, fn in ours.items()}  # warm-up, and the results compared below
        got = {k: block(fn()) for k, fn in theirs.items()}  # compiles
        times = {("ours", k): [] for k in ours} | {("theirs", k): [] for k in theirs}
        for _ in range(args.rounds):
            for k in ours:
                reps = 10 if k == "vf" else 1
                times["ours", k].append(sum(timed(ours[k], False) for _ in range(reps)) / reps)
                if k in theirs:
                    times["theirs", k].append(sum(timed(theirs[k], True) for _ in range(reps)) / reps)
            for k in theirs.keys() - ours.keys() - {"energy0"}:  # theirs alone (compared with one of ours)
                times["theirs", k].append(timed(theirs[k], True))
    res = {"times": {f"{side}:{k}": v for (side, k), v in times.items()}, "rounds": args.rounds,
           "rk4_nfe": ref["rk4_energy"].nfe, "dopri5_nfe": ref["dopri5"].nfe,
           "dopri5_descent": str(ref["dopri5"].descent).splitlines()[0]}
    if theirs:
        import jax

        def rel(a, b):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))

        res["energy0_rel"] = rel(ref["rk4_energy"].energy[0].numpy(), got["energy0"])
        res["rk4_energy_rel"] = rel(ref["rk4_energy"].energy.numpy(), got["rk4_energy"][1])
        res["euler_energy_rel"] = rel(ref["euler_energy"].energy.numpy(), got["euler_energy"][1])
        res["dopri5_energy_rel"] = rel(ref["dopri5"].energy.numpy(), got["dopri5"][1])
        res["diffrax_steps"] = int(got["dopri5"][2])
        res["diffrax_steps_per_sample"] = int(got["dopri5_per_sample"][2])
        res["dopri5_per_sample_energy_rel"] = rel(ref["dopri5"].energy.numpy(), got["dopri5_per_sample"][1])
        import importlib.metadata as md

        res["versions"] = {"jax": jax.__version__, "hamux": md.version("hamux"), "diffrax": md.version("diffrax")}
    report = render(res)
    print(report)
    if args.write_docs:
        write_docs(DOCS, report, *markers("side by side"))
    return res


def markers(table: str) -> tuple[str, str]:
    """The comments around one of this script's sections of docs/benchmarks.md (replaced by each --write-docs)."""
    return (f"<!-- begin: benchmarks/simulate_vs_hamux.py, {table} (generated; rerun with --write-docs to replace) -->",
            f"<!-- end: benchmarks/simulate_vs_hamux.py, {table} -->")


def gemm_rate(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of one n^3 float32 matmul on ``device``, the median of ``reps`` calls: the machine's own yardstick,
    taken in the same run as the steps it is set against."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    timed(lambda: a @ b, False, device)  # warm-up
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, False, device) for _ in range(reps)) / 1e9


def scale_table(rounds: int, device: torch.device | None = None, tiny: bool = False) -> str:
    """Time per Euler step (10 steps, the median over rounds) with and without the energy, and the GFLOP/s of the
    step without it, at batch 1, 8, 32 and 49, 196, 784 visible tokens (the hidden layers as above). On a GPU the
    table gives the times; on a CPU only ratios measured in the run (the energy's share, the share of a 2048^3
    matmul's rate), and the terminal prints the times."""
    device = torch.device("cpu") if device is None else device
    gpu = device.type == "cuda"
    flags = f" --device {device.type}" if device.type != "cpu" else ""
    gemm = gemm_rate(device, 256 if tiny else 2048)
    cols = ["batch", "tokens", "GFLOP / step"]
    cols += ["ms / step, no energy", "GFLOP/s"] if gpu else []
    cols += ["share of the GEMM rate"]
    cols += ["ms / step, energy every step", "energy cost, ms"] if gpu else []
    cols += ["energy share", "share from the difference"]
    lines = [f"## Simulation at scale ({datetime.date.today().isoformat()})", "",
             f"Command: `.venv/bin/python benchmarks/simulate_vs_hamux.py --scale{flags} --rounds {rounds} "
             f"--write-docs`; machine: {machine(device)}, torch {torch.__version__}; float32; Euler, 10 steps, the "
             f"network above with v of N tokens; median of {rounds} interleaved rounds. Share of the GEMM rate: the "
             f"step's GFLOP/s (without the energy) over a {256 if tiny else 2048}^3 float32 matmul's, measured at the "
             f"start of the run{f' ({gemm:.0f} GFLOP/s)' if gpu else ''}. Energy share: the energy's "
             f"cost in one evaluation of the vector field (the fastest of {5 * rounds} evaluations with it minus "
             "the fastest of as many without, taken in turn at one state: its dot products and what the activations "
             "keep for it) over the time of a step without it; the difference of the two runs' times, (with - 1.1 x "
             "without) / "
             "without (the 0.1: the extra evaluation for the energy at the last output), is given beside it, but "
             "on a shared 2-core VM it moves by more than the energy costs.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for batch in (1, 2) if tiny else (1, 8, 32):
        for tokens in (49,) if tiny else (49, 196, 784):
            net, state = build(batch=batch, tokens=tokens)
            net = net.to(device)
            state = {k: v.to(device) for k, v in state.items()}
            t = torch.linspace(0, 1, 11)
            gflop = 2 * 2 * batch * C * (tokens * X + X * H) / 1e9
            def run(energy: bool, net=net, state=state, t=t):
                return net.simulate(state, t, method="euler", track_energy=energy)

            samples, evals = {False: [], True: []}, {False: [], True: []}
            field, y, dx = field_with_buffers(net, state)
            with torch.no_grad():
                run(False), run(True)  # warm-up
                for _ in range(rounds):  # interleaved, so that drift hits both alike
                    for e in (False, True):
                        samples[e].append(timed(lambda e=e: run(e), False, device))
                    for _ in range(5):  # one evaluation with the energy, one without, in turn
                        for e in (True, False):
                            call = partial(field, y, dx, 0.0, energy=e)
                            evals[e].append(timed(call, False, device))
            times = {e: statistics.median(v) / 10 for e, v in samples.items()}
            times["energy"] = min(evals[True]) - min(evals[False])
            # the energy at the 11th output needs one more evaluation after the last step (about an Euler step):
            # the share is the energy's cost per step without it
            share = (times[True] - times[False] * 1.1) / times[False]
            rate = gflop / times[False]
            print(f"batch {batch}, {tokens} tokens: {1e3 * times[False]:.1f} ms a step without the energy "
                  f"({rate:.0f} GFLOP/s; the matmul: {gemm:.0f}), {1e3 * times[True]:.1f} ms with it", flush=True)
            cells = [f"{batch}", f"{tokens}", f"{gflop:.2f}"]
            cells += [f"{1e3 * times[False]:.1f}", f"{rate:.0f}"] if gpu else []
            cells += [f"{100 * rate / gemm:.0f} %"]
            cells += [f"{1e3 * times[True]:.1f}", f"{1e3 * times['energy']:.2f}"] if gpu else []
            cells += [f"{100 * times['energy'] / times[False]:.1f} %", f"{100 * share:.0f} %"]
            lines.append("| " + " | ".join(cells) + " |")
            del net, state
    return "\n".join(lines) + "\n"


def field_with_buffers(net, state):
    """The fixed-step loop's vector field on ``state``, with dx/dt buffers: to time its energy's cost."""
    from hopfield.stepping import _Field

    names = list(net.layers)
    y = [state[n] for n in names]
    field = _Field(net, names, {}, ())
    assert field.from_field, "the energy is read off dx/dt only for dense synapses"
    return field, y, [x.new_empty(x.shape) for x in y]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} threads)"


def cpu_name() -> str:
    from experiments.runs import cpu_name as name

    return name()


def render(r: dict) -> str:
    T = r["times"]

    def med(key):
        return statistics.median(T[key])

    def span(key):
        return f"{min(T[key]):.3g}-{max(T[key]):.3g}"

    lines = [
        f"## Simulation, Mixer-S-size 3-layer network, one process ({datetime.date.today().isoformat()})", "",
        f"Command: `.venv/bin/python benchmarks/simulate_vs_hamux.py --rounds {r['rounds']} --write-docs`; "
        f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {r.get('versions', 'no JAX side')}; float32, batch 8, CPU. "
        f"Ratios of the two sides' times in each of {r['rounds']} interleaved rounds: median [range] (absolute CPU "
        "times do not carry to another machine; the terminal prints them).", "",
        "| measure | speed-up (HAMUX's time / ours) |",
        "|---|---|",
    ]
    names = {"vf": "one vector-field evaluation", "rk4_energy": "RK4, 100 steps, energy at every step",
             "rk4_plain": "RK4, 100 steps, no energy", "euler_energy": "Euler, 100 steps, energy at every step",
             "euler_plain": "Euler, 100 steps, no energy",
             "dopri5": "dopri5 rtol 1e-5, 51 outputs with energies (theirs: diffrax)"}
    names["dopri5_per_sample"] = ("dopri5 as above, each sample its own steps and torchdiffeq's norm (theirs: "
                                  "diffrax vmapped over the samples)")
    for k, name in names.items():
        mine = "dopri5" if k == "dopri5_per_sample" else k  # ours controls each sample on its own anyway
        print(f"{name}: ours {med('ours:' + mine):.3g} s [{span('ours:' + mine)}]"
              + (f", theirs {med('theirs:' + k):.3g} s [{span('theirs:' + k)}]" if f"theirs:{k}" in T else ""))
        ratio = ""
        if f"theirs:{k}" in T:
            ratios = [b / a for a, b in zip(T["ours:" + mine], T["theirs:" + k])]
            ratio = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
        lines.append(f"| {name} | {ratio} |")
    lines += [
        "",
        f"- energy tracking, share of the time: RK4 "
        f"{100 * (med('ours:rk4_energy') / med('ours:rk4_plain') - 1):.1f} %, Euler "
        f"{100 * (med('ours:euler_energy') / med('ours:euler_plain') - 1):.1f} %",
        f"- dopri5: {r['dopri5_nfe']} evaluations (ours); {r.get('diffrax_steps', '?')} accepted+rejected steps "
        f"(diffrax, one RMS norm over the whole batch), {r.get('diffrax_steps_per_sample', '?')} for the slowest "
        f"sample (diffrax per sample); descent report: {r['dopri5_descent']}",
    ]
    if "energy0_rel" in r:
        lines.append(f"- energies, max relative difference ours vs theirs: same states {r['energy0_rel']:.1e} "
                     f"(required <= 1e-5); along the float32 trajectories, whose states drift apart in round-off "
                     f"(and, for RK4, by the rule: the 3/8 rule against the classic one), RK4 "
                     f"{r['rk4_energy_rel']:.1e}, Euler {r['euler_energy_rel']:.1e}, dopri5 "
                     f"{r['dopri5_energy_rel']:.1e} (per sample: {r['dopri5_per_sample_energy_rel']:.1e})")
    libs = [k for k in ("dopri5_torchdiffeq", "dopri5_torchode") if f"ours:{k}" in T]
    if libs:
        lines += ["", "dopri5 without energies, the same solve by the torch libraries on our vector field against "
                  "`hopfield.adaptive` (ratio = their time / ours, per round; median [range]):", "",
                  "| solver | ratio to hopfield.adaptive |", "|---|---|", "| hopfield.adaptive | 1 |"]
        for k in libs:
            ratios = [b / a for a, b in zip(T["ours:dopri5_plain"], T["ours:" + k])]
            spread = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            lines.append(f"| {k.split('_')[1]} | {spread} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
