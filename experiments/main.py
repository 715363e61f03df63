"""The main job: simulate a 3-layer hierarchical Hopfield network on a token x channel state.

    python -m experiments.main [--tokens 64 --channels 32 --batch 4 --t-end 10 --out outputs]

Builds the iMixer chain v - x - h (iMixer paper Sec. 4: LayerNorm visible layer, GELU hidden layers,
tau_v >> tau_x >> tau_h) with random symmetric weights, integrates it with dopri5, prints the energy
over time and the descent report, and writes the energy plot as a PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hopfield import lagrangians as lag
from hopfield import presets


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--internal", type=int, default=None, help="x width along tokens (default S/2)")
    p.add_argument("--hidden", type=int, default=None, help="h width along tokens (default 2 x internal)")
    p.add_argument("--hidden-lagrangian", choices=["gelu", "relu", "tanh"], default="gelu")
    p.add_argument("--taus", type=float, nargs=3, default=(1.0, 0.1, 0.01))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--t-end", type=float, default=10.0)
    p.add_argument("--points", type=int, default=51)
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-8)
    p.add_argument("--method", default="dopri5")
    p.add_argument("--float64", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs"))
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    internal = args.internal or max(1, args.tokens // 2)
    hidden = args.hidden or 2 * internal
    hid = {"gelu": lag.gelu, "relu": lag.relu, "tanh": lag.tanh}[args.hidden_lagrangian]()
    net = presets.imixer_chain(args.tokens, args.channels, internal, hidden, hidden_lagrangian=hid,
                               taus=tuple(args.taus))
    if args.float64:
        net = net.double()
    state = net.init_state(args.batch)
    print(net)
    t = torch.linspace(0, args.t_end, args.points)
    start = time.perf_counter()
    with torch.no_grad():
        traj = net.simulate(state, t, method=args.method, rtol=args.rtol, atol=args.atol)
    wall = time.perf_counter() - start
    print(f"\n{args.method}: {traj.nfe} vector-field evaluations in {wall:.2f} s\n")
    print(traj.table())
    print()
    print(traj.descent)
    png = traj.plot(args.out / "energy.png",
                    title=f"iMixer chain v-x-h, S={args.tokens}, C={args.channels}, {args.hidden_lagrangian} hidden")
    print(f"\nenergy plot: {png}")
    return {"nfe": traj.nfe, "wall_s": wall, "descent_ok": traj.descent.ok, "png": str(png)}


if __name__ == "__main__":
    main()
