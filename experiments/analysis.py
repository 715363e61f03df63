"""Analyses of trained (or any) Mixer-family models: plain data out, optionally a PNG. The weight-symmetry index
is in `experiments.symmetry`.

- `fixed_point_convergence`: Norm_a and Cos_a of the fixed-point iterates of every iMLP layer
  (iMixer paper, Sec. 5 Fig. 3 and Appendix C.3 Figs. 5-6).
- `energy_along_flow`: the energy of a block's symmetric (tied) network along its continuous flow from a real
  image's embedding, and the reduced flow's Lyapunov function (Krotov 2021 Eq. 17-18; iMixer paper Eqs. 12-13).
- `read_metrics`, `training_curves`: metrics.jsonl files of training runs, plotted against the epoch (the seeds
  of a run as mean +- std).
- `rank_collapse`, `rank_collapse_report`: token uniformity per layer of ViTs (Dong et al. 2021; MHA paper), for
  one model and as mean +- std over the seeds of several runs (figure + markdown table).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import derive
from derive import DerivedBlock, DerivedMixer
from mixers import LiMlp, iMlp

from .figures import mean_std, mean_std_cell, pyplot, save_figure
from .runs import read_jsonl as read_metrics  # one reader of metrics.jsonl: the training loop's

__all__ = [
    "energy_along_flow",
    "fixed_point_convergence",
    "plot_energy",
    "plot_fixed_point",
    "rank_collapse",
    "rank_collapse_report",
    "read_metrics",
    "training_curves",
]


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


# ---------------------------------------------------------------------------------------------- fixed points
def _recorders(model: nn.Module) -> list[tuple[int, nn.Module, str]]:
    """(block index, module whose ``record``/``trace`` to use, layer name) for every iMLP layer: for a derived
    block each outermost implicit solve (the iMLP's x, x1 of the L-layer chain; a spec may have one per arm)."""
    out = []
    for i, blk in enumerate(getattr(model, "blocks", [])):
        if isinstance(blk, DerivedBlock):
            out += [(i, blk, br.node) for br in blk.branches if br.implicit]
        elif isinstance(getattr(blk, "mlp_tokens", None), (iMlp, LiMlp)):
            out.append((i, blk.mlp_tokens, "mlp_tokens"))
    if not out:
        raise ValueError(f"fixed_point_convergence: {type(model).__name__} has no iMLP layer (iMlp / LiMlp token "
                         "mixers, or derived blocks with an implicit solve)")
    return out


def _iterates(module: nn.Module, name: str) -> list[Tensor]:
    if isinstance(module, DerivedBlock):
        for rec in module.trace:  # nested solves come first; the outermost solve of ``name`` is the one we want
            if rec["layer"] == name:
                return rec["iterates"]
        raise RuntimeError(f"derived block recorded no solve of layer {name!r}")
    return list(module.trace)


def _step_stats(xs: list[Tensor]) -> dict[str, list[float]]:
    """Norm_a = ||x^(a+1) - x^a||_2 / sqrt(N_x C) and Cos_a = cos(x^(a+1), x^a) per sample, then mean and std
    (population, ddof 0) over the samples (iMixer paper Appendix C.3). N_x C is the size of the iterate itself
    (the x layer: T tokens-MLP units x C channels), so Norm_a is its RMS step per element; the paper divides by
    sqrt(S C) (S tokens), which is sqrt(T / S) times this one (1.14 for the t4_28 models, T = 64, S = 49)."""
    x = torch.stack([t.detach().double().flatten(1) for t in xs])  # (n + 1, B, S C)
    prev, nxt = x[:-1], x[1:]
    norm = (nxt - prev).norm(dim=-1) / math.sqrt(x.shape[-1])  # (n, B)
    cos = F.cosine_similarity(nxt, prev, dim=-1)
    return {"norm": norm.mean(1).tolist(), "norm_std": norm.std(1, correction=0).tolist(),
            "cos": cos.mean(1).tolist(), "cos_std": cos.std(1, correction=0).tolist()}


def _certificate(block: DerivedBlock, layer: str, v: Tensor, probe_iter: int) -> dict:
    """The block's contraction certificate for its solve of ``layer`` on its own input ``v`` (eval mode): the bound
    Lip(F) <= ..., and the residual ratios ||x^(a+1) - x^a|| / ||x^a - x^(a-1)|| over ``probe_iter`` iterations
    (more than the block takes, to see whether the trained F contracts)."""
    cert = next(c for c in block.certificate(v, n_iter=probe_iter) if c.layer == layer)
    tail = cert.ratios[len(cert.ratios) // 2:]  # the asymptotic rate: geometric mean of the later ratios
    rate = math.exp(statistics.fmean(math.log(r) for r in tail)) if tail and min(tail) > 0 else math.nan
    return {"lipschitz_bound": cert.lipschitz_bound, "certified": cert.certified, "probe_iter": probe_iter,
            "ratios": cert.ratios, "rate": rate}


PROBE_ITER = 8  # fixed-point iterations the certificate's measured ratios run, whatever the block's own n_iter


def fixed_point_convergence(model: nn.Module, images: Tensor, *, path=None,
                            plot_blocks: Sequence[int] | None = None, probe_iter: int = PROBE_ITER) -> dict:
    """Convergence of the fixed-point iteration (FPA, iMixer Eq. 29) in every iMLP layer (iMixer Figs. 3, 5, 6).

    ``model``: a ``mixers.MlpMixer`` with iMlp / LiMlp token mixers, or a ``derive.DerivedMixer`` of kind
    "imixer" / "limixer". It runs once on ``images`` in eval mode without gradients (its train mode and the
    ``record`` flags are restored afterwards). Per step a = 0..n-1:
    Norm_a = ||x^(a+1) - x^a||_2 / sqrt(N_x C) (``_step_stats``) and Cos_a = cos(x^(a+1), x^a), each sample's
    iterate flattened, mean and population std over the images. Only the outermost solve of each block counts (the
    hand-written ``trace``; for a derived block the first recorded solve of each hidden layer whose solve is not
    nested in another, i.e. of the first Euler step: the iMLP's x, or one per arm of a spec with two implicit arms).

    For a derived block also its ``certificate``: the bound Lip(F) <= ... of ``DerivedBlock.certificate`` and the
    residual ratios ||x^(a+1) - x^a|| / ||x^a - x^(a-1)|| (all images at once) of ``probe_iter`` iterations
    started from the block's own input, with ``rate``, the geometric mean of the later half of them: below 1, the
    trained F contracts there (a measured local rate, not a bound).

    Returns {"layers": [{"block", "layer", "norm", "norm_std", "cos", "cos_std"[, "certificate"]}, ...],
    "n_images"}.
    ``path``: a PNG with Norm_a (log scale) and Cos_a, one line per layer (``plot_blocks``: only those blocks).
    """
    recs = _recorders(model)
    device, dtype = _device_dtype(model)
    was_training = model.training
    flags = [(m, m.record) for _, m, _ in recs]
    inputs: dict[int, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _, args, i=i: inputs.__setitem__(i, args[0]))
             for i, m, _ in recs if isinstance(m, DerivedBlock)]
    try:
        for m, _ in flags:
            m.record = True
        model.eval()
        with torch.no_grad():
            model(images.to(device=device, dtype=dtype))
        rows = [{"block": i, "layer": name, **_step_stats(_iterates(m, name))} for i, m, name in recs]
        for row, (i, m, name) in zip(rows, recs):
            if i in inputs:
                row["certificate"] = _certificate(m, name, inputs[i], probe_iter)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags:
            m.record = flag
        model.train(was_training)
    result = {"layers": rows, "n_images": int(images.shape[0])}
    if path is not None:
        plot_fixed_point(result, path, plot_blocks)
    return result


def plot_fixed_point(result: dict, path, plot_blocks: Sequence[int] | None = None) -> Path:
    """The PNG of a ``fixed_point_convergence`` result (also one read back from JSON)."""
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
    blocks = [row["block"] for row in result["layers"]]
    multi = len(set(blocks)) < len(blocks)  # a block with several solves: name the layer too
    for row in result["layers"]:
        if plot_blocks is not None and row["block"] not in plot_blocks:
            continue
        a = list(range(len(row["norm"])))
        label = f"iMLP-{row['block']}" + (f" ({row['layer']})" if multi else "")
        ax0.errorbar(a, row["norm"], yerr=row["norm_std"], marker="o", ms=3, capsize=2, label=label)
        ax1.errorbar(a, row["cos"], yerr=row["cos_std"], marker="o", ms=3, capsize=2, label=label)
    ax0.set_yscale("log", nonpositive="mask")
    ax0.set(xlabel="fixed-point step a", ylabel=r"$\|x^{a+1}-x^a\|_2/\sqrt{SC}$", title="Norm$_a$")
    ax1.set(xlabel="fixed-point step a", ylabel=r"$\cos(x^{a+1}, x^a)$", title="Cos$_a$")
    ax1.ticklabel_format(axis="y", useOffset=False)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax0, ax1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.suptitle(f"fixed-point iteration in the iMLP layers, {result['n_images']} images")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- energy
def _as_derived(model: nn.Module) -> DerivedMixer:
    if isinstance(model, DerivedMixer):
        return model
    if hasattr(model, "cfg") and hasattr(model, "blocks"):
        return derive.from_reference(model)
    raise TypeError(f"energy_along_flow expects a derive.DerivedMixer or a mixers.MlpMixer, got {type(model).__name__}")


def energy_along_flow(model: nn.Module, image: Tensor, *, block: int = 0, t_end: float = 10.0, points: int = 51,
                      dtype: torch.dtype = torch.float64, rtol: float = 1e-6, atol: float = 1e-8,
                      path=None) -> dict:
    """Energy (Krotov 2021, Eq. 17) of block ``block``'s Hopfield network along its continuous flow
    (tau_A dx_A/dt = I_A - x_A, Eq. 14) from a real image, and the reduced flow's Lyapunov function.

    ``model``: a ``derive.DerivedMixer`` of kind "paramixer" (form "tied" for an exact energy), or a hand-written
    ``mixers.MlpMixer`` whose derived twin (``derive.from_reference``) is used. ``image``: (C, H, W) or
    (1, C, H, W). The visible state v0 (1, S, C) is the stem's patch embedding passed through the blocks before
    ``block``. The block's network is copied in ``dtype`` (float64 by default) and the FULL network integrated
    with dopri5 from v0, every hidden layer starting ON ITS SLOW MANIFOLD (x_B = G^B(g_v), exact for leaf
    branches), so E(0) equals the reduced energy at v0. Along the visible trajectory v(t) the reduced
    flow's Lyapunov function E_red(v) = [<v, g_v> - L_v(v)] - sum_B Phi_B(G^B(g_v)) (``ReducedField.energy``,
    alpha = 1, iMixer Eqs. 12-13) is evaluated as well.

    Returns {"t", "energy", "reduced_energy", "max_rise", "max_rise_rel", "reduced_max_rise", "caveats"}:
    max_rise is the largest increase of the energy between consecutive output times (<= 0: it never rose),
    max_rise_rel the same relative to |E| (the simulator's descent report). ``caveats`` are the reasons descent
    is not guaranteed (the network's and the reduced field's): non-convex GELU hidden Lagrangians, untied or
    broken synapses, and a LayerNorm gain gamma != 1 on a tied synapse. ``path``: a PNG of both energies vs t.
    """
    derived = _as_derived(model)
    blk = derived.blocks[block]
    if not isinstance(blk, DerivedBlock):
        raise TypeError(f"energy_along_flow: block {block} is a {type(blk).__name__}, not a derived block")
    if any(br.implicit for br in blk.branches):
        raise ValueError("energy_along_flow: the reduced energy is defined for leaf branches only (Mixer and "
                         f"parallelized-Mixer networks); block {block} has an implicit solve")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"energy_along_flow: image must be (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    device, mdtype = _device_dtype(derived)
    was_training = derived.training
    derived.eval()
    try:
        with torch.no_grad():
            v = derived.stem(image.to(device=device, dtype=mdtype))
            for k in range(block):
                v = derived.blocks[k](v)
    finally:
        derived.train(was_training)
    net = copy.deepcopy(blk.net).to(dtype=dtype)
    v0 = v.to(dtype)
    field = derive.adiabatic(net, blk.visible, alpha=1.0, solver="fixed_point")
    t = torch.linspace(0.0, float(t_end), int(points), dtype=dtype, device=device)
    with torch.no_grad():
        state = field.slow_manifold(v0)
        traj = net.simulate(state, t, method="dopri5", rtol=rtol, atol=atol)
        vs = traj.states[blk.visible]
        reduced = torch.stack([field.energy(vs[k]) for k in range(len(t))])[:, 0]
    energy = traj.energy[:, 0]
    caveats = list(dict.fromkeys(net.descent_caveats() + field.caveats()))
    red_rise = float((reduced[1:] - reduced[:-1]).max()) if len(t) > 1 else 0.0
    result = {"t": t.tolist(), "energy": energy.tolist(), "reduced_energy": reduced.tolist(),
              "max_rise": float(traj.descent.max_rise), "max_rise_rel": float(traj.descent.max_rise_rel),
              "reduced_max_rise": red_rise, "caveats": caveats, "nfe": int(traj.nfe)}
    if path is not None:
        plot_energy(result, path, block)
    return result


def plot_energy(result: dict, path, block: int = 0) -> Path:
    """The PNG of an ``energy_along_flow`` result (also one read back from JSON)."""
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
    t, e, r = result["t"], result["energy"], result["reduced_energy"]
    ax0.plot(t, e, lw=1.5, label="full network E(t)")
    ax0.plot(t, r, lw=1.2, ls="--", label=r"reduced $E_{red}(v(t))$")
    ax0.set(xlabel="t", ylabel="energy", title=f"block {block}: energy along the flow")
    ax0.legend(fontsize=8)
    for series, label in ((e, "full"), (r, "reduced")):
        gap = [(ti, x - series[-1]) for ti, x in zip(t, series) if x - series[-1] > 0]
        if gap:
            ax1.semilogy(*zip(*gap), lw=1, label=label)
    ax1.set(xlabel="t", ylabel="E(t) - E(t_end)", title="distance to the final energy")
    ax1.text(0.02, 0.02, f"max relative rise {result['max_rise_rel']:.2g}; {len(result['caveats'])} caveat(s)",
             transform=ax1.transAxes, fontsize=8)
    if ax1.lines:
        ax1.legend(fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- training curves
def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records with a finite ``key``; a record without an epoch gets its 1-based index."""
    xs, ys = [], []
    for k, rec in enumerate(records, start=1):
        y = rec.get(key)
        if y is None or not math.isfinite(float(y)):
            continue
        x = rec.get("epoch")
        xs.append(float(k if x is None else x))
        ys.append(float(y))
    return xs, ys


def training_curves(runs: Mapping[str, str | Path | Sequence[str | Path]], path) -> None:
    """Train loss, test loss (log scale: a penalty in the loss may start it far higher) and test top-1 vs epoch,
    one line per run (label: the dict key; one legend beside the panels, distinct colours up to 20 runs), as a PNG.
    A run given as a list of metrics files (its seeds) is drawn as their mean per epoch with a +- std band (over
    the seeds that logged that epoch). Records missing a value (absent, None, NaN) are skipped in that curve."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("train_loss", "train loss"), ("test_loss", "test loss"), ("test_top1", "test top-1 (%)"))
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    handles = []
    for k, (label, files) in enumerate(runs.items()):
        seeds = [read_metrics(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        color = palette[k % len(palette)]
        for ax, (key, _) in zip(axes, panels):
            by_epoch: dict[float, list[float]] = {}
            for records in seeds:
                for x, y in zip(*_series(records, key)):
                    by_epoch.setdefault(x, []).append(y)
            if not by_epoch:
                continue
            xs = sorted(by_epoch)
            stats = [mean_std(by_epoch[x]) for x in xs]
            (line,) = ax.plot(xs, [v[0] for v in stats], marker="o", ms=2, lw=1.2, color=color,
                              label=label if len(seeds) == 1 else f"{label} ({len(seeds)} seeds)")
            if len(seeds) > 1:
                ax.fill_between(xs, [m - sd for m, sd in stats], [m + sd for m, sd in stats], color=color, alpha=0.2)
            if len(handles) == k:
                handles.append(line)
    for ax, (key, title) in zip(axes, panels):
        ax.set(xlabel="epoch", title=title)
        if key.endswith("loss") and ax.lines:
            ax.set_yscale("log")
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- rank collapse
@torch.no_grad()
def rank_collapse(model: nn.Module, images: Tensor, *, path=None, label: str | None = None) -> dict:
    """Token uniformity per layer of a ViT (``mixers.VisionTransformer``), as in the rank-collapse literature
    (Dong et al. 2021) and the MHA paper:

    - ``cosine``: the mean cosine similarity over all pairs of distinct tokens of X_l (1 = all tokens parallel);
    - ``residual``: ||X_l - 1 x_l^T||_F / ||X_l||_F with x_l the token mean, the relative distance of X_l from a
      rank-1 matrix of identical tokens (0 = collapsed).

    Both are averaged over ``images``; layer 0 is the embedding (``forward_features(return_layers=True)``).
    """
    was = model.training
    model.eval()
    try:
        _, states = model.forward_features(images, return_layers=True)
    finally:
        model.train(was)
    cos, res = [], []
    for x in states:
        x = x.double()
        n = x.shape[1]
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        gram = unit @ unit.transpose(1, 2)
        off = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)) / (n * (n - 1))
        cos.append(off.mean().item())
        centred = x - x.mean(dim=1, keepdim=True)
        res.append((centred.norm(dim=(1, 2)) / x.norm(dim=(1, 2)).clamp_min(1e-30)).mean().item())
    result = {"layer": list(range(len(states))), "cosine": cos, "residual": res}
    if path is not None:
        plt = pyplot()
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.plot(result["layer"], cos, marker="o", label=label)
        b.semilogy(result["layer"], res, marker="o", label=label)
        a.set(xlabel="layer", ylabel="mean token cosine similarity", title="token uniformity")
        b.set(xlabel="layer", ylabel="||X - 1 x^T|| / ||X||", title="distance from rank 1")
        if label:
            a.legend()
        save_figure(fig, path)
    return result


def rank_collapse_report(groups: Mapping[str, Sequence[Mapping]], *, path=None) -> str:
    """Mean +- std over seeds of `rank_collapse` results, grouped by run (``{"vit": [seed0, seed1, ...]}``).

    Returns a markdown table (per run: the embedding layer, the middle layer and the last layer, cosine and
    residual); with ``path`` also a figure of both measures against depth, one line per run, bands = +- std.
    """
    lines = ["| run | seeds | depth | cosine: embed | cosine: middle | cosine: last | "
             "residual: embed | residual: middle | residual: last |", "|---|---|---|---|---|---|---|---|---|"]
    curves = {}
    for name, results in groups.items():
        if not results:
            continue
        depths = {len(r["layer"]) for r in results}
        if len(depths) != 1:
            raise ValueError(f"rank_collapse_report: the seeds of {name!r} have different depths {sorted(depths)}")
        n = depths.pop()
        values = {key: [[r[key][i] for r in results] for i in range(n)] for key in ("cosine", "residual")}
        curves[name] = {key: [mean_std(v) for v in vs] for key, vs in values.items()}
        picks = (0, (n - 1) // 2, n - 1)
        cells = [mean_std_cell(values[k][i], ".3g", ".2g") for k in ("cosine", "residual") for i in picks]
        lines.append(f"| {name} | {len(results)} | {n - 1} | " + " | ".join(cells) + " |")
    if path is not None and curves:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, stats in curves.items():
            for ax, key in zip(axes, ("cosine", "residual")):
                m = torch.tensor([v[0] for v in stats[key]])
                sd = torch.tensor([v[1] for v in stats[key]])
                layers = list(range(len(m)))
                (line,) = ax.plot(layers, m, marker="o", ms=3, label=name)
                ax.fill_between(layers, m - sd, m + sd, color=line.get_color(), alpha=0.2)
        axes[0].set(xlabel="layer (0 = embedding)", ylabel="mean token cosine similarity", title="token uniformity")
        axes[1].set(xlabel="layer (0 = embedding)", ylabel="||X - 1 x^T|| / ||X||", title="distance from rank 1")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)
        save_figure(fig, path)
    return "\n".join(lines)
