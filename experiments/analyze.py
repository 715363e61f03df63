"""Figures and tables from finished training runs (``experiments.train`` output folders).

    python -m experiments.analyze --runs runs/sweep_fashion --out docs/figures [--images 16]

For every run below ``--runs`` (a folder with summary.json, config.yaml and checkpoint.pt) it rebuilds the
model from its config, loads the weights and writes:

- ``curves.png``: training curves of all runs, the seeds of a run (folders ``<run>/seed<k>``) as mean +- std;
- ``fixed_point_<run>.png``: Norm_a and cos(x^(a+1), x^a) per iMLP layer on test images (iMixer paper
  Figs. 3, 5, 6), for iMixer runs;
- ``energy_<run>.png``: the energy of the derived symmetric network along its continuous flow, started from a
  real test image's tokens, for symmetric parallelized-Mixer runs;
- ``symmetry.md``: the weight-symmetry index of every MLP of every Mixer-type run; ``symmetry_by_run.md``: the
  same as mean +- std over the seeds of each run;
- ``rank_collapse.png``, ``rank_collapse.md``: token cosine similarity and distance from rank 1 per layer of every
  ViT run, mean +- std over the seeds of each run (folders ``<run>/seed<k>``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixers import VisionTransformer

from . import analysis
from .data import build_datasets
from .train import build_model, load_checkpoint, load_config

__all__ = ["find_runs", "load_run", "main"]


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("summary.json"))


def load_run(run: Path):
    """(model with the run's final weights, config, test dataset) for a finished run folder."""
    cfg = load_config(str(run / "config.yaml"))
    _, test_ds, info = build_datasets(cfg.data, seed=cfg.seed)
    model = build_model(cfg, info.num_classes, info.in_chans, info.img_size)
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    return model.eval(), cfg, test_ds


def _label(run: Path, root: Path) -> str:
    return str(run.relative_to(root)).replace("/", "_") or run.name


def _group(run: Path, root: Path) -> str:
    """The run's name without its seed folder: ``vit/seed1`` -> ``vit``."""
    rel = run.relative_to(root) if run != root else Path(run.name)
    return str(rel.parent if rel.name.startswith("seed") and str(rel.parent) != "." else rel)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="a run folder or a folder of runs")
    p.add_argument("--out", type=Path, default=Path("outputs/analysis"))
    p.add_argument("--images", type=int, default=16, help="test images for the fixed-point analysis")
    args = p.parse_args(argv)
    runs = find_runs(args.runs)
    if not runs:
        p.error(f"no finished runs (summary.json) below {args.runs}")
    args.out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Path]] = {}
    for r in runs:
        groups.setdefault(_group(r, args.runs), []).append(r)
    analysis.training_curves({g: [r / "metrics.jsonl" for r in rs] for g, rs in groups.items()},
                             args.out / "curves.png")
    by_run: dict[str, list[list[dict]]] = {}
    report: dict = {"runs": [str(r) for r in runs], "symmetry": [], "fixed_point": {}, "energy": {},
                    "rank_collapse": {}}
    for run in runs:
        label = _label(run, args.runs)
        model, _, test_ds = load_run(run)
        images = torch.stack([test_ds[i][0] for i in range(min(args.images, len(test_ds)))])
        if isinstance(model, VisionTransformer):
            report["rank_collapse"].setdefault(_group(run, args.runs), []).append(
                analysis.rank_collapse(model, images))
            continue
        kind = getattr(getattr(model, "cfg", None), "block", "mixer")
        if kind in ("imixer", "limixer"):
            fp = analysis.fixed_point_convergence(model, images, path=args.out / f"fixed_point_{label}.png")
            report["fixed_point"][label] = fp
        form = getattr(model, "cfg", None) and model.cfg.block_kwargs.get("form")
        if kind == "paramixer" and form in ("symmetric", "tied"):
            en = analysis.energy_along_flow(model, images[:1], path=args.out / f"energy_{label}.png")
            report["energy"][label] = {k: en[k] for k in ("max_rise", "max_rise_rel", "caveats")}
        try:
            rows = analysis.symmetry_index(model)
        except (ValueError, TypeError):
            rows = []
        for r in rows:
            report["symmetry"].append({"run": label, **r})
        by_run.setdefault(_group(run, args.runs), []).append(rows)
    (args.out / "symmetry.md").write_text(analysis.symmetry_table(report["symmetry"]) + "\n")
    (args.out / "symmetry_by_run.md").write_text(analysis.symmetry_report(by_run) + "\n")
    if report["rank_collapse"]:
        md = analysis.rank_collapse_report(report["rank_collapse"], path=args.out / "rank_collapse.png")
        (args.out / "rank_collapse.md").write_text(md + "\n")
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}: curves.png, symmetry.md, symmetry_by_run.md, report.json and per-run figures for "
          f"{len(runs)} runs")
    return report


if __name__ == "__main__":
    main()
