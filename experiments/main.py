"""The main job: simulate the iMixer's hierarchical Hopfield network, then derive the iMixer block from it.

    python -m experiments.main [--tokens 64 --channels 32 --batch 4 --t-end 10 --out outputs]

1. Builds the iMixer chain v - x - h (iMixer paper Sec. 4: LayerNorm visible layer, GELU hidden layers,
   tau_v >> tau_x >> tau_h) with random symmetric weights, integrates it with dopri5, prints the energy
   over time and the descent report, and writes the energy plot as a PNG.
2. Takes the adiabatic and discrete-time limits of the iMixer block's network (token chain v - x - h plus the
   channel layer c), prints the update rule of the derived block, its contraction certificate, and its
   max-abs error against the hand-written iMixer block (``mixers.IMixerBlock``) with the same random weights.
3. Trains a small derived iMixer on real Fashion-MNIST images for a few minutes (``experiments.train``) and
   prints its test accuracy (``--train-epochs 0`` skips it).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import derive
import mixers
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
    p.add_argument("--train-epochs", type=int, default=3, help="epochs of the Fashion-MNIST run (0: skip it)")
    p.add_argument("--train-subset", type=int, default=20000, help="training images of the Fashion-MNIST run")
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        return _run(args)
    except (ValueError, OSError) as e:  # the project's errors name what was wrong (an unknown --method, no data)
        p.error(str(e))


TRAIN_BATCH = 64  # the Fashion-MNIST run's batch size


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """An error naming the option for any value the job cannot run with."""
    positive = {"--tokens": args.tokens, "--channels": args.channels, "--batch": args.batch,
                "--points": args.points, "--internal": args.internal, "--hidden": args.hidden}
    for name, value in positive.items():
        if value is not None and value < 1:
            p.error(f"{name} {value}: must be at least 1")
    reals = {"--t-end": args.t_end, "--rtol": args.rtol, "--atol": args.atol,
             **{f"--taus[{k}]": tau for k, tau in enumerate(args.taus)}}
    for name, value in reals.items():
        if not (math.isfinite(value) and value > 0):
            p.error(f"{name} {value}: must be a finite number > 0")
    if args.train_epochs < 0:
        p.error(f"--train-epochs {args.train_epochs}: must be 0 (no training) or more")
    if args.train_epochs and args.train_subset < TRAIN_BATCH:
        p.error(f"--train-subset {args.train_subset}: must be at least the run's batch size, {TRAIN_BATCH}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: cannot create it ({e.strerror or e})")


def _run(args) -> dict:
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
    errors = derive_imixer(args.tokens, args.channels, args.batch, args.seed)
    result = {"nfe": traj.nfe, "wall_s": wall, "descent_ok": traj.descent.ok, "png": str(png), "errors": errors}
    if args.train_epochs > 0:
        result["train"] = train_fashion(args.train_epochs, args.train_subset, args.out / "fashion_run", args.seed)
    return result


def train_fashion(epochs: int, subset: int, out: Path, seed: int) -> dict:
    """A short real training run of a derived iMixer (2 blocks of 64 channels, patch 4) on Fashion-MNIST."""
    from experiments.train import load_config, train

    print(f"\n--- training a derived iMixer on Fashion-MNIST ({subset} images, {epochs} epochs, CPU) ---")
    cfg = load_config(str(Path(__file__).parent / "configs" / "fashion_small.yaml"), [
        "model=derived_imixer_t4_28", "model_kwargs={embed_dim: 64, num_blocks: 2, h_ratio: 2}",
        f"epochs={epochs}", "warmup_epochs=0", "lr=2e-3", f"batch_size={TRAIN_BATCH}", "smoothing=0.0",
        "data.crop_pad=0", "data.hflip=0.0", "data.num_workers=0", f"data.train_subset={subset}", f"seed={seed}",
        f"out_dir={out}"])
    summary = train(cfg, overwrite=True)  # out is this job's own demo folder, remade each time
    print(f"\nFashion-MNIST test top-1 after {epochs} epochs: {summary['last_top1']:.2f}% "
          f"({summary['params']:,} parameters, {summary['images_per_s']:.0f} images/s, "
          f"{summary['wall_s']:.0f} s; metrics in {out})")
    return summary


def derive_imixer(tokens: int, channels: int, batch: int, seed: int, h_ratio: float = 2.0, n_iter: int = 2) -> dict:
    """Derive the iMixer block from its network and compare it with the hand-written module."""
    print("\n--- derivation: the iMixer block as the limit of its Hopfield network ---")
    net = derive.block_network("imixer", tokens, channels, h_ratio=h_ratio)
    block = derive.discretize(net, n_iter=n_iter, splitting="sequential")
    block.kind = "imixer"
    print(net)
    print("\nderived update rule (tau_x, tau_h -> 0, then one Euler step dt = tau_v, alpha = 0):")
    print(block.explain())
    print("\nLaTeX:")
    print(block.explain(latex=True))

    torch.manual_seed(seed)
    ref = mixers.IMixerBlock(channels, tokens, h_ratio=h_ratio, n_iter=n_iter)
    with torch.no_grad():  # random weights, far from the initialisation
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    errors = {}
    for dtype in (torch.float64, torch.float32):
        r = ref.to(dtype)
        b = derive.load_reference_block(block, r).to(dtype)
        x = torch.randn(batch, tokens, channels, dtype=dtype)
        for mode in ("train", "eval"):
            r.train(mode == "train")
            b.train(mode == "train")
            with torch.no_grad():
                out_r, out_b = r(x), b(x)
            err = ((out_b - out_r).abs().max() / out_r.abs().max()).item()
            errors[f"{str(dtype)[6:]}/{mode}"] = err
    print("\nderived block vs hand-written mixers.IMixerBlock, max-abs error / max-abs output:")
    for k, e in errors.items():
        print(f"  {k:14s} {e:.2e}")
    block.eval()
    cert = block.certificate(torch.randn(batch, tokens, channels, dtype=torch.float32))
    print("\ncontraction certificate:")
    for c in cert:
        print(" ", c)
    print(f"  a coefficient that certifies Lip(F) < 1: coeff < {block.certified_coeff():.4f}")
    return errors


if __name__ == "__main__":
    main()
