"""Simulation speed of a Mixer-S-size 3-layer network, and the cost of energy tracking, against HAMUX.

    bash benchmarks/setup_hamux.sh            # once: .venv-hamux with jax, hamux, fastcore
    .venv/bin/python benchmarks/simulate_vs_hamux.py [--write-docs]

Network (float32, batch 8, CPU): v (196, 512) LayerNorm over channels, tau 1; x (256, 512) ReLU, tau 0.5;
h (512, 512) softmax over the 512 hidden units, tau 0.25; token-mixing synapses v-x (256 x 196) and
x-h (512 x 256); t in [0, 10]. Both libraries get the same weights and initial states and run classic RK4
with one step per interval of the same 101-point grid (400 vector-field evaluations); energies must agree
to 1e-5 relative. We also time dopri5 (rtol 1e-5) with 51 outputs, with and without energy tracking.
Run it on an otherwise idle machine: two processes sharing two cores distort every number.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hopfield import DenseSynapse, Layer, Network  # noqa: E402
from hopfield import lagrangians as lag  # noqa: E402

B, S, C, X, H = 8, 196, 512, 256, 512
TAUS = (1.0, 0.5, 0.25)


def build(seed: int = 0):
    torch.manual_seed(seed)
    net = Network(
        {"v": Layer((S, C), lag.layernorm(axis=-1, eps=1e-5), TAUS[0]),
         "x": Layer((X, C), lag.relu(), TAUS[1]),
         "h": Layer((H, C), lag.softmax(axis=-2), TAUS[2])},
        [DenseSynapse("v", "x", axis=-2), DenseSynapse("x", "h", axis=-2)],
    )
    state = net.init_state(B)
    return net, state


def best_of(fns: dict, repeats: int) -> dict:
    """Best wall time of each function, the variants interleaved so that drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def run_torch(net, state, t, repeats: int) -> dict:
    out = {}
    with torch.no_grad():
        out["vf_evals_per_s"] = 1.0 / best_of({"vf": lambda: net.vector_field(state)}, 10 * repeats)["vf"]
        traj = net.simulate(state, t, method="rk4")
        out["rk4_energy"] = traj.energy.numpy()
        # the same trajectory in float64: the scale of float32 round-off along 100 steps
        net64 = copy.deepcopy(net).double()
        e64 = net64.simulate({n: x.double() for n, x in state.items()}, t.double(), method="rk4").energy.numpy()
        out["rk4_energy64"] = e64
        del net64
        out["rk4_nfe"] = traj.nfe
        rk4 = best_of({"with": lambda: net.simulate(state, t, method="rk4"),
                       "without": lambda: net.simulate(state, t, method="rk4", track_energy=False)}, repeats)
        out["rk4_wall_s_with_energy"], out["rk4_wall_s_without_energy"] = rk4["with"], rk4["without"]
        t51 = torch.linspace(0, 10, 51)
        d = net.simulate(state, t51, rtol=1e-5, atol=1e-7)
        out["dopri5_nfe"] = d.nfe
        out["dopri5_descent"] = str(d.descent).splitlines()[0]
        dp = best_of({"with": lambda: net.simulate(state, t51, rtol=1e-5, atol=1e-7),
                      "without": lambda: net.simulate(state, t51, rtol=1e-5, atol=1e-7, track_energy=False)},
                     max(2, repeats - 2))
        out["dopri5_wall_s_with_energy"], out["dopri5_wall_s_without_energy"] = dp["with"], dp["without"]
    return out


