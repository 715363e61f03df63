"""Attention as a coupling between a visible token layer and a layer of attention scores.

A visible layer v of shape (N, D) (activation g_v, e.g. LN(v)) and a score layer s of shape (heads, N, N)
whose Lagrangian is ``softmax(beta=1, axis=-1)`` (activation g_s = softmax over keys). With timm's fused
projection ``qkv`` (q, k, v stacked, (3D, D)), the output projection ``proj`` (D, D), per head h and
scale = head_dim^-1/2:

    q_h, k_h, v_h = split(qkv(g~_v)),  g~_v = gamma * g_v + beta (the folded LayerNorm affine, optional)
    I^s_h = scale q_h k_h^T                                    current into s: bilinear in g_v
    I^v   = proj(concat_h(g_s,h v_h))                          current into v: depends on g_s and g_v

so that tau_s ds/dt = I^s - s and tau_v dv/dt = I^v - v (papers.md section 3: tau_h dh/dt = g(x) W2 - h,
tau_v dx/dt = f(h) W1^T - x). The feedback is a three-body term (g_s, g_v, g_v): the currents are not the
gradient of any energy (the Ramsauer / Krotov correspondence needs the adiabatic limit and tied matrices).
``energy`` is the pseudo-energy E = -<g_s, I^s> per sample, whose -dE/dg_s is I^s but whose -dE/dg_v is not I^v.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import Layer
from .synapses import Affine, Synapse

__all__ = ["AttentionCoupling"]


class AttentionCoupling(Synapse):
    """Multi-head attention between a visible layer (N, D) and a score layer (heads, N, N); module docstring.

    ``qkv`` (nn.Linear D -> 3D, bias when ``qkv_bias``) and ``proj`` (nn.Linear D -> D) carry timm's names and
    layout. ``affine`` (a shape, or an ``Affine`` to share) is applied to g_v before ``qkv``: a LayerNorm's
    gamma, beta folded into the coupling. Not symmetric: ``energy`` is a pseudo-energy (see ``caveats``).
    """

    symmetric = False

    def __init__(self, visible: str, scores: str, heads: int, head_dim: int, *, qkv_bias: bool = True,
                 affine: tuple[int, ...] | int | Affine | None = None):
        super().__init__()
        where = f"AttentionCoupling({visible!r}, {scores!r})"
        if visible == scores:
            raise ValueError(f"{where}: a synapse must couple two different layers")
        for what, n in (("heads", heads), ("head_dim", head_dim)):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"{where}: {what} must be a positive int, got {n!r}")
        self.layers = (visible, scores)
        self.heads, self.head_dim = heads, head_dim
        self.dim = dim = heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.affine = affine if affine is None or isinstance(affine, Affine) else Affine(affine)

    def extra_repr(self) -> str:
        return f"{self.layers[0]!r} <-> {self.layers[1]!r}, heads={self.heads}, head_dim={self.head_dim}"

    def caveats(self) -> list[str]:
        return [f"synapse {self.name!r}: the attention coupling's feedback proj(softmax(s) V(g_v)) is a three-body "
                "term, not the gradient of any energy (that holds only in the adiabatic limit with tied "
                "matrices), so its energy -<g_s, scale q k^T> is a pseudo-energy"]

    def bind(self, layers: dict[str, Layer]) -> None:
        v, s = self.layers
        sv, ss = layers[v].shape, layers[s].shape
        where = f"AttentionCoupling {self.name!r} (layer {v!r} of shape {sv}, layer {s!r} of shape {ss})"
        if len(sv) != 2 or sv[1] != self.dim:
            raise ValueError(f"{where}: layer {v!r} must have shape (N, D) with D = heads * head_dim = {self.dim}")
        want = (self.heads, sv[0], sv[0])
        if ss != want:
            raise ValueError(f"{where}: layer {s!r} must have shape (heads, N, N) = {want}")
        if self.affine is not None and tuple(self.affine.weight.shape) not in ((self.dim,), sv):
            raise ValueError(f"{where}: affine of shape {tuple(self.affine.weight.shape)} must be (D,) or (N, D)")

    # ------------------------------------------------------------------ pieces
    def qkv_heads(self, gv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of shape (batch, heads, N, head_dim) from qkv(gamma * g_v + beta) (timm's layout)."""
        if self.affine is not None:
            gv = self.affine(gv)
        b, n, _ = gv.shape
        q, k, v = self.qkv(gv).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward_current(self, gv: Tensor) -> Tensor:
        """I^s = scale q k^T per head, (batch, heads, N_queries, N_keys)."""
        q, k, _ = self.qkv_heads(gv)
        return (q * self.scale) @ k.transpose(-2, -1)

    def feedback_current(self, gs: Tensor, gv: Tensor) -> Tensor:
        """I^v = proj(concat_h(g_s,h v_h)), (batch, N, D): the attention output."""
        _, _, v = self.qkv_heads(gv)
        b, _, n, _ = v.shape
        return self.proj((gs @ v).transpose(1, 2).reshape(b, n, self.dim))

    def energy(self, g: dict[str, Tensor]) -> Tensor:
        """Pseudo-energy E = -<g_s, scale q k^T> per sample, shape (batch,)."""
        v, s = self.layers
        return -(g[s] * self.forward_current(g[v])).reshape(g[s].shape[0], -1).sum(-1)

    def currents(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        v, s = self.layers
        return {s: self.forward_current(g[v]), v: self.feedback_current(g[s], g[v])}
