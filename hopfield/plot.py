"""Matplotlib figures of simulated trajectories (PNG, headless)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_energy", "save_figure"]


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """Write ``fig`` to ``path`` and close it; returns the path written. The format is the suffix's (a path
    without one gets ``.png``); parent folders are made; the file appears whole or not at all (written beside it,
    then renamed). A path that is a folder, or one that cannot be written, is an error naming it."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ValueError(f"cannot save a figure as {str(path)!r}: it is a folder; give a file name (.png)")
        if not path.suffix:
            path = path.with_suffix(".png")
        formats = fig.canvas.get_supported_filetypes()
        if path.suffix[1:].lower() not in formats:
            raise ValueError(f"cannot save a figure as {str(path)!r}: {path.suffix!r} is not an image format "
                             f"matplotlib writes ({', '.join('.' + f for f in sorted(formats))})")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # beside it: the rename stays on one file system
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(tmp, format=path.suffix[1:].lower(), **savefig_kwargs)
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(f"cannot write the figure {str(path)!r}: {e.strerror or e}") from None
        finally:
            with contextlib.suppress(OSError):  # (no folder to hold it: nothing to remove)
                tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)
    return path


def plot_energy(traj, path, title: str | None = None, max_samples: int = 16) -> Path:
    """Energy E(t) per sample (left) and E(t) - E(t_end) on a log scale (right), saved as a PNG."""
    if traj.energy is None:
        raise ValueError("this trajectory was simulated with track_energy=False: no energy to plot")
    t = traj.t.detach().cpu().double().numpy()
    e = traj.energy.detach().cpu().double().numpy()[:, :max_samples]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
    ax0.plot(t, e, lw=1)
    ax0.set(xlabel="t", ylabel="energy E", title="energy per sample")
    gap = e - e[-1:]
    for k in range(gap.shape[1]):
        keep = gap[:, k] > 0
        ax1.semilogy(t[keep], gap[keep, k], lw=1)
    ax1.set(xlabel="t", ylabel="E(t) - E(t_end)", title="distance to the final energy")
    if traj.descent is not None:
        ax1.text(0.02, 0.02, f"max relative rise {traj.descent.max_rise_rel:.2g}", transform=ax1.transAxes)
    fig.suptitle(title or f"{traj.method}, {e.shape[1]} samples, {traj.nfe} evaluations")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