def run_hamux(net, state, t, repeats: int) -> dict | None:
    py = ROOT / ".venv-hamux" / "bin" / "python"
    if not py.exists():
        print("no .venv-hamux: run `bash benchmarks/setup_hamux.sh` for the side-by-side numbers")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = Path(tmp) / "in.npz", Path(tmp) / "out.json"
        np.savez(npz, W_vx=net.synapses[0].weight.detach().numpy(), W_xh=net.synapses[1].weight.detach().numpy(),
                 x0_v=state["v"].numpy(), x0_x=state["x"].numpy(), x0_h=state["h"].numpy(),
                 taus=np.asarray(TAUS, np.float32), t=t.numpy())
        subprocess.run([str(py), str(ROOT / "benchmarks" / "hamux_side.py"), "--npz", str(npz), "--out", str(out),
                        "--repeats", str(repeats)], check=True)
        return json.loads(out.read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write-docs", action="store_true", help="append the results to docs/benchmarks.md")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    net, state = build()
    t = torch.linspace(0, 10, 101)
    ours = run_torch(net, state, t, args.repeats)
    theirs = run_hamux(net, state, t, args.repeats)
    res = {k: v for k, v in ours.items() if not k.startswith("rk4_energy")}

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))

    res["torch32_vs_torch64_traj"] = rel(ours["rk4_energy"], ours["rk4_energy64"])
    if theirs is not None:
        res["energy0_rel_diff"] = rel(ours["rk4_energy"][0], theirs["energy0"])
        res["hamux32_vs_torch64_traj"] = rel(theirs["energy"], ours["rk4_energy64"])
        res["energy_max_rel_diff"] = rel(ours["rk4_energy"], theirs["energy"])
        res["hamux"] = {k: theirs[k] for k in ("wall_s_with_energy", "wall_s_without_energy", "vf_evals_per_s")
                        if k in theirs}
        v = theirs.get("versions", {})
        res["hamux_versions"] = {k: v.get(k) for k in ("jax", "hamux")}
    report = render(res)
    print(report)
    if args.write_docs:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + report)
    return res


def render(r: dict) -> str:
    ov_rk4 = r["rk4_wall_s_with_energy"] / r["rk4_wall_s_without_energy"] - 1
    ov_dp = r["dopri5_wall_s_with_energy"] / r["dopri5_wall_s_without_energy"] - 1
    lines = [
        f"## Simulation, Mixer-S-size 3-layer network ({datetime.date.today().isoformat()})",
        "",
        "Command: `.venv/bin/python benchmarks/simulate_vs_hamux.py --write-docs`; machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        "float32, batch 8, CPU.",
        "",
        "| measure | hopfield (torch) | HAMUX (JAX, jitted) | ratio torch / HAMUX |",
        "|---|---|---|---|",
    ]
    h = r.get("hamux", {})

    def row(name, ours, key, fmt="{:.3g}", inverse=False):
        theirs = h.get(key)
        ratio = "" if theirs is None else f"{(theirs / ours if inverse else ours / theirs):.2f}"
        lines.append(f"| {name} | {fmt.format(ours)} | {'' if theirs is None else fmt.format(theirs)} | {ratio} |")

    row("vector-field evaluations / s", r["vf_evals_per_s"], "vf_evals_per_s", inverse=True)
    row("RK4, 100 steps, energy at every step: wall s", r["rk4_wall_s_with_energy"], "wall_s_with_energy")
    row("RK4, 100 steps, no energy: wall s", r["rk4_wall_s_without_energy"], "wall_s_without_energy")
    lines += [
        "",
        "(every ratio is torch time / HAMUX time, per evaluation for the first row: below 1 means torch is faster)",
        "",
        f"- energy tracking cost, RK4 with energy at all 101 grid points: {100 * ov_rk4:.1f}%",
        f"- energy tracking cost, dopri5 (rtol 1e-5) with 51 outputs, {r['dopri5_nfe']} evaluations: "
        f"{100 * ov_dp:.1f}% ({r['dopri5_wall_s_with_energy']:.2f} s vs {r['dopri5_wall_s_without_energy']:.2f} s)",
        f"- dopri5 descent report: {r['dopri5_descent']}",
    ]
    if "energy_max_rel_diff" in r:
        lines += [
            f"- energy of the same states (t = 0, 8 samples), torch vs HAMUX: max relative difference "
            f"{r['energy0_rel_diff']:.2e} (required <= 1e-5)",
            f"- energies along the float32 RK4 trajectories (101 times x 8 samples), torch vs HAMUX: "
            f"{r['energy_max_rel_diff']:.2e}; each against a float64 run of the same trajectory: torch "
            f"{r['torch32_vs_torch64_traj']:.2e}, HAMUX {r['hamux32_vs_torch64_traj']:.2e} (float32 round-off "
            "grows along the trajectory as the state grows)",
            f"- versions: {r['hamux_versions']}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
