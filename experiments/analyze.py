"""Figures and tables from finished training runs (``experiments.train`` output folders).

    python -m experiments.analyze --runs experiments/results/sweep_fashion --out docs/figures [--images 16]

For every run below ``--runs`` (a folder with summary.json and config.yaml) it analyses the final weights in
``checkpoint.pt``: it rebuilds the model from its config, loads them, and saves the results as JSON in the run's
``analysis.json``. A run folder kept without its checkpoint (as the sweeps keep theirs in git) is read from that
``analysis.json`` instead, so tables and figures can be rebuilt on any checkout (``experiments.sweep`` writes it as
each run finishes). A run with neither file (its checkpoint lost before it was analysed) is left out of the weight
analyses, named on stdout and in report.json's ``not_analysed``; its training curves still count. It writes:

- ``curves.png``: training curves of all runs, the seeds of a run (folders ``<run>/seed<k>``) as mean +- std;
- ``fixed_point_<run>.png``: Norm_a and cos(x^(a+1), x^a) per iMLP layer on test images (iMixer paper
  Figs. 3, 5, 6), for iMixer runs;
- ``energy_<run>.png``: the energy of the derived symmetric network along its continuous flow, started from a
  real test image's tokens, for symmetric parallelized-Mixer runs;
- ``symmetry.md``: the weight-symmetry index of every MLP of every Mixer-type run; ``symmetry_by_run.md``: the
  same as mean +- std over the seeds of each run (when there is a Mixer-type run);
- ``symmetry_breaking.png``, ``symmetry_breaking.md``: last test top-1 and mean corr(W1^T, feedback) of the
  symmetry-breaking parallelized-Mixer runs against lambda, with the other parallelized and serial Mixer runs as
  references, mean +- std over seeds (when there is a run with form "broken");
- ``rank_collapse.png``, ``rank_collapse.md``: token cosine similarity and distance from rank 1 per layer of every
  ViT run, mean +- std over the seeds of each run (folders ``<run>/seed<k>``);
- ``symmetry_trajectory.png``, ``symmetry_trajectory.md``: corr(W1^T, W2) at initialisation and after every epoch,
  mean over blocks and +- std over seeds, for runs that logged it (``experiments.reports.symmetry_trajectories``);
- ``fixed_point_certificate.md``: per derived iMixer block, the contraction bound of the trained weights and the
  measured rate of its fixed-point iteration, mean +- std over seeds (``experiments.reports.certificate_report``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from derive import DerivedMixer
from mixers import VisionTransformer

from . import analysis, reports, symmetry
from .build import build_model
from .config import ConfigError, add_import_argument, import_modules, load_config
from .data import build_datasets
from .datafiles import CorruptDatasetError, DatasetNotFoundError
from .runs import CheckpointError, RunFileError, atomic_write, load_checkpoint, read_summary

__all__ = ["IMAGES", "analyse_run", "find_runs", "load_run", "main", "run_record"]

IMAGES = 16  # test images each run is analysed on, unless --images says otherwise


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("summary.json"))


class StaleCheckpointError(CheckpointError):
    """A finished run's checkpoint.pt holds the weights of an earlier epoch than its last (a copy restored from an
    older commit, say): analysing it would describe another model than the run's."""


def load_run(run: Path):
    """(model with the run's final weights, config, test dataset) for a finished run folder; CheckpointError
    naming the run when its checkpoint does not fit its model, StaleCheckpointError when it is not the weights the
    run finished with (summary.json's ``epochs``)."""
    cfg = load_config(str(run / "config.yaml"))
    ckpt = load_checkpoint(run / "checkpoint.pt")
    final = cfg.epochs
    if (run / "summary.json").exists():
        final = read_summary(run).get("epochs", final)
    if (ckpt["epoch"], ckpt.get("step", 0)) != (final, 0):
        raise StaleCheckpointError(
            f"run {str(run)!r}: its checkpoint.pt holds the weights of epoch {ckpt['epoch']}"
            + (f" and {ckpt['step']} steps" if ckpt.get("step") else "") + f", the run finished after epoch {final}: "
            "not its final weights")
    _, test_ds, info = build_datasets(cfg.data, seed=cfg.seed)
    model = build_model(cfg, info.num_classes, info.in_chans, info.img_size)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"run {str(run)!r}: its checkpoint.pt does not fit its model {cfg.model!r} "
                              f"(config.yaml): {str(e).splitlines()[0]}") from e
    return model.eval(), cfg, test_ds


