"""The weight-symmetry index of two-matrix MLPs (Karakida, Ota & Taki 2024: tied / untied / symmetry-broken MLPs).

- `symmetry_index`, `symmetry_table`, `symmetry_report`, `xavier_reference`: how close W2 is to W1^T in every
  two-matrix MLP, per model and as mean +- std over the seeds of several runs.
- `symmetry_scalars`: the same as flat metrics, which the training loop logs every epoch.
- `symmetry_breaking`: test top-1 and weight symmetry of the parallelized Mixer against the symmetry-breaking
  weight lambda, with the symmetric, untied and serial Mixers as references.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from derive import DerivedBlock
from mixers import AsymMlp, SymMlp

from .figures import mean_std, mean_std_cell, pyplot, save_figure

__all__ = ["mlp_label", "symmetry_breaking", "symmetry_index", "symmetry_report", "symmetry_scalars",
           "symmetry_table", "xavier_reference"]


def _pair_index(w1: Tensor, w2: Tensor) -> tuple[float, float]:
    """corr = <W1^T, W2>_F of the Frobenius-normalised matrices, antisym = ||A|| / (||S|| + ||A||) with
    S, A = (W2 +- W1^T) / 2 of the normalised matrices; NaN when a matrix is zero."""
    w1, w2 = w1.detach().double(), w2.detach().double()
    if w2.shape != w1.T.shape:
        raise ValueError(f"symmetry index: W2 {tuple(w2.shape)} does not match W1^T {tuple(w1.T.shape)}")
    n1, n2 = w1.norm(), w2.norm()
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan
    a, b = w1.T / n1, w2 / n2
    corr = float((a * b).sum())
    s, d = float(((b + a) / 2).norm()), float(((b - a) / 2).norm())
    return corr, d / (s + d)


def _mlp_pair(m: nn.Module) -> tuple[Tensor, Tensor, str] | None:
    """(W1 (H, in), W2 (in, H), description) of a hand-written / timm MLP, or None when it has no such pair."""
    if isinstance(m, SymMlp):  # one matrix W: W2 = W^T by construction
        w = m.fc2.weight
        return w, w.T, "SymMlp (tied)"
    if isinstance(m, AsymMlp):  # effective feedback W1^T + W2
        w1 = m.fc1.weight
        return w1, w1.T + m.fc2.weight, "AsymMlp (W1^T + W2)"
    fc1, fc2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
    if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc2.weight.shape == fc1.weight.T.shape:
        return fc1.weight, fc2.weight, type(m).__name__
    return None


def symmetry_index(model: nn.Module) -> list[dict]:
    """Weight-symmetry index of every two-matrix MLP of a Mixer (Karakida, Ota & Taki 2024, tied vs untied).

    For W1 (H, in) and W2 (in, H), each divided by its Frobenius norm: corr = <W1^T, W2>_F in [-1, 1]
    (1: perfectly tied) and antisym = ||A|| / (||S|| + ||A||) in [0, 1] with S, A = (W2 +- W1^T) / 2 (0: tied).
    Both depend on corr only (||S||^2 = (1 + corr) / 2, ||A||^2 = (1 - corr) / 2), so independent draws give
    corr ~ 0 and antisym ~ 0.5 (see ``xavier_reference``). Raw weights: LayerNorm gains are not folded in.

    Which pair: fc1 / fc2 (timm's and the hand-written Mlp, the outer pair of iMlp / LiMlp, the untied
    parallelized Mixer); SymMlp has one matrix W, reported as W1 = W, W2 = W^T (corr 1, antisym 0 by
    construction); AsymMlp compares W1^T with the effective feedback W1^T + W2; a derived block's
    visible-layer synapses give W1 = ``weight`` (n_b, n_a) and W2 = ``feedback_weight()`` (n_a, n_b).
    Returns one dict per MLP: {"block", "mlp" ("tokens" | "channels"), "corr", "antisym", "module"[, "synapse"
    (derived blocks: the synapse's name, which tells apart two arms along one axis)]}.
    """
    rows = []
    for i, blk in enumerate(getattr(model, "blocks", [])):
        if isinstance(blk, DerivedBlock):
            rank = len(blk.net.layers[blk.visible].shape)
            for br in blk.branches:
                syn = br.synapse
                mlp = "tokens" if syn.axis % rank == rank - 2 else "channels"  # (S, C) states: S is the token axis
                corr, anti = _pair_index(syn.weight, syn.feedback_weight())
                rows.append({"block": i, "mlp": mlp, "corr": corr, "antisym": anti,
                             "module": f"DenseSynapse({syn.form})", "synapse": syn.name})
            continue
        for attr, mlp in (("mlp_tokens", "tokens"), ("mlp_channels", "channels")):
            pair = _mlp_pair(getattr(blk, attr, None))
            if pair is not None:
                corr, anti = _pair_index(pair[0], pair[1])
                rows.append({"block": i, "mlp": mlp, "corr": corr, "antisym": anti, "module": pair[2]})
    if not rows:
        raise ValueError(f"symmetry_index: found no two-matrix MLP in {type(model).__name__}")
    return rows


def symmetry_scalars(model: nn.Module) -> dict[str, float]:
    """`symmetry_index`'s corr as flat metrics, for logging every epoch: ``sym_corr_tokens`` and
    ``sym_corr_channels`` (means over the blocks) and ``sym_corr_b<i>_<mlp>`` per MLP; {} for a model without
    two-matrix MLPs (a ViT)."""
    try:
        rows = symmetry_index(model)
    except ValueError:
        return {}
    out = {}
    for mlp in ("tokens", "channels"):
        values = [r["corr"] for r in rows if r["mlp"] == mlp]
        if values:
            out[f"sym_corr_{mlp}"] = statistics.fmean(values)
    label = mlp_label(rows)
    out.update({f"sym_corr_b{r['block']}_{label(r, '_')}": r["corr"] for r in rows})
    return out


def mlp_label(rows: Sequence[Mapping]):
    """label(row, sep): the row's MLP kind ("tokens" / "channels"), followed by its synapse's name where a block has
    two synapses of one kind (a network spec with two arms along the tokens, say), so that no two rows of a block
    share a label: ``tokens_v-m`` with sep "_", ``tokens (v-m)`` with sep " (" (closed)."""
    seen: set = set()
    shared: set = set()
    for r in rows:
        key = (r["block"], r["mlp"])
        (shared if key in seen else seen).add(key)
    kinds = {r["mlp"] for r in rows if (r["block"], r["mlp"]) in shared}

    def label(r: Mapping, sep: str = " (") -> str:
        if r["mlp"] not in kinds or "synapse" not in r:
            return r["mlp"]
        return f"{r['mlp']}{sep}{r['synapse']}" + (")" if sep == " (" else "")
    return label


def symmetry_table(rows: Sequence[Mapping]) -> str:
    """A markdown table of ``symmetry_index`` rows (with a run column when the rows carry one)."""
    run = any("run" in r for r in rows)
    lines = [("| run " if run else "") + "| block | mlp | corr | antisym | module |",
             ("|:---" if run else "") + "|---:|:---|---:|---:|:---|"]
    labels = {run: mlp_label([q for q in rows if q.get("run") == run]) for run in {r.get("run") for r in rows}}
    for r in rows:
        label = labels[r.get("run")]
        lines.append((f"| {r.get('run', '')} " if run else "") +
                     f"| {r['block']} | {label(r)} | {r['corr']:.4f} | {r['antisym']:.4f} | {r.get('module', '')} |")
    return "\n".join(lines)


def symmetry_report(groups: Mapping[str, Sequence[Sequence[Mapping]]]) -> str:
    """Mean +- std over seeds of `symmetry_index` rows, grouped by run (``{"mixer": [seed0 rows, seed1 rows]}``):
    a markdown table with one line per run and MLP kind (tokens, channels), corr block by block and antisym
    averaged over the blocks. Runs without rows are left out."""
    lines = ["| run | seeds | mlp | corr, block 0 → last | antisym, mean over blocks |", "|---|---|---|---|---|"]
    for name, seeds in groups.items():
        seeds = [rows for rows in seeds if rows]
        if not seeds:
            continue
        label = mlp_label(seeds[0])
        layouts = {tuple((r["block"], label(r)) for r in rows) for rows in seeds}
        if len(layouts) != 1:
            raise ValueError(f"symmetry_report: the seeds of {name!r} have different blocks or MLPs")
        kinds = [k for k in ("tokens", "channels") if any(r["mlp"] == k for r in seeds[0])]
        for mlp in dict.fromkeys(label(r) for k in kinds for r in seeds[0] if r["mlp"] == k):
            per_seed = [[r for r in rows if label(r) == mlp] for rows in seeds]
            if not per_seed[0]:
                continue
            corr = [mean_std_cell([rows[i]["corr"] for rows in per_seed], "+.3f", ".3f")
                    for i in range(len(per_seed[0]))]
            anti = mean_std_cell([statistics.mean(r["antisym"] for r in rows) for rows in per_seed], ".3f")
            lines.append(f"| {name} | {len(seeds)} | {mlp} | {' → '.join(corr)} | {anti} |")
    return "\n".join(lines)


def xavier_reference(n_out: int, n_in: int, *, trials: int = 256, seed: int = 0) -> dict:
    """The symmetry index of independent xavier-uniform W1 (n_out, n_in) and W2 (n_in, n_out): corr has mean 0
    and std ~ 1 / sqrt(n_out n_in) (``corr_std_theory``), antisym ~ 0.5. The untrained reference point."""
    g = torch.Generator().manual_seed(seed)
    bound = math.sqrt(6.0 / (n_in + n_out))
    corr, anti = [], []
    for _ in range(trials):
        w1 = (torch.rand(n_out, n_in, generator=g, dtype=torch.float64) * 2 - 1) * bound
        w2 = (torch.rand(n_in, n_out, generator=g, dtype=torch.float64) * 2 - 1) * bound
        c, a = _pair_index(w1, w2)
        corr.append(c)
        anti.append(a)
    c, a = torch.tensor(corr), torch.tensor(anti)
    return {"corr_mean": float(c.mean()), "corr_std": float(c.std()), "antisym_mean": float(a.mean()),
            "corr_std_theory": 1.0 / math.sqrt(n_out * n_in)}


def symmetry_breaking(runs: Mapping[str, Sequence[Mapping]], *, path=None) -> str:
    """Last test top-1 and weight symmetry against the symmetry-breaking weight lambda (Karakida, Ota & Taki 2024:
    loss + lambda sum ||W2||^2 with the feedback W1^T + W2, so lambda -> infinity is the tied network).

    ``runs`` maps a run name to its seeds' {"form", "lam", "top1", "corr"}: the parallelized Mixer's form
    ("broken", "symmetric", "untied"; None for a serial Mixer), lambda, the last test top-1 and the mean of
    `symmetry_index`'s corr over the model's MLPs. The "broken" runs are the curve over lambda (evenly spaced in
    increasing order, so lambda = 0 has a place); every other run is a reference line (mean) with a +- std band.
    Returns a markdown table, one line per run (curve first); with ``path`` also a PNG of both against lambda.
    """
    rows = []
    for name, seeds in runs.items():
        if not seeds:
            continue
        kinds = {(s["form"], s["lam"]) for s in seeds}
        if len(kinds) != 1:
            raise ValueError(f"symmetry_breaking: the seeds of {name!r} differ in (form, lam): "
                             f"{sorted(kinds, key=str)}")
        form, lam = kinds.pop()
        if form == "broken" and lam is None:
            raise ValueError(f"symmetry_breaking: run {name!r} has form 'broken' but no lam")
        rows.append((name, form, lam, [s["top1"] for s in seeds], [s["corr"] for s in seeds]))
    curve = sorted((r for r in rows if r[1] == "broken"), key=lambda r: r[2])
    refs = [r for r in rows if r[1] != "broken"]
    lines = ["| run | form | λ | seeds | last top-1 (%) | corr(W1ᵀ, feedback), mean over MLPs |",
             "|---|---|---|---|---|---|"]
    for name, form, lam, top1, corr in curve + refs:
        lam_cell = f"{lam:g}" if form == "broken" else ("∞" if form in ("symmetric", "tied") else "–")
        lines.append(f"| {name} | {form or 'serial Mixer'} | {lam_cell} | {len(top1)} | {mean_std_cell(top1)} | "
                     f"{mean_std_cell(corr, '+.3f', '.3f')} |")
    if path is not None and rows:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        xs = list(range(len(curve)))
        for ax, k, ylabel in ((axes[0], 3, "last test top-1 (%)"), (axes[1], 4, "corr(W1ᵀ, feedback)")):
            if curve:
                stats = [mean_std(r[k]) for r in curve]
                ax.errorbar(xs, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3,
                            color="black", label="broken (λ on the axis)")
            for j, r in enumerate(refs):
                mean, sd = mean_std(r[k])
                color = plt.get_cmap("tab10").colors[j % 10]
                ax.axhline(mean, color=color, ls="--", lw=1.2, label=r[0])
                if sd:
                    ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.15)
            ax.set_xticks(xs, [f"{r[2]:g}" for r in curve])
            ax.set(xlabel="λ (symmetry-breaking penalty)", ylabel=ylabel)
        axes[0].set_title("accuracy")
        axes[1].set_title("weight symmetry (1: tied)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        save_figure(fig, path)
    return "\n".join(lines)
