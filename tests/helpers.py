"""Shared by the equivalence tests: the project's tolerances, random weights far from init, relative error."""

import torch

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # max-abs error relative to the output's max-abs
DTYPES = [torch.float64, torch.float32]


def perturb(module, scale=0.3, seed=0):
    """Add seeded N(0, scale^2) noise to every parameter (in float64, then cast), in place; returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randn(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