def _label(run: Path, root: Path) -> str:
    if run == root:  # --runs is the run folder itself: its own name (its run's name when it is a seed folder)
        return f"{run.parent.name}_{run.name}" if run.name.startswith("seed") else run.name
    return str(run.relative_to(root)).replace("/", "_")


def _group(run: Path, root: Path) -> str:
    """The run's name without its seed folder: ``vit/seed1`` -> ``vit``."""
    rel = run.relative_to(root) if run != root else Path(run.parent.name) / run.name
    return str(rel.parent if rel.name.startswith("seed") and str(rel.parent) != "." else rel)


def analyse_run(run: Path, images: int) -> dict:
    """The analyses of a finished run's final weights on its first ``images`` test images, as plain JSON data:
    {"images", "model" ({"block", "form", "lam"}), "fixed_point" (iMixer runs), "energy" (symmetric
    parallelized-Mixer runs), "symmetry" (Mixer-type runs), "rank_collapse" (ViT runs)}."""
    model, _, test_ds = load_run(run)
    x = torch.stack([test_ds[i][0] for i in range(min(images, len(test_ds)))])
    record: dict = {"images": images}
    if isinstance(model, VisionTransformer):
        record["rank_collapse"] = analysis.rank_collapse(model, x)
        return record
    cfg = getattr(model, "cfg", None)
    kind = getattr(cfg, "block", "mixer")  # timm's own MlpMixer has no cfg
    form = cfg.block_kwargs.get("form") if cfg is not None else None
    record["model"] = {"block": kind, "form": form, "lam": getattr(cfg, "lam", None)}
    implicit = isinstance(model, DerivedMixer) and any(br.implicit for b in model.blocks for top in b.branches
                                                       for br in top.walk())
    if kind in ("imixer", "limixer") or implicit:  # any network with a fixed-point solve, a spec's too
        record["fixed_point"] = analysis.fixed_point_convergence(model, x)
    if kind == "paramixer" and form in ("symmetric", "tied"):
        record["energy"] = analysis.energy_along_flow(model, x[:1])
    try:
        record["symmetry"] = symmetry.symmetry_index(model)
    except (ValueError, TypeError):
        record["symmetry"] = []
    return record


