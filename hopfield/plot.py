"""Matplotlib figures of simulated trajectories (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
