"""The Energy Transformer's attention energy (Hoover et al. 2023) as a synapse on one token x channel layer.

With g the layer's activation, tokens B, C (N of them) and channels j (D of them), per head h and head
channel a (Y = ``head_dim`` of them):

    K_{haB} = sum_j W^K_{haj} g_{Bj},   Q_{haC} = sum_j W^Q_{haj} g_{Cj},   A_{hBC} = sum_a K_{haB} Q_{haC}
    E = -(1/beta) sum_h sum_C log sum_{B (!= C with exclude_self)} exp(beta A_{hBC})

Layout: ``attention_scores`` returns A with shape (batch, heads, N_keys, N_queries), A[b, h, B, C]; the
softmax runs over the key axis -2. Writing P_{hBC} = softmax_B(beta A_{hBC}) (P_{hCC} = 0 with
exclude_self), dE/dA_{hBC} = -P_{hBC}, and the current into token T is

    -dE/dg_{Tj} = sum_h sum_a [ W^K_{haj} sum_C P_{hTC} Q_{haC}      (T as a key, through K)
                              + W^Q_{haj} sum_B P_{hBT} K_{haB} ]    (T as a query, through Q)

It is the exact negative gradient of E, so the synapse is symmetric and descent (Krotov 2021, Eq. 18)
holds with convex Lagrangians.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .layers import Layer
from .synapses import Synapse

__all__ = ["AttentionSynapse"]


def _positive_int(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {what} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{where}: {what} must be a positive int, got {value!r}")
    return value


class AttentionSynapse(Synapse):
    """Multi-head attention energy on one layer of shape (N, D) (Energy Transformer, E^ATT; module docstring).

    ``weight_q`` and ``weight_k`` have shape (heads, head_dim, D) and are created in ``bind`` (N(0, init_std^2),
    init_std = 1/sqrt(D) by default) unless given. ``beta`` defaults to 1/sqrt(head_dim). ``exclude_self``
    drops B = C from each sum (the ET tutorial's ``prevent_self_attention``). ``token_axis`` is the token
    axis of the layer shape (-2: states (N, D); -1: states (D, N)); the other axis holds the channels.
    """

    def __init__(self, layer: str, heads: int, head_dim: int, beta: float | None = None, exclude_self: bool = False,
                 *, token_axis: int = -2, weight_q: Tensor | None = None, weight_k: Tensor | None = None,
                 init_std: float | None = None):
        super().__init__()
        where = f"AttentionSynapse({layer!r})"
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"{where}: layer must be a non-empty layer name")
        self.heads = _positive_int(heads, "heads", where)
        self.head_dim = _positive_int(head_dim, "head_dim", where)
        beta = 1.0 / math.sqrt(head_dim) if beta is None else float(beta)
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"{where}: beta must be finite and > 0, got {beta!r}")
        if isinstance(token_axis, bool) or not isinstance(token_axis, int):
            raise TypeError(f"{where}: token_axis must be an int, got {token_axis!r}")
        if init_std is not None and not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"{where}: init_std must be finite and >= 0, got {init_std!r}")
        self.layers = (layer,)
        self.beta = beta
        self.exclude_self = bool(exclude_self)
        self.token_axis = token_axis
        self.init_std = init_std
        self._init = {"weight_q": weight_q, "weight_k": weight_k}
        self._tokens_last = False  # set by bind: the state is (D, N)

    def extra_repr(self) -> str:
        return (f"{self.layers[0]!r}, heads={self.heads}, head_dim={self.head_dim}, beta={self.beta:g}, "
                f"exclude_self={self.exclude_self}, token_axis={self.token_axis}")

    def bind(self, layers: dict[str, Layer]) -> None:
        (name,) = self.layers
        shape = layers[name].shape
        where = f"AttentionSynapse {self.name!r} (layer {name!r} of shape {shape})"
        if len(shape) != 2:
            raise ValueError(f"{where}: the layer state must have rank 2, (tokens N, channels D), "
                             f"got rank {len(shape)}")
        if not -2 <= self.token_axis < 2:
            raise ValueError(f"{where}: token_axis {self.token_axis} is out of range for rank-2 states")
        tok = self.token_axis % 2
        n, d = shape[tok], shape[1 - tok]
        if self.exclude_self and n < 2:
            raise ValueError(f"{where}: exclude_self needs at least 2 tokens, got N = {n}: every sum over "
                             "B != C would be empty")
        self._tokens_last = tok == 1
        want = (self.heads, self.head_dim, d)
        if "weight_q" in self._parameters:  # already bound: the shapes must still fit
            for key in ("weight_q", "weight_k"):
                got = tuple(getattr(self, key).shape)
                if got != want:
                    raise ValueError(f"{where}: {key} has shape {got}, expected (heads, head_dim, D) = {want}")
            return
        std = self.init_std if self.init_std is not None else 1.0 / math.sqrt(d)
        weights = {}
        for key, init in self._init.items():
            if init is not None:
                w = torch.as_tensor(init).detach().clone()
                if not w.is_floating_point():
                    w = w.to(torch.get_default_dtype())
                if tuple(w.shape) != want:
                    raise ValueError(f"{where}: {key} has shape {tuple(w.shape)}, expected (heads, head_dim, D) "
                                     f"= {want}")
            else:
                w = torch.randn(want) * std
            weights[key] = w
        self.weight_q = nn.Parameter(weights["weight_q"])
        self.weight_k = nn.Parameter(weights["weight_k"])
        self._init = {"weight_q": None, "weight_k": None}

    # ------------------------------------------------------------------ pieces
    def _tokens(self, g: Mapping[str, Tensor] | Tensor) -> Tensor:
        """The activation as (batch, N, D)."""
        x = g[self.layers[0]] if isinstance(g, Mapping) else g
        return x.transpose(-1, -2) if self._tokens_last else x

    def _project(self, x: Tensor, w: Tensor) -> Tensor:
        """(batch, N, D) -> (batch, heads, N, head_dim): K_{haB} or Q_{haC}."""
        b, n, _ = x.shape
        return (x @ w.reshape(-1, w.shape[-1]).T).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def _logits(self, k: Tensor, q: Tensor) -> Tensor:
        """beta A with the diagonal at -inf when self-attention is excluded, (batch, heads, N_keys, N_queries)."""
        z = self.beta * (k @ q.transpose(-1, -2))
        if self.exclude_self:
            n = z.shape[-1]
            z = z.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
        return z

    def attention_scores(self, g: Mapping[str, Tensor] | Tensor) -> Tensor:
        """A_{hBC} = sum_a K_{haB} Q_{haC} (no beta, no mask), shape (batch, heads, N_keys, N_queries).

        ``g``: the activations (a dict by layer name) or this layer's activation tensor.
        """
        x = self._tokens(g)
        return self._project(x, self.weight_k) @ self._project(x, self.weight_q).transpose(-1, -2)

    def attention_weights(self, g: Mapping[str, Tensor] | Tensor) -> Tensor:
        """P_{hBC} = softmax over keys B of beta A_{hBC} (0 at B = C with exclude_self), same layout."""
        x = self._tokens(g)
        return torch.softmax(self._logits(self._project(x, self.weight_k), self._project(x, self.weight_q)), dim=-2)

    # ------------------------------------------------------------------ energy and currents
    def energy(self, g: dict[str, Tensor]) -> Tensor:
        """E = -(1/beta) sum_h sum_C logsumexp_B(beta A_{hBC}) per sample, shape (batch,)."""
        x = self._tokens(g)
        z = self._logits(self._project(x, self.weight_k), self._project(x, self.weight_q))
        return -torch.logsumexp(z, dim=-2).sum((-2, -1)) / self.beta

    def currents(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        """-dE/dg_{Tj} = sum_{h,a} [W^K_{haj} (P Q)_{haT} + W^Q_{haj} (P^T K)_{haT}] in closed form."""
        x = self._tokens(g)
        b, n, d = x.shape
        k, q = self._project(x, self.weight_k), self._project(x, self.weight_q)
        p = torch.softmax(self._logits(k, q), dim=-2)  # (batch, heads, keys, queries)
        dk = p @ q  # sum_C P_{hTC} Q_{haC}: (batch, heads, N, head_dim)
        dq = p.transpose(-1, -2) @ k  # sum_B P_{hBT} K_{haB}
        hy = self.heads * self.head_dim
        out = (dk.transpose(1, 2).reshape(b, n, hy) @ self.weight_k.reshape(hy, d)
               + dq.transpose(1, 2).reshape(b, n, hy) @ self.weight_q.reshape(hy, d))
        return {self.layers[0]: out.transpose(-1, -2) if self._tokens_last else out}
