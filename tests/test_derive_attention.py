"""The ViT block derived from a Hopfield network with an attention coupling (derive.attention, hopfield.coupling).

Max-abs error relative to the reference's max-abs: float64 <= 1e-10, float32 <= 1e-5; random weights; batch 3;
train and eval mode.
"""

import pytest
import torch
from helpers import DTYPES, TOL, perturb, randn, rel_err
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT

import derive
import mixers
from derive import (
    DerivedViTBlock,
    euler_alpha,
    from_reference_vit,
    load_reference_vit_block,
    vit_block_network,
)
from hopfield import AttentionCoupling, DenseSynapse, Layer, Network
from hopfield import lagrangians as lag

D, H, N = 48, 3, 10
SMALL = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=D, depth=3, num_heads=H,
             global_pool="token")


def derived_from(ref_block, alpha_h, dtype):
    net = vit_block_network(D, N, H)
    return load_reference_vit_block(DerivedViTBlock(net, alpha_h).to(dtype), ref_block)


# ------------------------------------------------------------------------------------------ block equivalence
@pytest.mark.parametrize("alpha_h", [0.0, 0.2, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_equals_mixers_block(dtype, alpha_h):
    ref = perturb(mixers.Block(D, H)).to(dtype)
    ours = derived_from(ref, alpha_h, dtype)
    x, h_prev = randn(3, N, D, dtype=dtype), randn(3, H, N, N, dtype=dtype, seed=2)
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        for hp in (None, h_prev):
            v, h = ours(x, hp)
            v_ref, h_ref = ref(x, hp, alpha_h)
            assert rel_err(v, v_ref) <= TOL[dtype], (train, hp is None)
            assert rel_err(h, h_ref) <= TOL[dtype], (train, hp is None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_equals_timm_block(dtype):
    ref = perturb(TimmBlock(D, H, qkv_bias=True)).to(dtype)
    mixers.Block(D, H).load_state_dict(ref.state_dict(), strict=True)  # the same names
    ours = derived_from(ref, 0.0, dtype)
    x = randn(3, N, D, dtype=dtype)
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        assert rel_err(ours(x)[0], ref(x)) <= TOL[dtype]


def test_parameters_are_the_networks_and_unmapped_keys_are_refused():
    ref = mixers.Block(D, H)
    ours = derived_from(ref, 0.0, torch.float64)
    assert all(name.startswith("net.synapses.") for name, _ in ours.named_parameters())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    sd = dict(ref.state_dict())
    sd["ls1.gamma"] = torch.ones(D)

    class Extra(torch.nn.Module):
        def state_dict(self, *a, **k):
            return sd

    with pytest.raises(ValueError, match=r"ls1\.gamma"):
        load_reference_vit_block(ours, Extra())
    assert "softmax" in ours.explain() and "0.2" in DerivedViTBlock(ours.net, 0.2).explain()
    assert "GELU(xi^(c,v) Affine^(c,v)(LN(v)) + b^(c,v)) + b^(v,c)" in ours.explain()
    # the text is written from the network: a ReLU channel layer reads ReLU, not a hard-coded GELU
    net = derive.vit_block_network(8, 5, 2)
    relu = Network({**net.layers, "c": Layer(net.layers["c"].shape, lag.relu(), 0.01)}, list(net.synapses))
    text = DerivedViTBlock(relu).explain()
    assert "ReLU(xi^(c,v)" in text and "GELU" not in text


# ------------------------------------------------------------------------------------------ whole model
@pytest.mark.parametrize("alpha_h", [0.0, 0.2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_equals_mixers_vit(dtype, alpha_h):
    ref = perturb(mixers.VisionTransformer(**SMALL, alpha_h=alpha_h)).to(dtype)
    ours = from_reference_vit(ref)
    x = randn(3, 1, 28, 28, dtype=dtype)
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        assert rel_err(ours(x), ref(x)) <= TOL[dtype], train
    assert ours.pretrained_cfg == ref.pretrained_cfg  # timm's data helpers see the same input size


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_equals_timm_vit(dtype):
    timm_model = perturb(TimmViT(**SMALL)).to(dtype)
    ref = mixers.VisionTransformer(**SMALL).to(dtype)
    ref.load_state_dict(timm_model.state_dict(), strict=True)
    ours = from_reference_vit(ref)
    x = randn(3, 1, 28, 28, dtype=dtype)
    for train in (True, False):
        ours.train(train)
        timm_model.train(train)
        assert rel_err(ours(x), timm_model(x)) <= TOL[dtype], train


def test_from_reference_vit_refuses_what_it_cannot_derive():
    with pytest.raises(ValueError, match="skip"):
        from_reference_vit(mixers.VisionTransformer(**SMALL, skip="convex"))
    with pytest.raises(ValueError, match="drop_path_rate"):
        from_reference_vit(mixers.VisionTransformer(**SMALL, drop_path_rate=0.1))


# ------------------------------------------------------------------------------------------ the network
def small_net(eps=0.01, seed=0):
    torch.manual_seed(seed)
    net = vit_block_network(8, 4, 2, mlp_ratio=2.0, tau_s=eps, tau_c=eps).double()
    return perturb(net, 0.3, seed)


def test_adiabatic_limit_of_the_network():
    """tau_s = tau_c = eps: after t = 1 dv/dt -> F(v) - v (F on the slow manifold), error ~ eps."""
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        net = small_net(eps)
        attn, mlp = net.synapses
        state = net.init_state(3, scale=0.0)
        state["v"] = randn(3, 4, 8)
        traj = net.simulate(state, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-10)
        end = traj.final()
        v = end["v"]
        gv = net.layers["v"].activation(v)
        fv = (attn.feedback_current(torch.softmax(attn.forward_current(gv), -1), gv)
              + mlp.feedback_current(torch.nn.functional.gelu(mlp.forward_current(gv))))
        vf = net.vector_field(end)["v"]
        errs.append(((vf - (fv - v)).abs().max() / (fv - v).abs().max()).item())
    assert errs[2] < errs[1] < errs[0] < 0.5, errs
    for a, b in zip(errs, errs[1:]):
        assert 5 < a / b < 20, errs  # ~ proportional to eps


def test_mha_alpha_is_one_euler_step_of_the_score_layer():
    net = small_net(0.05)
    attn = net.synapses[0]
    state = net.init_state(3, generator=torch.Generator().manual_seed(3))
    dt = 0.04
    alpha = euler_alpha(dt, net.layers["s"].tau)
    assert alpha == pytest.approx(1 - 0.04 / 0.05)
    euler = state["s"] + dt * net.vector_field(state)["s"]
    current = attn.forward_current(net.layers["v"].activation(state["v"]))
    assert rel_err(euler, alpha * state["s"] + (1 - alpha) * current) <= 1e-12
    _, h = DerivedViTBlock(net, alpha)(state["v"], state["s"])
    assert rel_err(h, euler) <= 1e-12
    with pytest.raises(ValueError):
        euler_alpha(0.1, 0.05)


def test_mha_block_takes_its_alpha_from_the_time_constants():
    """The block steps v with dt = tau_v; the same step for s gives alpha' = 1 - tau_v / tau_s, so MHA's
    alpha' = 0.2 is a score layer with tau_s = 1.25 tau_v, and tau_s < tau_v is the adiabatic alpha' = 0."""
    slow = perturb(vit_block_network(8, 4, 2, mlp_ratio=2.0, tau_s=2.5).double(), 0.3, 1)
    block = DerivedViTBlock(slow)
    assert block.alpha_h == pytest.approx(0.6, abs=1e-15) and "tau_s / tau_v = 2.5" in block.explain()
    state = slow.init_state(3, generator=torch.Generator().manual_seed(4))
    euler = state["s"] + 1.0 * slow.vector_field(state)["s"]  # one step dt = tau_v = 1
    assert rel_err(block(state["v"], state["s"])[1], euler) <= 1e-12
    assert DerivedViTBlock(small_net(0.01)).alpha_h == 0.0
    assert derive.score_memory(1.0, derive.score_tau(0.2)) == pytest.approx(0.2, abs=1e-15)
    derived = from_reference_vit(perturb(mixers.VisionTransformer(**SMALL, alpha_h=0.2)).double())
    for b in derived.blocks:
        assert b.net.layers["s"].tau == pytest.approx(1.25) and b.net.layers["v"].tau == 1.0
        assert b.alpha_h == pytest.approx(0.2, abs=1e-15)
    with pytest.raises(ValueError, match="alpha_h must be in"):
        derive.score_tau(1.0)


def test_caveats_and_pseudo_energy():
    net = small_net()
    caveats = " ".join(net.descent_caveats())
    assert "'v-s'" in caveats and "pseudo-energy" in caveats and "three-body" in caveats
    assert not net.descent_guaranteed and not AttentionCoupling.symmetric
    state = net.init_state(2, generator=torch.Generator().manual_seed(4))
    g = net.activations(state)
    attn = net.synapses[0]
    e = attn.energy(g)
    assert e.shape == (2,)
    assert torch.allclose(e, -(g["s"] * attn.forward_current(g["v"])).sum((1, 2, 3)))
    # -dE/dg_s is the current into s; the current into v is not -dE/dg_v
    auto = super(AttentionCoupling, attn).currents(g)
    exact = attn.currents(g)
    assert torch.allclose(auto["s"], exact["s"])
    assert not torch.allclose(auto["v"], exact["v"])
    traj = net.simulate(state, torch.tensor([0.0, 0.1], dtype=torch.float64))
    assert traj.energy.shape == (2, 2) and torch.isfinite(traj.energy).all()


def test_bind_checks_shapes():
    ln, sm = lag.layernorm(), lag.softmax()
    with pytest.raises(ValueError, match=r"AttentionCoupling 'v-s'.*\(heads, N, N\)"):
        Network({"v": Layer((4, 8), ln), "s": Layer((2, 4, 5), sm)}, [AttentionCoupling("v", "s", 2, 4)])
    with pytest.raises(ValueError, match=r"AttentionCoupling 'v-s'.*layer 'v'.*heads \* head_dim"):
        Network({"v": Layer((4, 6), ln), "s": Layer((2, 4, 4), sm)}, [AttentionCoupling("v", "s", 2, 4)])
    with pytest.raises(ValueError, match="affine"):
        Network({"v": Layer((4, 8), ln), "s": Layer((2, 4, 4), sm)}, [AttentionCoupling("v", "s", 2, 4, affine=(3,))])
    net = Network({"v": Layer((4, 8), ln), "s": Layer((2, 4, 4), sm), "c": Layer((4, 16), lag.gelu())},
                  [AttentionCoupling("v", "s", 2, 4, qkv_bias=False), DenseSynapse("v", "c", form="untied")])
    assert net.synapses[0].qkv.bias is None
    vf = net.vector_field(net.init_state(2))
    assert vf["s"].shape == (2, 2, 4, 4) and vf["v"].shape == (2, 4, 8)
