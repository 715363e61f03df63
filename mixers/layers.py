"""MLP layers of the Mixer family, written in plain PyTorch.

Equation numbers refer to Ota & Taki, "iMixer: hierarchical Hopfield network implies an invertible, implicit and
iterative MLP-Mixer" (arXiv 2304.13061). The symmetric and symmetry-broken MLPs follow Karakida, Ota & Taki,
"Hierarchical Associative Memory, Parallelized MLP-Mixer, and Symmetry Breaking" (arXiv 2406.12220).

- `Mlp`: the two-layer MLP of timm (same submodule names, so timm state dicts load with ``strict=True``).
- `SpectralNormLinear`: a linear layer with the soft spectral normalisation of i-ResNet (Behrmann et al. 2019).
- `LinearBatchNorm`: a linear layer followed by BatchNorm over its outputs (the iMixer's Table 3 ablation).
- `iMlp`: the iMLP module, Eq. (30) and Algorithm 2: ``H(FPA(G(x)))`` with ``FPA`` the fixed-point approximation
  of ``(1 - F)^-1``.
- `LiMlp`: the iMLP module of an L-layer hierarchical Hopfield network, Appendix B, Eqs. (37)-(42).
- `SymMlp`, `AsymMlp`: the tied MLP ``W^T GELU(W x)`` and its symmetry-broken form ``(W1^T + W2) GELU(W1 x)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["INNER_NORMS", "AsymMlp", "LiMlp", "LinearBatchNorm", "Mlp", "SpectralNormLinear", "SymMlp", "iMlp",
           "inner_linear"]


class Mlp(nn.Module):
    """Two-layer MLP ``fc2(GELU(fc1 x))`` with timm's submodule names and op order.

    forward: fc1 -> act -> drop1 -> norm (identity) -> fc2 -> drop2. GELU is the exact (erf) one.
    With ``bias=False`` this is the untied MLP of the parallelized Mixer (the authors' ``vMlp``).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


def _autocast_off(device_type: str):
    """A context in which autocast is off for ``device_type`` (a no-op when it is not on)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, TypeError):
        pass
    return contextlib.nullcontext()


class SpectralNormLinear(nn.Module):
    """Linear layer with soft spectral normalisation (i-ResNet's ``spectral_norm_fc``, Behrmann et al. 2019).

    The effective weight is ``W = W_orig / max(1, sigma / coeff)``, with ``sigma = u^T W_orig v`` the power-method
    estimate of the largest singular value of ``W_orig``: the weight is only shrunk when ``sigma > coeff``.

    In train mode every call first runs ``n_power`` power-iteration steps ``v <- normalize(W^T u)``,
    ``u <- normalize(W v)`` (no gradient) and stores the new ``u``, ``v`` in the buffers; so inside a fixed-point
    loop the effective weight changes slightly from one iteration to the next, as in the iMixer code. In eval mode the
    stored ``u``, ``v`` are used as they are. The gradient flows through ``sigma`` into ``W_orig``.

    The power iteration and ``sigma`` are computed with autocast off, in float32 or wider, so mixed precision
    training leaves them intact.

    State dict: ``weight_orig`` (out, in), ``bias`` (out), ``weight_u`` (out), ``weight_v`` (in), ``weight_sigma`` (1).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.9,
        n_power: int = 8,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if coeff <= 0:
            raise ValueError(f"coeff must be positive, got {coeff}")
        if n_power < 0:
            raise ValueError(f"n_power must be >= 0, got {n_power}")
        self.in_features = in_features
        self.out_features = out_features
        self.coeff = float(coeff)
        self.n_power = int(n_power)
        self.eps = float(eps)
        self.weight_orig = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()
        # u, v are random unit vectors drawn at construction (this consumes the global RNG, as the reference does)
        self.register_buffer("weight_u", F.normalize(torch.randn(out_features), dim=0, eps=self.eps))
        self.register_buffer("weight_v", F.normalize(torch.randn(in_features), dim=0, eps=self.eps))
        self.register_buffer("weight_sigma", torch.ones(1))

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation."""
        nn.init.kaiming_uniform_(self.weight_orig, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def normalized_weight(self, power_iteration: bool) -> torch.Tensor:
        """The effective weight ``W_orig / max(1, sigma / coeff)``.

        With ``power_iteration`` true, ``n_power`` power steps first update ``weight_u`` and ``weight_v`` in place.
        ``weight_sigma`` always receives the (detached) estimate used here.
        """
        weight = self.weight_orig
        dtype = torch.promote_types(weight.dtype, torch.float32)
        with _autocast_off(weight.device.type):
            w = weight.to(dtype)
            if power_iteration and self.n_power > 0:
                with torch.no_grad():
                    u = self.weight_u.to(dtype)
                    v = self.weight_v.to(dtype)
                    for _ in range(self.n_power):
                        v = F.normalize(torch.mv(w.t(), u), dim=0, eps=self.eps)
                        u = F.normalize(torch.mv(w, v), dim=0, eps=self.eps)
                    self.weight_u.copy_(u)
                    self.weight_v.copy_(v)
            # clones: the buffers are updated in place by later calls, autograd must keep the values used here
            u = self.weight_u.to(dtype).clone()
            v = self.weight_v.to(dtype).clone()
            sigma = torch.dot(u, torch.mv(w, v))
            with torch.no_grad():
                self.weight_sigma.copy_(sigma.detach())
            factor = torch.clamp(sigma / self.coeff, min=1.0)
            return (w / factor).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(power_iteration=self.training), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"coeff={self.coeff}, n_power={self.n_power}"
        )


class LinearBatchNorm(nn.Linear):
    """``nn.Linear`` followed by ``BatchNorm1d`` over its output features (``norm``): the "BatchNorm" arm of the
    iMixer's spectral-normalisation ablation (Table 3), where BatchNorm takes the place of the spectral norm.

    The statistics run over every other axis (batch, and the channels a token MLP is applied to). The paper does
    not say where its BatchNorm sat; here it normalises the linear layer's output (pre-activation), the usual
    place, with PyTorch's defaults (eps 1e-5, momentum 0.1, affine). Inside the fixed-point loop every call is a
    BatchNorm call: in train mode each updates the running statistics, as a repeated module does.

    State dict: ``weight`` (out, in), ``bias`` (out), ``norm.weight``, ``norm.bias``, ``norm.running_mean``,
    ``norm.running_var``, ``norm.num_batches_tracked``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.norm = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.norm(y.reshape(-1, y.shape[-1])).reshape(y.shape)


INNER_NORMS = ("spectral", "none", "batch")


def inner_linear(in_features: int, out_features: int, inner_norm: str = "spectral", coeff: float = 0.9,
                 n_power: int = 8) -> nn.Module:
    """A linear layer inside the fixed-point map F of an iMLP (``fc_sn*``): spectrally normalised
    (``"spectral"``, the paper's), plain (``"none"``) or followed by BatchNorm (``"batch"``); iMixer Table 3's
    three arms."""
    if inner_norm == "spectral":
        return SpectralNormLinear(in_features, out_features, coeff=coeff, n_power=n_power)
    if inner_norm == "none":
        return nn.Linear(in_features, out_features)
    if inner_norm == "batch":
        return LinearBatchNorm(in_features, out_features)
    raise ValueError(f"inner_norm must be one of {INNER_NORMS}, got {inner_norm!r}")


class iMlp(nn.Module):
    """The iMLP module, iMixer Eq. (30) and Algorithm 2.

    ``u = G(x) = fc1(x)`` (Eq. 28); the fixed-point approximation (FPA, Eq. 29) of ``z = (1 - F)^-1(u)`` starts at
    ``z^0 = u`` and repeats ``n_iter`` times ``z^(a+1) = u + F(z^a)`` with the contractive block (Eq. 24)
    ``F(z) = fc_sn2(drop1(GELU(fc_sn1(drop1(GELU(z))))))``; the output is ``H(z^n) = drop2(fc2(drop1(GELU(z^n))))``
    (Eq. 26). Dropout sits after every activation, as in Algorithm 2. ``inner_norm`` picks what normalises
    ``fc_sn1``/``fc_sn2`` (`inner_linear`): the soft spectral norm (default), nothing, or BatchNorm.

    With ``n_iter=0`` the module is exactly ``Mlp(in_features, internal_features)`` (same ``fc1``/``fc2`` names).
    When ``record`` is true, ``trace`` holds the detached iterates ``[z^0, ..., z^n]`` of the last forward.
    """

    def __init__(
        self,
        in_features: int,
        internal_features: int,
        hidden_features: int,
        n_iter: int = 2,
        n_power: int = 8,
        coeff: float = 0.9,
        drop: float = 0.0,
        inner_norm: str = "spectral",
    ) -> None:
        super().__init__()
        if n_iter < 0:
            raise ValueError(f"n_iter must be >= 0, got {n_iter}")
        self.n_iter = int(n_iter)
        self.inner_norm = inner_norm
        self.fc1 = nn.Linear(in_features, internal_features)
        self.fc_sn1 = inner_linear(internal_features, hidden_features, inner_norm, coeff, n_power)
        self.fc_sn2 = inner_linear(hidden_features, internal_features, inner_norm, coeff, n_power)
        self.fc2 = nn.Linear(internal_features, in_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        self.record = False
        self.trace: list[torch.Tensor] = []

    def contraction(self, z: torch.Tensor) -> torch.Tensor:
        """The contractive block ``F`` of Eq. (24): ``xi^(x,h) GELU(xi^(h,x) GELU(z))`` (+ biases)."""
        return self.fc_sn2(self.drop1(self.act(self.fc_sn1(self.drop1(self.act(z))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.fc1(x)
        z = u
        trace = [z.detach()] if self.record else None
        for _ in range(self.n_iter):
            z = u + self.contraction(z)
            if trace is not None:
                trace.append(z.detach())
        if trace is not None:
            self.trace = trace
        return self.drop2(self.fc2(self.drop1(self.act(z))))

    def extra_repr(self) -> str:
        return f"n_iter={self.n_iter}, inner_norm={self.inner_norm!r}"


class LiMlp(nn.Module):
    """The iMLP module of an L-layer hierarchical Hopfield network, iMixer Appendix B, Eqs. (37)-(42).

    ``widths = [N1, ..., NL]`` with ``N1`` the size of the mixed axis. With ``G^A = xi^(A+1,A) g^A`` and
    ``H^(A+1) = xi^(A,A+1) g^(A+1)`` (Eq. 41), ``g^1`` the identity (the LayerNorm sits in the block) and
    ``g^A = GELU`` for ``A >= 2``:

        F^(L-1) = H^L o G^(L-1)                                   (Eq. 40)
        F^A     = H^(A+1) o (1 - F^(A+1))^-1 o G^A,  A = 2..L-2   (Eq. 39)
        output  = H^2(x^2),  x^2 = (1 - F^2)^-1 (G^1(x))          (Eqs. 37-38)

    Every inverse ``(1 - F^A)^-1(z)`` is the fixed-point approximation ``x^0 = z``, ``x^(a+1) = z + F^A(x^a)``
    with ``n_iter`` steps, so the cost grows like ``n_iter^(L-2)``. Dropout follows every GELU, as in `iMlp`;
    ``inner_norm`` normalises the ``fc_sn*`` layers as in `iMlp`.

    Parameters: ``fc1 = G^1`` (N1 -> N2) and ``fc2 = H^2`` (N2 -> N1) are plain linear layers; the spectrally
    normalised layers are ``fc_sn1 .. fc_sn{L-2} = G^2 .. G^(L-1)`` (going down) and
    ``fc_sn{L-1} .. fc_sn{2(L-2)} = H^L .. H^3`` (coming back up). For ``L = 3`` the names, the order of the calls
    and the function are exactly those of `iMlp`. ``record``/``trace`` hold the outermost (``x^2``) iterates.
    """

    def __init__(
        self,
        widths: Sequence[int],
        n_iter: int = 2,
        n_power: int = 8,
        coeff: float = 0.9,
        drop: float = 0.0,
        inner_norm: str = "spectral",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 3:
            raise ValueError(f"LiMlp needs at least 3 layers (widths [N1, N2, N3, ...]), got {list(widths)}")
        if n_iter < 0:
            raise ValueError(f"n_iter must be >= 0, got {n_iter}")
        self.widths = widths
        self.depth = len(widths)
        self.n_iter = int(n_iter)
        self.inner_norm = inner_norm
        L = self.depth
        self.fc1 = nn.Linear(widths[0], widths[1])
        for A in range(2, L):  # G^A: N_A -> N_(A+1), going down
            layer = inner_linear(widths[A - 1], widths[A], inner_norm, coeff, n_power)
            self.add_module(self._g_name(A), layer)
        for B in range(L, 2, -1):  # H^B: N_B -> N_(B-1), coming back up
            layer = inner_linear(widths[B - 1], widths[B - 2], inner_norm, coeff, n_power)
            self.add_module(self._h_name(B), layer)
        self.fc2 = nn.Linear(widths[1], widths[0])
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        self.record = False
        self.trace: list[torch.Tensor] = []

    @staticmethod
    def _g_name(A: int) -> str:
        return f"fc_sn{A - 1}"

    def _h_name(self, B: int) -> str:
        return f"fc_sn{2 * self.depth - 1 - B}"

    def G(self, A: int) -> nn.Module:
        """The (normalised) linear part of ``G^A`` (A = 2 .. L-1)."""
        return getattr(self, self._g_name(A))

    def H(self, B: int) -> nn.Module:
        """The (normalised) linear part of ``H^B`` (B = 3 .. L)."""
        return getattr(self, self._h_name(B))

    def contraction(self, x: torch.Tensor, level: int = 2) -> torch.Tensor:
        """``F^level(x)``, Eqs. (39)-(40), with the inner inverses by fixed-point iteration."""
        y = self.G(level)(self.drop1(self.act(x)))
        if level < self.depth - 1:
            y = self.solve(y, level + 1)
        return self.H(level + 1)(self.drop1(self.act(y)))

    def solve(self, z: torch.Tensor, level: int = 2, trace: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``FPA[(1 - F^level)^-1](z)``: ``n_iter`` steps of ``x <- z + F^level(x)`` from ``x = z``."""
        x = z
        for _ in range(self.n_iter):
            x = z + self.contraction(x, level)
            if trace is not None:
                trace.append(x.detach())
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(x)
        trace = [z.detach()] if self.record else None
        x2 = self.solve(z, 2, trace)
        if trace is not None:
            self.trace = trace
        return self.drop2(self.fc2(self.drop1(self.act(x2))))

    def extra_repr(self) -> str:
        return f"widths={list(self.widths)}, n_iter={self.n_iter}, inner_norm={self.inner_norm!r}"


class SymMlp(nn.Module):
    """Symmetric (tied) MLP of the parallelized Mixer: ``y = W^T GELU(W x + b)`` (the authors' ``sMlp``).

    One weight ``W`` (hidden, in) stored as ``fc2`` (the authors' name). It is the adiabatic limit of a hidden layer
    with symmetric couplings ``xi^(v,h) = xi^(h,v)^T``. With ``bias=True``, ``fc2.bias`` (hidden) is a threshold of
    the hidden neurons and enters only the pre-activation; there is no output bias, so the map stays the gradient of
    ``sum(Phi_GELU(W x + b))`` (the reference code creates this bias but never uses it).
    Dropout: ``drop1`` after GELU, ``drop2`` on the output.
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = False, drop: float = 0.0) -> None:
        super().__init__()
        self.fc2 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc2.weight
        h = self.drop1(self.act(F.linear(x, w, self.fc2.bias)))
        return self.drop2(F.linear(h, w.t()))


class AsymMlp(nn.Module):
    """Symmetry-broken MLP: ``y = W1^T GELU(W1 x + b1) + W2 GELU(W1 x + b1) + b2`` (the authors' ``aMlp``).

    ``fc1`` holds ``W1`` (hidden, in) and its bias ``b1`` (hidden neurons' threshold); ``fc2`` holds the
    symmetry-breaking term ``W2`` (in, hidden) and ``b2`` (in). Biases exist only with ``bias=True``.
    ``penalty()`` is ``||W2||_F^2``; with ``W2 = 0`` (and ``b2 = 0``) the module equals `SymMlp` with ``W = W1``.
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = False, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = self.fc1.weight
        h = self.drop1(self.act(F.linear(x, w1, self.fc1.bias)))
        return self.drop2(F.linear(h, w1.t()) + self.fc2(h))

    def penalty(self) -> torch.Tensor:
        """``||W2||_F^2``, the symmetry-breaking penalty of the parallelized Mixer's training loss."""
        return self.fc2.weight.square().sum()
