"""Soft spectral normalisation (Behrmann et al. 2019, i-ResNet) of an interaction matrix inside a contraction.

    W_eff = W / max(1, sigma / coeff),   sigma = u^T W v   from power iteration

It only shrinks W when its estimated spectral norm exceeds ``coeff``. In train mode every call runs
``n_power`` power-iteration steps (updating the stored u, v); in eval mode the stored u, v are used as they
are. These are the iMixer's rules; the buffers carry its names (weight_u, weight_v, weight_sigma).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SoftSpectralNorm"]


class SoftSpectralNorm(nn.Module):
    """Normalises a matrix of shape ``shape`` = (n_out, n_in) passed to ``forward``."""

    def __init__(self, shape: tuple[int, int], coeff: float = 0.9, n_power: int = 8, eps: float = 1e-12):
        super().__init__()
        if not coeff > 0:
            raise ValueError(f"SoftSpectralNorm: coeff must be > 0, got {coeff}")
        if n_power < 0:
            raise ValueError(f"SoftSpectralNorm: n_power must be >= 0, got {n_power}")
        self.coeff, self.n_power, self.eps = float(coeff), int(n_power), eps
        n_out, n_in = shape
        self.register_buffer("weight_u", F.normalize(torch.randn(n_out), dim=0, eps=eps))
        self.register_buffer("weight_v", F.normalize(torch.randn(n_in), dim=0, eps=eps))
        self.register_buffer("weight_sigma", torch.ones(1))

    def extra_repr(self) -> str:
        return f"coeff={self.coeff:g}, n_power={self.n_power}"

    def forward(self, w: Tensor) -> Tensor:
        # autocast off and float32 or wider: under bf16 autocast sigma would otherwise be a bf16 estimate
        dtype = torch.promote_types(w.dtype, torch.float32)
        with torch.autocast(w.device.type, enabled=False):
            u, v = self.weight_u, self.weight_v
            if self.training and self.n_power:
                with torch.no_grad():
                    wd = w.detach().to(u.dtype)
                    for _ in range(self.n_power):
                        v.copy_(F.normalize(wd.T @ u, dim=0, eps=self.eps))
                        u.copy_(F.normalize(wd @ v, dim=0, eps=self.eps))
                u, v = u.clone(), v.clone()
            wf = w.to(dtype)
            sigma = torch.dot(u.to(dtype), wf @ v.to(dtype))
            self.weight_sigma.copy_(sigma.detach().to(self.weight_sigma.dtype))
            return (wf / torch.clamp(sigma / self.coeff, min=1.0)).to(w.dtype)

    def bound(self, w: Tensor) -> float:
        """The exact spectral norm of the normalised matrix the next ``forward`` would give: from the stored u, v
        in eval mode, after ``n_power`` power steps from them in train mode (on copies: nothing is stored)."""
        with torch.no_grad():
            u, v = self.weight_u.to(w.dtype), self.weight_v.to(w.dtype)
            if self.training:
                for _ in range(self.n_power):
                    v = F.normalize(w.T @ u, dim=0, eps=self.eps)
                    u = F.normalize(w @ v, dim=0, eps=self.eps)
            scale = torch.clamp(torch.dot(u, w @ v) / self.coeff, min=1.0)
            return float(torch.linalg.matrix_norm(w / scale, ord=2))
