"""The ViT block as a limit of a hierarchical Hopfield network, and MHA by keeping the score layer's state.

Network (``vit_block_network``): a visible layer v (N, D) with the LayerNorm Lagrangian over channels, a score
layer s (heads, N, N) with softmax over keys, a channel layer c (N, r D) with GELU; v - s coupled by
``hopfield.AttentionCoupling`` (norm1's affine folded in), v - c by an untied ``DenseSynapse`` (norm2, mlp):

    tau_v dv/dt = proj(softmax(s) V(LN v)) + fc2(GELU(c)) - v
    tau_s ds/dt = scale q k^T - s,   tau_c dc/dt = fc1(LN v) - c          (papers.md section 3)

Adiabatic limit (tau_s, tau_c -> 0): s = scale q k^T, c = fc1(LN v), so the v update is multi-head attention
plus the MLP. One Euler step dt = tau_v with alpha = 0 (iMixer paper Eq. 14), split sequentially (attention,
then MLP), is timm's ViT ``Block``. Keeping s as a state and taking one Euler step of it with step dt gives

    h_n = alpha' h_(n-1) + (1 - alpha') scale q_n k_n^T,   alpha' = 1 - dt / tau_s     (MHA's Euler form)

(``DerivedViTBlock(net, alpha_h)``; h_0 = s_0 for the first block; alpha' = 0 is the adiabatic limit). With the
block's step dt = tau_v, alpha' in (0, 1) means tau_s = tau_v / (1 - alpha') > tau_v: MHA with the residual skip
is a score layer slower than the visible one (alpha' = 0.2: tau_s = 1.25 tau_v). ``DerivedViTBlock(net)`` reads
alpha' from the network's time constants (``score_memory``); ``from_reference_vit`` builds each network with the
tau_s of its model's alpha' (``score_tau``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from hopfield import Affine, AttentionCoupling, DenseSynapse, Layer, Network
from hopfield import lagrangians as lag

from .convert import _copy

__all__ = ["DerivedViT", "DerivedViTBlock", "euler_alpha", "from_reference_vit", "load_reference_vit_block",
           "score_memory", "score_tau", "vit_block_network"]


def vit_block_network(dim: int, seq_len: int, heads: int, mlp_ratio: float = 4.0, ln_eps: float = 1e-6, *,
                      qkv_bias: bool = True, tau_v: float = 1.0, tau_s: float = 0.01, tau_c: float = 0.01) -> Network:
    """The network v (N, D) - s (heads, N, N), v - c (N, mlp_ratio D) whose limits give a ViT block (module doc)."""
    if dim % heads:
        raise ValueError(f"vit_block_network: dim {dim} is not a multiple of heads {heads}")
    layers = {"v": Layer((seq_len, dim), lag.layernorm(axis=-1, eps=ln_eps), tau_v),
              "s": Layer((heads, seq_len, seq_len), lag.softmax(beta=1.0, axis=-1), tau_s),
              "c": Layer((seq_len, int(dim * mlp_ratio)), lag.gelu(), tau_c)}
    syn = [AttentionCoupling("v", "s", heads, dim // heads, qkv_bias=qkv_bias, affine=Affine((dim,))),
           DenseSynapse("v", "c", axis=-1, form="untied", bias=True, bias_fb=True, affine=(dim,))]
    return Network(layers, syn)


def euler_alpha(dt: float, tau: float) -> float:
    """alpha' = 1 - dt / tau: one Euler step of tau dx/dt = I - x is x <- alpha' x + (1 - alpha') I."""
    if not 0 < dt <= tau:
        raise ValueError(f"euler_alpha: need 0 < dt <= tau for alpha' in [0, 1), got dt={dt!r}, tau={tau!r}")
    return 1.0 - dt / tau


def score_memory(tau_v: float, tau_s: float) -> float:
    """MHA's alpha' of a network whose visible layer takes the Euler step dt = tau_v (the residual block):
    ``euler_alpha(tau_v, tau_s)`` when tau_s >= tau_v; 0 when tau_s < tau_v, where an explicit step of s would
    overshoot its target and s is eliminated instead (the adiabatic limit)."""
    return euler_alpha(tau_v, tau_s) if tau_s >= tau_v else 0.0


def score_tau(alpha_h: float, tau_v: float = 1.0, adiabatic_tau: float = 0.01) -> float:
    """The score layer's time constant that ``score_memory`` maps to ``alpha_h``: tau_v / (1 - alpha_h) for
    alpha_h in (0, 1) (a score layer slower than the visible one); ``adiabatic_tau`` for alpha_h = 0."""
    if not 0.0 <= alpha_h < 1.0:
        raise ValueError(f"score_tau: alpha_h must be in [0, 1), got {alpha_h!r}")
    return tau_v / (1.0 - alpha_h) if alpha_h > 0 else adiabatic_tau


class DerivedViTBlock(nn.Module):
    """One sequential Euler step (dt = tau_v, alpha = 0) of ``vit_block_network``'s visible layer; module doc.

    forward(v, h_prev) -> (v, h): h = scale q k^T if h_prev is None or alpha_h == 0, else
    alpha_h h_prev + (1 - alpha_h) scale q k^T; v <- v + proj(softmax(h) V(LN v)); v <- v + fc2(GELU(fc1(LN v))).
    The parameters are the network's (``self.net``).
    """

    def __init__(self, net: Network, alpha_h: float | None = None):
        super().__init__()
        attn = [s for s in net.synapses if isinstance(s, AttentionCoupling)]
        dense = [s for s in net.synapses if isinstance(s, DenseSynapse)]
        if len(attn) != 1 or len(dense) != 1 or len(net.synapses) != 2:
            raise ValueError("DerivedViTBlock: the network must have one AttentionCoupling and one DenseSynapse "
                             "(see vit_block_network)")
        self.net = net
        self._ia, self._im = list(net.synapses).index(attn[0]), list(net.synapses).index(dense[0])
        self.visible, self.scores = self.attn.layers
        if alpha_h is None:  # from the time constants: the step dt = tau_v taken by s too, if it does not overshoot
            alpha_h = score_memory(net.layers[self.visible].tau, net.layers[self.scores].tau)
        if not 0.0 <= alpha_h <= 1.0:
            raise ValueError(f"DerivedViTBlock: alpha_h must be in [0, 1], got {alpha_h!r}")
        self.alpha_h = float(alpha_h)
        if self.mlp.layers[0] != self.visible:
            raise ValueError(f"DerivedViTBlock: the DenseSynapse {self.mlp.name!r} must leave the visible layer "
                             f"{self.visible!r}")
        self.channels = self.mlp.layers[1]

    @property
    def attn(self) -> AttentionCoupling:
        return self.net.synapses[self._ia]

    @property
    def mlp(self) -> DenseSynapse:
        return self.net.synapses[self._im]

    def _act(self, name: str, x: Tensor) -> Tensor:
        return self.net.layers[name].activation(x)

    def forward(self, v: Tensor, h_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        gv = self._act(self.visible, v)
        cur = self.attn.forward_current(gv)
        a = self.alpha_h
        h = cur if h_prev is None or a == 0 else a * h_prev + (1.0 - a) * cur
        v = v + self.attn.feedback_current(self._act(self.scores, h), gv)
        gv = self._act(self.visible, v)
        v = v + self.mlp.feedback_current(self._act(self.channels, self.mlp.forward_current(gv)))
        return v, h

    def explain(self) -> str:
        """The update rule, written from the network: its layers' activations (each Lagrangian's symbol), the
        couplings' affines and biases, and alpha' from the time constants."""
        v, s, c = self.visible, self.scores, self.channels
        layers = self.net.layers

        def act(name: str, x: str) -> str:
            sym = layers[name].lagrangian.symbol
            return f"{sym}({x})" if sym else x

        gv = act(v, v)
        qin = f"Affine^({s},{v})({gv})" if self.attn.affine is not None else gv
        ratio = layers[s].tau / layers[v].tau
        cur = f"scale q k^T({qin})"
        hs = (f"{s} <- {self.alpha_h:g} {s} + {1 - self.alpha_h:g} {cur}  (tau_{s} / tau_{v} = {ratio:g})"
              if self.alpha_h else f"{s} <- {cur}  (adiabatic: tau_{s} / tau_{v} = {ratio:g})")
        mlp = self.mlp
        xin = f"Affine^({c},{v})({gv})" if mlp.affine is not None else gv
        inner = f"xi^({c},{v}) {xin}" + (f" + b^({c},{v})" if mlp.has_bias else "")
        out = f"xi^({v},{c}) {act(c, inner)}" + (f" + b^({v},{c})" if mlp.has_bias_fb else "")
        return f"{hs}\n{v} <- {v} + W_o {act(s, s)} V({qin})\n{v} <- {v} + {out}"

    def extra_repr(self) -> str:
        return f"alpha_h={self.alpha_h:g}\n" + self.explain()


# ---------------------------------------------------------------------------------------------- name maps
def _vit_block_map(block: DerivedViTBlock) -> list[tuple[str, str]]:
    a, m = f"net.synapses.{block._ia}", f"net.synapses.{block._im}"
    pairs = [(f"{a}.affine.weight", "norm1.weight"), (f"{a}.affine.bias", "norm1.bias"),
             (f"{a}.qkv.weight", "attn.qkv.weight"),
             (f"{a}.proj.weight", "attn.proj.weight"), (f"{a}.proj.bias", "attn.proj.bias"),
             (f"{m}.affine.weight", "norm2.weight"), (f"{m}.affine.bias", "norm2.bias"),
             (f"{m}.weight", "mlp.fc1.weight"), (f"{m}.bias", "mlp.fc1.bias"),
             (f"{m}.weight_fb", "mlp.fc2.weight"), (f"{m}.bias_fb", "mlp.fc2.bias")]
    if block.attn.qkv.bias is not None:
        pairs.append((f"{a}.qkv.bias", "attn.qkv.bias"))
    return pairs


def load_reference_vit_block(block: DerivedViTBlock, ref_block: nn.Module) -> DerivedViTBlock:
    """Copy a ViT block's weights (timm's or ``mixers.Block``'s names) into ``block``; unmapped keys are refused."""
    _copy(block, ref_block.state_dict(), _vit_block_map(block), False,
          f"load_reference_vit_block({type(ref_block).__name__})")
    return block


class DerivedViT(nn.Module):
    """A ``mixers.VisionTransformer`` whose blocks are ``DerivedViTBlock``s (build with ``from_reference_vit``).

    Embedding, final norm, pooling and head are the reference's modules (copied); the blocks carry the score
    state h from one to the next (h_0 = s_0).
    """

    def __init__(self, ref: nn.Module, blocks: list[DerivedViTBlock]):
        super().__init__()
        self.patch_embed = copy.deepcopy(ref.patch_embed)
        self.cls_token = None if ref.cls_token is None else nn.Parameter(ref.cls_token.detach().clone())
        self.pos_embed = nn.Parameter(ref.pos_embed.detach().clone())
        self.pos_drop = copy.deepcopy(ref.pos_drop)
        self.blocks = nn.ModuleList(blocks)
        self.norm = copy.deepcopy(ref.norm)
        self.fc_norm = copy.deepcopy(ref.fc_norm)
        self.head_drop = copy.deepcopy(ref.head_drop)
        self.head = copy.deepcopy(ref.head)
        self.global_pool = ref.global_pool
        self.num_prefix_tokens = ref.num_prefix_tokens
        self.pretrained_cfg = self.default_cfg = dict(getattr(ref, "pretrained_cfg", {}))

    def embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        x, h = self.embed(x), None
        for block in self.blocks:
            x, h = block(x, h)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def explain(self) -> str:
        return self.blocks[0].explain()


def from_reference_vit(model: nn.Module) -> DerivedViT:
    """A ``mixers.VisionTransformer`` (residual skips, no dropout inside blocks) as the equivalent derived ViT."""
    import mixers

    if not isinstance(model, mixers.VisionTransformer):
        raise TypeError(f"from_reference_vit expects a mixers.VisionTransformer (timm.create_model('hvit_t4_28'), "
                        f"...), got {type(model).__name__}")
    cfg = model.cfg
    if cfg.skip != "residual":
        raise ValueError(f"from_reference_vit: skip {cfg.skip!r} has no derived counterpart (only 'residual')")
    for name in ("proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
        if getattr(cfg, name):
            raise ValueError(f"from_reference_vit: {name} = {getattr(cfg, name)} has no derived counterpart")
    n = model.num_prefix_tokens + model.patch_embed.num_patches
    ref = next(model.parameters())
    blocks = []
    for rb in model.blocks:
        net = vit_block_network(cfg.embed_dim, n, cfg.num_heads, cfg.mlp_ratio, rb.norm1.eps, qkv_bias=cfg.qkv_bias,
                                tau_s=score_tau(cfg.alpha_h))
        block = DerivedViTBlock(net).to(dtype=ref.dtype, device=ref.device)
        if abs(block.alpha_h - cfg.alpha_h) > 1e-12:
            raise ValueError(f"from_reference_vit: alpha_h {cfg.alpha_h} has no score time constant (got "
                             f"{block.alpha_h})")
        blocks.append(load_reference_vit_block(block, rb))
    return DerivedViT(model, blocks)
