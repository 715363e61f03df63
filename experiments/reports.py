"""Cross-run reports, from run summaries, run folders and their analysis records (markdown out, a PNG).

- `tables`: a sweep's tables. `table`: each run's best and last test top-1, mean +- std over seeds, with each seed's
  `machine`; `comparison` and `paired_differences`: last test top-1 differences paired by seed, with the 95 % CI of
  the mean and the `tost` p-value of equivalence within a margin ("no difference" is claimed only where it says so).
- `symmetry_trajectories`: the weight-symmetry index corr(W1^T, W2) of every run at initialisation (summary.json's
  ``symmetry_init``) and after every epoch (metrics.jsonl's ``sym_corr_*``), mean +- std over seeds: whether
  training breaks the symmetry by itself (Karakida, Ota & Taki 2024), or the weights never had it.
- `epoch_table`: one run's training and test top-1 after each epoch, one row per run: how a run got where it ended
  (whether it left chance and fell back, say), which a table of final accuracies hides.
- `seed_pairs`: seed by seed, "run / reference" of the last test top-1 and of the last block's token uniformity
  (``rank_collapse``, of the run's analysis): whether a mean difference comes from every seed or from one, and whether
  accuracy tracks collapse seed by seed.
- `certificate_report`: per iMixer block, ``DerivedBlock.certificate``'s bound on Lip(F) and the measured rate of
  the trained fixed-point iteration (``analysis.fixed_point_convergence``), mean +- std over seeds: whether the
  trained token mixer contracts, with and without spectral normalisation (iMixer Table 3).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.stats

from .analysis import read_metrics
from .figures import mean_std, mean_std_cell, pyplot, save_figure
from .runs import read_summary

__all__ = ["EQUIVALENCE_MARGIN", "certificate_report", "comparison", "epoch_table", "machine", "paired_differences",
           "seed_pairs", "symmetry_trajectories", "symmetry_trajectory", "table", "tables", "tost"]

MLPS = ("tokens", "channels")
EQUIVALENCE_MARGIN = 0.5  # points of test top-1: paired differences within it count as no practical difference


def symmetry_trajectory(run: Path) -> dict[str, list[float]] | None:
    """{"epoch": [0, 1, ...], "tokens": [...], "channels": [...]} of one run folder: corr at initialisation (epoch
    0, from summary.json) and after each logged epoch; None when the run did not log it."""
    records = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    if not records or "sym_corr_tokens" not in records[0]:
        return None
    init = {}
    if (run / "summary.json").exists():
        init = read_summary(run).get("symmetry_init") or {}
    out: dict[str, list[float]] = {"epoch": [], **{m: [] for m in MLPS}}
    if init:
        out["epoch"].append(0)
        for m in MLPS:
            out[m].append(init.get(f"sym_corr_{m}", math.nan))
    for rec in records:
        out["epoch"].append(rec["epoch"])
        for m in MLPS:
            out[m].append(rec.get(f"sym_corr_{m}", math.nan))
    return out


def symmetry_trajectories(groups: Mapping[str, Sequence[Path]], *, path=None,
                          epochs: Sequence[int] = (0, 1, 5, 10)) -> str:
    """Markdown: per run (its seed folders) and MLP kind, corr(W1^T, W2) averaged over the blocks at the given
    ``epochs`` (0: initialisation) and at the last, mean +- std over seeds; runs without a logged index are left
    out. With ``path``, a figure of the same against the epoch (bands: +- std over seeds)."""
    head = " | ".join(f"epoch {e}" if e else "init" for e in epochs)
    lines = [f"| run | seeds | mlp | {head} | last |", "|---|---|---|" + "---|" * (len(epochs) + 1)]
    curves = {}
    for name, runs in groups.items():
        seeds = [t for t in (symmetry_trajectory(Path(r)) for r in runs) if t is not None]
        if not seeds:
            continue
        for m in MLPS:
            by_epoch: dict[int, list[float]] = {}
            for t in seeds:
                for e, v in zip(t["epoch"], t[m]):
                    if math.isfinite(v):
                        by_epoch.setdefault(e, []).append(v)
            if not by_epoch:
                continue
            curves[(name, m)] = {e: mean_std(v) for e, v in sorted(by_epoch.items())}
            last = [t[m][-1] for t in seeds]
            cells = [mean_std_cell(by_epoch[e], "+.3f", ".3f") if e in by_epoch else "–" for e in epochs]
            lines.append(f"| {name} | {len(seeds)} | {m} | " + " | ".join(cells) +
                         f" | {mean_std_cell(last, '+.3f', '.3f')} |")
    if path is not None and curves:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        # one colour per run (tab20: the default cycle repeats after 10 runs), then a new line style every 20
        names = list(dict.fromkeys(name for name, _ in curves))
        style = {name: (plt.get_cmap("tab20")(k % 20), ("-", "--", ":")[k // 20 % 3]) for k, name in enumerate(names)}
        for (name, m), stats in curves.items():
            ax = axes[MLPS.index(m)]
            xs = list(stats)
            mean = [stats[e][0] for e in xs]
            sd = [stats[e][1] for e in xs]
            colour, ls = style[name]
            ax.plot(xs, mean, marker="o", ms=2, lw=1.2, color=colour, ls=ls, label=name)
            ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                            color=colour, alpha=0.2)
        for ax, m in zip(axes, MLPS):
            ax.axhline(1.0, color="grey", lw=0.6, ls=":")
            ax.axhline(0.0, color="grey", lw=0.6, ls=":")
            ax.set(xlabel="epoch (0 = initialisation)", title=f"{m} MLPs: corr(W1ᵀ, W2), mean over blocks")
        axes[0].set_ylabel("corr (1 = tied, 0 = independent)")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        save_figure(fig, path)
    return "\n".join(lines)


def epoch_table(runs: Mapping[str, Path], keys: Sequence[str] = ("train_top1", "test_top1")) -> str:
    """Markdown: per run folder (``{"label": path}``), each of ``keys`` of its metrics.jsonl after every logged
    epoch, joined by arrows (one decimal; "–" where an epoch did not log it, e.g. training top-1 under mixup)."""
    keys = list(keys)
    names = {"train_top1": "train top-1 (%)", "test_top1": "test top-1 (%)", "train_loss": "train loss",
             "test_loss": "test loss"}
    lines = ["| run | epochs | " + " | ".join(f"{names.get(k, k)}, epoch 1 → last" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for label, run in runs.items():
        records = read_metrics(Path(run) / "metrics.jsonl")
        cells = [" → ".join("–" if r.get(k) is None else f"{r[k]:.1f}" for r in records) for k in keys]
        lines.append(f"| {label} | {len(records)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_pairs(summaries: dict[str, list[dict]], pairs: Sequence[Sequence[str]]) -> str:
    """Markdown: for each ``[run, reference]`` of ``pairs``, one row per measure with "run / reference" on every
    seed: the last test top-1 and, where both runs' summaries carry their analysis's ``rank_collapse`` (the sweep
    adds it from analysis.json), the last block's mean token cosine and distance from rank 1 ||X - 1x^T||/||X||.
    "–" where one of the two has not finished that seed. A mean over 3 seeds can hide that one seed made the
    difference; this shows it."""
    by_seed = {name: {r["seed"]: r for r in rows} for name, rows in summaries.items()}
    seeds = sorted({s for run, ref in pairs for s in by_seed[run] if s in by_seed[ref]})
    lines = ["| run / reference | measure | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    measures = (("last top-1 (%)", lambda r: r.get("last_top1"), ".2f"),
                ("last-block cosine", lambda r: (r.get("rank_collapse") or {}).get("cosine", [None])[-1], ".3f"),
                ("last-block ‖X − 1xᵀ‖/‖X‖", lambda r: (r.get("rank_collapse") or {}).get("residual", [None])[-1],
                 ".3g"))
    for run, ref in pairs:
        both = {s: (by_seed[run][s], by_seed[ref][s]) for s in seeds if s in by_seed[run] and s in by_seed[ref]}
        for label, read, fmt in measures:
            values = {s: (read(a), read(b)) for s, (a, b) in both.items()}
            if not values or any(v is None for pair in values.values() for v in pair):
                continue
            cells = [f"{values[s][0]:{fmt}} / {values[s][1]:{fmt}}" if s in values else "–" for s in seeds]
            lines.append(f"| {run} / {ref} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def certificate_report(groups: Mapping[str, Sequence[Mapping]]) -> str:
    """Markdown from ``fixed_point_convergence`` results grouped by run (``{"imixer_nosn[n_iter=2]": [seed0,
    ...]}``): per block, the bound Lip(F) <= ... of the trained block (eval mode), on how many seeds it is
    certified (< 1), the measured asymptotic rate of the fixed-point iteration from the block's own input (the
    geometric mean of the later residual ratios of ``probe_iter`` iterations: < 1 contracts) and the last
    Norm_a of the block's own iterations; mean +- std over seeds. Results without a certificate are left out."""
    lines = ["| run | seeds | block | Lip(F) bound | certified | measured rate | Norm_a, last own iteration |",
             "|---|---|---|---|---|---|---|"]
    for name, results in groups.items():
        results = [r for r in results if r and all("certificate" in row for row in r["layers"])]
        if not results:
            continue
        blocks = [row["block"] for row in results[0]["layers"]]
        multi = len(set(blocks)) < len(blocks)  # a block with several solves (a spec's arms): name the layer
        for k, row in enumerate(results[0]["layers"]):
            rows = [r["layers"][k] for r in results]
            certs = [r["certificate"] for r in rows]
            bound = mean_std_cell([c["lipschitz_bound"] for c in certs], ".3g", ".2g")
            rates = [c["rate"] for c in certs if math.isfinite(c["rate"])]
            rate = mean_std_cell(rates, ".3g", ".2g") if rates else "–"
            norm = mean_std_cell([r["norm"][-1] for r in rows], ".3g", ".2g") if rows[0]["norm"] else "–"
            certified = sum(bool(c["certified"]) for c in certs)
            block = f"{row['block']} ({row['layer']})" if multi else row["block"]
            lines.append(f"| {name} | {len(rows)} | {block} | {bound} | {certified} of {len(rows)} | "
                         f"{rate} | {norm} |")
    return "\n".join(lines)


