"""Reduced-field evaluation of the iMixer block's network: the matrix-free default against dense Newton.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/adiabatic_solve.py [--sizes 8x16 16x64 64x128 196x512]
        [--batch 1] [--dtype float64] [--rounds 3] [--write-docs]

For each visible size S x C: ``derive.block_network("imixer", S, C, h_ratio=2)`` with its own random weights (seed
0), and ``derive.adiabatic(net, solver=...)(v)`` for a standard normal v (batch ``--batch``). Each (size, solver)
runs in a fresh process, so its peak resident memory (ru_maxrss, less the process's memory before the first
solve) is its own; time is the median of ``--rounds`` evaluations after one untimed warm-up. The table gives times
as ratios measured in the same process: to one evaluation of the whole network's vector field at the same size
(``net.vector_field``, the fastest of 5 calls after each solve: a solve's aftermath, such as freeing the dense
Jacobian, would slow the first), which carries to another
machine, and Anderson's to dense Newton's; the terminal prints the seconds. Dense Newton is skipped where its
per-sample Jacobian alone (state size^2 x bytes x batch) would exceed ``--max-jacobian-gb``. The two solvers'
fields are compared where both ran (max-abs difference). Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
MARK = "### Reduced field of the iMixer network: matrix-free Anderson against dense Newton"
BEGIN = "<!-- begin: benchmarks/adiabatic_solve.py (generated; rerun with --write-docs to replace) -->"
END = "<!-- end: benchmarks/adiabatic_solve.py -->"


def _child(args) -> None:
    import resource

    import torch

    import derive

    torch.manual_seed(0)
    s, c = args.size
    dtype = getattr(torch, args.dtype)
    net = derive.block_network("imixer", s, c, h_ratio=2).to(dtype)
    v = torch.randn(args.batch, s, c, dtype=dtype)
    field = derive.adiabatic(net, solver=args.solver)
    state0 = net.init_state(args.batch, generator=torch.Generator().manual_seed(1))
    state0 = {k: x.to(dtype) for k, x in state0.items()}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, evals = [], []
    with torch.no_grad():
        out = field(v)  # warm-up
        net.vector_field(state0)
        for _ in range(args.rounds):  # a solve and a vector-field evaluation in turn: drift hits both alike
            t = time.perf_counter()
            out = field(v)
            times.append(time.perf_counter() - t)
            for _ in range(5):
                t = time.perf_counter()
                net.vector_field(state0)
                evals.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(out, args.save)
    state = sum(L.size for n, L in net.layers.items() if n != "v")
    print(json.dumps({"median_s": statistics.median(times), "best_s": min(times), "peak_gb": (peak - base) / 2**20,
                      "field_s": min(evals), "state": state}))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", default=["8x16", "16x64", "64x128", "196x512"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-jacobian-gb", type=float, default=8.0)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--solver", help=argparse.SUPPRESS)
    p.add_argument("--size", type=lambda t: tuple(int(x) for x in t.split("x")), help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return ""
    import torch

    import derive

    nbytes = 8 if args.dtype == "float64" else 4
    rows = ["| S x C | fast state per sample | solver | time in vector-field evaluations | time vs dense Newton "
            "| peak memory (GiB) | max-abs difference |", "|---|---|---|---|---|---|---|"]
    tmp = ROOT / "outputs" / "adiabatic_solve"
    tmp.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        s, c = (int(x) for x in size.split("x"))
        state = sum(L.size for n, L in derive.block_network("imixer", s, c, h_ratio=2).layers.items() if n != "v")
        outs, secs = {}, {}
        for solver in ("newton", "anderson"):
            jac_gb = state**2 * nbytes * args.batch / 2**30
            if solver == "newton" and jac_gb > args.max_jacobian_gb:
                rows.append(f"| {size} | {state:,} | dense Newton | skipped: the Jacobian alone needs {jac_gb:,.0f} "
                            "GiB | – | – | – |")
                continue
            save = tmp / f"{size}_{solver}.pt"
            cmd = [sys.executable, __file__, "--child", "--solver", solver, "--size", size, "--batch",
                   str(args.batch), "--dtype", args.dtype, "--rounds", str(args.rounds), "--save", str(save)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                rows.append(f"| {size} | {state:,} | {solver} | failed: {r.stderr.strip().splitlines()[-1][:80]} "
                            "| – | – | – |")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{size} {solver}: {m['median_s']:.4g} s a solve, {m['field_s']:.3g} s a vector-field evaluation, "
                  f"{m['peak_gb']:.2f} GiB", flush=True)
            outs[solver] = torch.load(save, weights_only=True)
            secs[solver] = m["median_s"]
            diff, vs_newton = "", "–"
            if len(outs) == 2:
                diff = f"{float((outs['newton'] - outs['anderson']).abs().max()):.2g}"
                vs_newton = f"{secs['anderson'] / secs['newton']:.2g}"
            name = "dense Newton" if solver == "newton" else "Anderson (default)"
            rows.append(f"| {size} | {state:,} | {name} | {m['median_s'] / m['field_s']:,.0f} | "
                        f"{'1' if solver == 'newton' else vs_newton} | {m['peak_gb']:.2f} | {diff} |")
    table = "\n".join(rows)
    cmd = "OMP_NUM_THREADS=2 .venv/bin/python benchmarks/adiabatic_solve.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write-docs")
    from experiments.runs import cpu_name

    head = (f"{MARK}\n\n`{cmd.strip()}` ({date.today()}, {cpu_name() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, batch {args.batch}; "
            "times as ratios measured in the same process):\n\n")
    print(head + table)
    if args.write_docs:
        sys.path.insert(0, str(ROOT))
        from benchmarks.derived_vs_handwritten import write_docs

        write_docs(DOCS, head + table + "\n", BEGIN, END)
    return table


if __name__ == "__main__":
    main()
