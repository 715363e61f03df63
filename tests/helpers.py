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


INTERMEDIATE_OPTIONS = [  # forward_intermediates keyword sets that cover indices, norm, format and stop_early
    dict(),
    dict(indices=1, norm=True),
    dict(indices=[0, -1], output_fmt="NLC"),
    dict(indices=[0], stop_early=True, intermediates_only=True),
]


def assert_same_intermediates(ours, ref, x, dtype, options=INTERMEDIATE_OPTIONS):
    """``forward_intermediates`` of both models, in train and eval mode: the same number of outputs, shapes, and
    values within the dtype's tolerance."""
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        for kw in options:
            a, b = ours.forward_intermediates(x, **kw), ref.forward_intermediates(x, **kw)
            if not kw.get("intermediates_only"):
                assert rel_err(a[0], b[0]) <= TOL[dtype], (train, kw, "final")
                a, b = a[1], b[1]
            assert len(a) == len(b) > 0, (train, kw)
            for u, v in zip(a, b):
                u, v = (u, v) if torch.is_tensor(u) else (torch.cat([t.flatten(1) for t in u], 1),
                                                          torch.cat([t.flatten(1) for t in v], 1))
                assert u.shape == v.shape and rel_err(u, v) <= TOL[dtype], (train, kw, u.shape, v.shape)