def machine(summary: dict) -> str:
    """What a run ran on, from its summary's ``env``: CPU or GPU model, CPU capability and bf16 kernels where
    recorded, torch version (runs that differ here may differ in their last digits, or in speed)."""
    env = summary.get("env") or {}
    parts = [env.get("hardware", "?")]
    if env.get("cpu_capability"):
        parts.append(env["cpu_capability"] + (", bf16 kernels" if env.get("cpu_bf16_kernels") else ""))
    parts.append(f"torch {env.get('torch', '?')}")
    return ", ".join(parts)


def _setup(summary: dict, with_precision: bool) -> str:
    """`machine`, and the run's precision (bf16 autocast or float32) where the runs of a table differ in it."""
    return machine(summary) + (f", {summary.get('precision', '?')}" if with_precision else "")


def _machine_letters(summaries: dict[str, list[dict]]) -> tuple[dict[str, str], bool]:
    """Machine description -> a letter (A, B, ...), in order of first appearance, and whether the runs differ in
    precision: then the description names it too, so that runs of one machine in two precisions get two letters
    instead of passing for alike."""
    rows = [r for group in summaries.values() for r in group]
    mixed = len({r.get("precision") for r in rows}) > 1
    letters: dict[str, str] = {}
    for r in rows:
        letters.setdefault(_setup(r, mixed), chr(ord("A") + len(letters)))
    return letters, mixed