def run_record(run: Path, images: int) -> dict:
    """``analyse_run`` of a run with its checkpoint, saved to ``run/analysis.json``; without the checkpoint, or with
    one that is not the run's final weights, the saved record (an error names the folder if there is neither, or
    the file if it used another ``images``)."""
    saved = run / "analysis.json"
    if (run / "checkpoint.pt").exists():
        try:
            record = analyse_run(run, images)
        except StaleCheckpointError as e:
            if not saved.exists():
                raise
            print(f"warning: {e}; its analysis.json, of the final weights, is kept", file=sys.stderr)
        else:
            atomic_write(saved, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
            return record
    if not saved.exists():
        raise FileNotFoundError(f"{run}: neither checkpoint.pt (the final weights) nor analysis.json (their "
                                "analysis) is there, so the run cannot be analysed")
    record = json.loads(saved.read_text())
    if "model" not in record and "rank_collapse" not in record:
        raise ValueError(f"{saved}: written before analysis.json recorded the model (block, form, lam); run "
                         "experiments.analyze where the run's checkpoint.pt is to rewrite it")
    if record.get("images") != images:
        raise ValueError(f"{saved}: analysed on {record.get('images')} test images, not --images {images}; run "
                         f"with --images {record.get('images')}, or where the run's checkpoint.pt is")
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="a run folder or a folder of runs")
    p.add_argument("--out", type=Path, default=Path("outputs/analysis"))
    p.add_argument("--images", type=int, default=IMAGES, help="test images for the fixed-point analysis")
    add_import_argument(p)
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images {args.images}: the analyses need at least one test image")
    try:
        import_modules(args.imports)
    except ConfigError as e:
        p.error(str(e))
    runs = find_runs(args.runs)
    if not runs:
        p.error(f"no finished runs (summary.json) below {args.runs}")
    unread = {}
    for r in runs:
        try:
            read_summary(r)
        except (OSError, RunFileError) as e:  # the other runs still tell their story
            print(f"warning: {r}: left out, {e}", file=sys.stderr)
            unread[r] = str(e)
    runs = [r for r in runs if r not in unread]
    if not runs:
        p.error(f"no run below {args.runs} has a readable summary.json")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: a file, not a folder")
    args.out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Path]] = {}
    for r in runs:
        groups.setdefault(_group(r, args.runs), []).append(r)
    curves: dict[str, list[Path]] = {}
    for g, rs in groups.items():
        for r in rs:
            try:
                analysis.read_metrics(r / "metrics.jsonl")
            except (OSError, ValueError) as e:  # the run's other analyses go on; its curve is left out
                print(f"warning: {r}: left out of the training curves, its metrics cannot be read ({e})",
                      file=sys.stderr)
                continue
            curves.setdefault(g, []).append(r / "metrics.jsonl")
    analysis.training_curves(curves, args.out / "curves.png")
    by_run: dict[str, list[list[dict]]] = {}
    fixed_points: dict[str, list[dict]] = {}
    report: dict = {"runs": [str(r) for r in runs], "symmetry": [], "fixed_point": {}, "energy": {},
                    "rank_collapse": {}, "symmetry_breaking": {}, "not_analysed": [],
                    "failed": [{"run": str(r), "error": e} for r, e in unread.items()]}
    for run in runs:
        label, group = _label(run, args.runs), _group(run, args.runs)
        if not (run / "checkpoint.pt").exists() and not (run / "analysis.json").exists():
            # weights and analysis both gone: the other runs still tell their story (a missing dataset still raises)
            print(f"warning: {run}: neither checkpoint.pt (the final weights) nor analysis.json (their analysis) is "
                  "there; left out of the weight analyses", file=sys.stderr)
            report["not_analysed"].append(str(run))
            continue
        try:
            record = run_record(run, args.images)
        except (DatasetNotFoundError, CorruptDatasetError):
            raise  # the data is missing for every run alike
        except Exception as e:  # one broken run (truncated checkpoint, another model's weights, ...): skip it
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"warning: {run}: not analysed, {message}", file=sys.stderr)
            report["failed"].append({"run": str(run), "error": message})
            continue
        if "rank_collapse" in record:
            report["rank_collapse"].setdefault(group, []).append(record["rank_collapse"])
            continue
        if "fixed_point" in record:
            report["fixed_point"][label] = record["fixed_point"]
            fixed_points.setdefault(group, []).append(record["fixed_point"])
            analysis.plot_fixed_point(record["fixed_point"], args.out / f"fixed_point_{label}.png")
        if "energy" in record:
            report["energy"][label] = {k: record["energy"][k] for k in ("max_rise", "max_rise_rel", "caveats")}
            analysis.plot_energy(record["energy"], args.out / f"energy_{label}.png")
        report["symmetry"] += [{"run": label, **r} for r in record["symmetry"]]
        by_run.setdefault(group, []).append(record["symmetry"])
        model = record["model"]
        if model["block"] in ("mixer", "paramixer") and record["symmetry"]:
            top1 = read_summary(run)["last_top1"]
            corr = statistics.mean(r["corr"] for r in record["symmetry"])
            report["symmetry_breaking"].setdefault(group, []).append(
                {"form": model["form"], "lam": model["lam"], "top1": top1, "corr": corr})
    if report["symmetry"]:  # (ViT runs have no two-matrix MLPs to index)
        (args.out / "symmetry.md").write_text(symmetry.symmetry_table(report["symmetry"]) + "\n")
        (args.out / "symmetry_by_run.md").write_text(symmetry.symmetry_report(by_run) + "\n")
    if any(s["form"] == "broken" for seeds in report["symmetry_breaking"].values() for s in seeds):
        md = symmetry.symmetry_breaking(report["symmetry_breaking"], path=args.out / "symmetry_breaking.png")
        (args.out / "symmetry_breaking.md").write_text(md + "\n")
    md = reports.symmetry_trajectories({g: [m.parent for m in ms] for g, ms in curves.items()},
                                       path=args.out / "symmetry_trajectory.png")
    if md.count("\n") > 1:
        (args.out / "symmetry_trajectory.md").write_text(md + "\n")
    md = reports.certificate_report(fixed_points)
    if md.count("\n") > 1:
        (args.out / "fixed_point_certificate.md").write_text(md + "\n")
    if report["rank_collapse"]:
        md = analysis.rank_collapse_report(report["rank_collapse"], path=args.out / "rank_collapse.png")
        (args.out / "rank_collapse.md").write_text(md + "\n")
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    analysed = len(runs) - len(report["not_analysed"]) - len(report["failed"])
    curved = sum(map(len, curves.values()))
    print(f"wrote {args.out}: curves.png ({curved} runs), report.json, the tables and the "
          f"per-run figures ({analysed} runs analysed, {len(report['not_analysed'])} without weights, "
          f"{len(report['failed'])} failed" + (": " + ", ".join(f["run"] for f in report["failed"]) if
                                                report["failed"] else "") + ")")
    return report


if __name__ == "__main__":
    main()
