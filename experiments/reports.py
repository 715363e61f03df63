"""Cross-run reports for issue 24's claims, from run folders and their analysis records (plain data out, a PNG).

- `symmetry_trajectories`: the weight-symmetry index corr(W1^T, W2) of every run at initialisation (summary.json's
  ``symmetry_init``) and after every epoch (metrics.jsonl's ``sym_corr_*``), mean +- std over seeds: whether
  training breaks the symmetry by itself (Karakida, Ota & Taki 2024), or the weights never had it.
- `certificate_report`: per iMixer block, ``DerivedBlock.certificate``'s bound on Lip(F) and the measured rate of
  the trained fixed-point iteration (``analysis.fixed_point_convergence``), mean +- std over seeds: whether the
  trained token mixer contracts, with and without spectral normalisation (iMixer Table 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .analysis import read_metrics
from .figures import mean_std, mean_std_cell, pyplot, save_figure
from .runs import read_summary

__all__ = ["certificate_report", "symmetry_trajectories", "symmetry_trajectory"]

MLPS = ("tokens", "channels")


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
        colours = {}
        for (name, m), stats in curves.items():
            ax = axes[MLPS.index(m)]
            xs = list(stats)
            mean = [stats[e][0] for e in xs]
            sd = [stats[e][1] for e in xs]
            (line,) = ax.plot(xs, mean, marker="o", ms=2, lw=1.2, color=colours.get(name), label=name)
            colours.setdefault(name, line.get_color())
            ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                            color=line.get_color(), alpha=0.2)
        for ax, m in zip(axes, MLPS):
            ax.axhline(1.0, color="grey", lw=0.6, ls=":")
            ax.axhline(0.0, color="grey", lw=0.6, ls=":")
            ax.set(xlabel="epoch (0 = initialisation)", title=f"{m} MLPs: corr(W1ᵀ, W2), mean over blocks")
        axes[0].set_ylabel("corr (1 = tied, 0 = independent)")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        save_figure(fig, path)
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