def table(summaries: dict[str, list[dict]]) -> str:
    """Markdown: run, seeds, best test top-1 (the maximum over epochs) and last (the final epoch's), each mean +- std
    over seeds, parameters, images/s (each seed's median epoch, averaged over seeds), and the machine of each
    seed, as letters explained under the table (with the precision, where the runs differ in it)."""
    letters, mixed = _machine_letters(summaries)
    lines = ["| model | seeds | best top-1 (%) | last top-1 (%) | params | images/s | machine per seed |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in summaries.items():
        if not rows:
            lines.append(f"| {name} | 0 | – | – | – | – | – |")
            continue
        params = rows[0]["params"]
        ips = sum(r["images_per_s"] for r in rows) / len(rows)
        where = " ".join(letters[_setup(r, mixed)] for r in rows)
        lines.append(f"| {name} | {len(rows)} | {mean_std_cell([r['best_top1'] for r in rows])} | "
                     f"{mean_std_cell([r['last_top1'] for r in rows])} | {params:,} | {ips:.0f} | {where} |")
    if letters:
        lines.append("\nMachines: " + "; ".join(f"{v} = {k}" for k, v in letters.items()) + ".")
    return "\n".join(lines)


def tost(diffs: list[float], margin: float) -> float:
    """The p-value of the paired two one-sided tests (TOST) of equivalence within +-``margin``: the larger of the
    one-sided p-values of H0 mean <= -margin and H0 mean >= +margin (Student's t, n - 1 dof). Below 0.05 the
    90 % CI of the mean lies inside (-margin, +margin): the difference is smaller than the margin at 5 %. NaN
    with fewer than 2 pairs; with no spread at all, 0 if the mean lies inside the margin and 1 if not."""
    n = len(diffs)
    if n < 2:
        return math.nan
    se = scipy.stats.sem(diffs)
    if not se > 0:
        return 0.0 if abs(np.mean(diffs)) < margin else 1.0
    lower = scipy.stats.t.sf((np.mean(diffs) + margin) / se, n - 1)
    upper = scipy.stats.t.cdf((np.mean(diffs) - margin) / se, n - 1)
    return float(max(lower, upper))


def _difference_row(label: str, rows: list[dict], reference: list[dict], margin: float) -> str:
    """One markdown row: ``rows``' last test top-1 minus ``reference``'s, paired by seed (see `comparison`)."""
    ref = {r["seed"]: r for r in reference}
    pairs = [(r, ref[r["seed"]]) for r in rows if r["seed"] in ref]
    diffs = [a["last_top1"] - b["last_top1"] for a, b in pairs]
    if not diffs:
        return f"| {label} | 0 | – | – | – | – | – |"
    ci, p = "–", "–"
    if len(diffs) > 1:
        mean, se = np.mean(diffs), scipy.stats.sem(diffs)  # no spread (the same difference on every seed):
        lo, hi = scipy.stats.t.interval(0.95, len(diffs) - 1, loc=mean, scale=se) if se > 0 else (mean, mean)
        ci = f"[{lo:+.2f}, {hi:+.2f}]"
        p = f"{tost(diffs, margin):.3f}"
    same = sum(_setup(a, True) == _setup(b, True) for a, b in pairs)
    return (f"| {label} | {len(diffs)} | {mean_std_cell(diffs, '+.2f', '.2f')} | {ci} | "
            f"{sum(d > 0 for d in diffs)} of {len(diffs)} | {p} | {same} of {len(diffs)} |")


def comparison(summaries: dict[str, list[dict]], reference: str, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Markdown: each run's last test top-1 minus ``reference``'s on the same seed, mean +- std over the seeds both
    finished, the 95 % confidence interval of the mean difference (Student's t with n - 1 degrees of freedom, the
    paired t-test's: it excludes 0 where that test rejects "no difference" at 5 %), on how many of those seeds
    the run is ahead (ties count as not ahead), the TOST p-value of equivalence within +-``margin`` points (below
    0.05: no difference as large as the margin, at 5 %), and on how many seeds both runs ran on the same machine
    in the same precision.
    Every row pairs with the same ``reference`` run of each seed, so the rows are not independent of each
    other; the table says so."""
    lines = [f"| model | seeds paired | last top-1 − {reference} (points) | 95 % CI | ahead on | "
             f"TOST ±{margin:g} p | same machine |", "|---|---|---|---|---|---|---|"]
    lines += [_difference_row(name, rows, summaries[reference], margin)
              for name, rows in summaries.items() if name != reference]
    lines.append(f"\nEvery row pairs with the same {reference} run of each seed: the rows share it and are not "
                 "independent of each other.")
    return "\n".join(lines)


def paired_differences(summaries: dict[str, list[dict]], pairs: list[list[str]],
                       margin: float = EQUIVALENCE_MARGIN) -> str:
    """Markdown: for each ``[run, reference]`` of ``pairs``, the run's last test top-1 minus the reference's,
    paired by seed, with the columns of `comparison`; names the references that several rows share (those rows
    are not independent of each other)."""
    lines = [f"| run − reference | seeds paired | last top-1 difference (points) | 95 % CI | ahead on | "
             f"TOST ±{margin:g} p | same machine |", "|---|---|---|---|---|---|---|"]
    lines += [_difference_row(f"{run} − {ref}", summaries[run], summaries[ref], margin) for run, ref in pairs]
    counts = collections.Counter(ref for _, ref in pairs)
    shared = [f"{ref} ({n} rows)" for ref, n in counts.items() if n > 1]
    if shared:
        lines.append(f"\nRows with the same reference pair with the same run of each seed and are not independent of "
                     f"each other: {', '.join(shared)}.")
    return "\n".join(lines)


def tables(summaries: dict[str, list[dict]], spec: dict) -> str:
    """A sweep's markdown: the `table` of every run, a `comparison` for each run of its ``compare`` list, and the
    `paired_differences` and `seed_pairs` of its ``pairs``, if any."""
    margin = spec.get("equivalence_margin", EQUIVALENCE_MARGIN)
    parts = [table(summaries)] + [comparison(summaries, ref, margin) for ref in spec.get("compare", [])]
    if spec.get("pairs"):
        parts += [paired_differences(summaries, spec["pairs"], margin), seed_pairs(summaries, spec["pairs"])]
    return "\n\n".join(parts)
