"""A neuron layer: a state shape, a Lagrangian and a time constant."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .lagrangians.base import Lagrangian, _batched_axes

__all__ = ["Layer"]


@dataclass(frozen=True)
class Layer:
    """Neurons x of shape ``shape`` (per sample) with Lagrangian L and time constant tau.

    Their activation is g = dL/dx and their own energy the Legendre term <x, g> - L(x)
    (Krotov 2021, Eq. 17).
    """

    shape: tuple[int, ...]
    lagrangian: Lagrangian
    tau: float = 1.0

    def __post_init__(self):
        shape = (self.shape,) if isinstance(self.shape, int) else tuple(self.shape)
        if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"Layer shape must be a non-empty tuple of positive ints, got {self.shape!r}")
        if not isinstance(self.lagrangian, Lagrangian):
            raise TypeError(
                f"Layer lagrangian must be a hopfield.lagrangians.Lagrangian, got {type(self.lagrangian).__name__}"
            )
        axis = getattr(self.lagrangian, "axis", None)
        if axis is not None:
            try:
                _batched_axes(axis, len(shape) + 1)
            except ValueError as e:
                raise ValueError(f"Layer of shape {shape} with {self.lagrangian}: {e}") from None
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"Layer tau must be finite and > 0, got {self.tau!r}")
        tau = float(tau)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "tau", tau)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def activation(self, x: Tensor) -> Tensor:
        return self.lagrangian.activation(x)

    def energy(self, x: Tensor, g: Tensor | None = None) -> Tensor:
        """Legendre energy <x, g> - L(x) per sample, shape (batch,)."""
        g = self.activation(x) if g is None else g
        return (x * g).reshape(x.shape[0], -1).sum(-1) - self.lagrangian(x)

    def init(self, batch: int, *, scale: float = 1.0, generator: torch.Generator | None = None,
             dtype: torch.dtype | None = None, device=None) -> Tensor:
        """A state of shape (batch, *shape): ``scale`` * N(0, 1) draws (zeros when scale == 0)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        shape = (batch, *self.shape)
        if scale == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        return scale * torch.randn(shape, generator=generator, dtype=dtype, device=device)
