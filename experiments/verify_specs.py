"""``derive.verify`` on every network spec of a folder: is each block the limit of its own network?

    python -m experiments.verify_specs [--specs experiments/configs/specs] [--out docs/figures/specs]

Each spec is built small (6 tokens x 8 channels, float64, fixed-point solves run to 40 iterations) with random
weights far from the initialisation (seeded): every parameter gets 0.3 standard-normal noise (LayerNorm affine
gains 1 + noise), and the couplings between fast layers are scaled to spectral norm 0.5, so that the fast
subsystem contracts and the adiabatic limit exists. ``derive.verify`` then simulates the full network with the
fast taus scaled by eps = 0.1, 0.01, 0.001 and compares its visible velocity with the reduced field, and the block's
step with one Euler step of it. Writes ``<name>.png`` per spec and ``verify_specs.md`` (every report) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import derive

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "experiments" / "configs" / "specs"


def prepared_block(spec_path, seq_len: int = 6, dim: int = 8, seed: int = 0) -> derive.DerivedBlock:
    """The spec's block in float64 with the random, contracting weights described in the module doc."""
    torch.manual_seed(seed)
    block = derive.spec_block(derive.load_spec(str(spec_path)), seq_len, dim, n_iter=40).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.net.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(1 + noise if name.endswith("affine.weight") else noise)
        for syn in block.net.synapses:
            if block.visible not in syn.layers:  # fast-fast couplings at spectral norm 0.5: a contraction
                for w in (syn.weight, getattr(syn, "weight_fb", None)):
                    if w is not None:
                        w.mul_(0.5 / torch.linalg.matrix_norm(w, ord=2))
    return block


def main(argv=None) -> dict[str, derive.VerifyReport]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", type=Path, default=SPECS, help="a network spec YAML file, or a folder of them")
    p.add_argument("--out", type=Path, default=Path("outputs/verify_specs"))
    args = p.parse_args(argv)
    paths = sorted(args.specs.glob("*.yaml")) if args.specs.is_dir() else [args.specs] if args.specs.is_file() else []
    if not paths:
        p.error(f"--specs {args.specs}: no network spec (*.yaml) there")
    for path in paths:  # every spec is read before any is verified: a bad one is named before anything is written
        try:
            derive.spec_block(derive.load_spec(str(path)), 6, 8)
        except derive.SpecError as e:
            p.error(f"--specs: {e}" if str(path) in str(e) else f"--specs: {path}: {e}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: cannot create it ({e.strerror or e})")
    reports, md = {}, []
    for path in paths:
        block = prepared_block(path)
        report = derive.verify(block.net, block.visible, block=block, path=args.out / f"{path.stem}.png")
        reports[path.stem] = report
        md += [f"### `{path.stem}`", "", str(report), ""]
        print(f"== {path.stem}\n{report}\n", flush=True)
    (args.out / "verify_specs.md").write_text("\n".join(md))
    return reports


if __name__ == "__main__":
    main()
