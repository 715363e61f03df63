"""Rank collapse of freshly initialised ViTs, with and without skip connections, standard attention vs MHA.

    python -m experiments.rank_collapse_init [--out docs/figures] [--seeds 3] [--images 32]

ViT-Tiny (dim 192, 12 blocks, 3 heads, 7 x 7 patches) on Fashion-MNIST test images, timm's initialisation; per
(skip, alpha') the mean +- std over ``--seeds`` initialisations of the token cosine similarity and the distance
from rank 1 per layer (`experiments.analysis.rank_collapse`). Writes ``rank_collapse_init.png`` and
``rank_collapse_init.md``. The trained counterparts come from ``python -m experiments.analyze`` on the ViT sweep.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mixers import VisionTransformer, ViTConfig

from .analysis import rank_collapse, rank_collapse_report
from .data import DataConfig, build_datasets


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/analysis"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.5], help="alpha' values (0 = standard)")
    args = p.parse_args(argv)
    if args.seeds < 1 or not 2 <= args.images <= 10000:  # two images at least: a rank needs more than one token set
        p.error(f"--seeds {args.seeds} --images {args.images}: at least 1 seed, and 2 to 10,000 test images")
    if not all(0 <= a < 1 for a in args.alphas):
        p.error(f"--alphas {args.alphas}: each alpha' must lie in [0, 1)")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: cannot create it ({e.strerror or e})")
    _, test_ds, _ = build_datasets(DataConfig(name="fashion_mnist"), seed=0)
    images = torch.stack([test_ds[i][0] for i in range(args.images)])
    groups = {}
    for skip in ("residual", "none"):
        for alpha_h in args.alphas:
            runs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = VisionTransformer(ViTConfig(num_classes=10, img_size=28, in_chans=1, patch_size=7,
                                                    embed_dim=192, depth=12, num_heads=3, skip=skip, alpha_h=alpha_h))
                runs.append(rank_collapse(model, images))
            groups[f"skip={skip}, alpha'={alpha_h:g}"] = runs
    md = rank_collapse_report(groups, path=args.out / "rank_collapse_init.png")
    (args.out / "rank_collapse_init.md").write_text(md + "\n")
    print(md)
    return md


if __name__ == "__main__":
    main()
