"""The ViT of ``mixers.vit``: timm equivalence, the MHA score recursion, skip modes and the timm registration.

Max-abs error relative to the reference's max-abs: float64 <= 1e-10, float32 <= 1e-5; random weights far from the
initialisation; batch 3; train and eval mode (all dropout and drop-path rates 0).
"""

import pytest
import timm
import torch
from helpers import DTYPES, INTERMEDIATE_OPTIONS, TOL, assert_same_intermediates, perturb, randn, rel_err
from timm.layers import Attention as TimmAttention
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT

import mixers
from mixers import VIT_MODEL_NAMES, Attention, Block, VisionTransformer, ViTConfig

D, H, N = 48, 3, 10  # embed dim, heads, tokens
SMALL = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=D, depth=2, num_heads=H)


def images(dtype=torch.float64, batch=3):
    return randn(batch, 1, 28, 28, dtype=dtype)


def assert_same(ours, ref, x, dtype, unpack=False):
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        out = ours(x)[0] if unpack else ours(x)
        err = rel_err(out, ref(x))
        assert err <= TOL[dtype], (train, err)


def count(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ timm equivalence
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_equals_timm(dtype, fused):
    ref = perturb(TimmAttention(D, num_heads=H, qkv_bias=True)).to(dtype)
    ref.fused_attn = fused
    ours = Attention(D, H).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same(ours, ref, randn(3, N, D, dtype=dtype), dtype, unpack=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_equals_timm(dtype):
    ref = perturb(TimmBlock(D, H, qkv_bias=True)).to(dtype)
    ours = Block(D, H).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert_same(ours, ref, randn(3, N, D, dtype=dtype), dtype, unpack=True)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_equals_timm(dtype, global_pool):
    ref = perturb(TimmViT(**SMALL, global_pool=global_pool)).to(dtype)
    ours = VisionTransformer(ViTConfig(**SMALL, global_pool=global_pool)).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert_same(ours, ref, images(dtype), dtype)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_intermediates_and_features_only_equal_timm(dtype, global_pool):
    """timm's feature API with the class token split off (and returned with ``return_prefix_tokens``), the final
    norm (an identity under ``avg`` pooling, as in timm), ``feature_info`` and ``features_only=True``."""
    cfg = dict(SMALL, depth=3, global_pool=global_pool)
    ref = perturb(TimmViT(**cfg)).to(dtype)
    ours = VisionTransformer(ViTConfig(**cfg)).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = images(dtype)
    with torch.no_grad():
        assert_same_intermediates(ours, ref, x, dtype, [*INTERMEDIATE_OPTIONS, dict(return_prefix_tokens=True)])
        assert ours.feature_info == ref.feature_info
        theirs = FeatureGetterNet(ref, out_indices=(1,))
        mine = timm.create_model("hvit_t4_28", features_only=True, out_indices=(1,), embed_dim=D, depth=3,
                                 num_heads=H, global_pool=global_pool).to(dtype)
        mine.model.load_state_dict(theirs.model.state_dict(), strict=True)  # both pruned after block 1
        (a,), (b,) = mine(x), theirs(x)
        assert a.shape == b.shape == (3, D, 7, 7) and rel_err(a, b) <= TOL[dtype]
        assert len(mine.model.blocks) == 2


def test_forward_intermediates_of_mha_carries_the_score_state():
    """With alpha_h > 0 each block reads the previous block's scores: the intermediates are the states of
    ``forward_features(..., return_layers=True)``, with and without stopping early."""
    ours = perturb(VisionTransformer(ViTConfig(**SMALL, alpha_h=0.5))).double().eval()
    x = images()
    _, states = ours.forward_features(x, return_layers=True)
    with torch.no_grad():
        for stop_early in (False, True):
            for i in (0, 1):
                (y,) = ours.forward_intermediates(x, indices=[i], output_fmt="NLC", stop_early=stop_early,
                                                  intermediates_only=True)
                assert torch.equal(y, states[i + 1][:, 1:]), (stop_early, i)


# ------------------------------------------------------------------------------------------ MHA
def test_alpha_h_zero_is_standard_and_mha_adds_no_parameters():
    """The MHA model with alpha' = 0 loads timm's ViT weights and computes timm's ViT; alpha' > 0 changes the
    output with the same weights and no new parameter."""
    ref = perturb(TimmViT(**SMALL)).double().eval()
    x = images()
    mha = timm.create_model("mhavit_t4_28", **SMALL, alpha_h=0.0).double().eval()
    mha.load_state_dict(ref.state_dict(), strict=True)
    assert rel_err(mha(x), ref(x)) <= TOL[torch.float64]
    mha = timm.create_model("mhavit_t4_28", **SMALL, alpha_h=0.5).double().eval()
    mha.load_state_dict(ref.state_dict(), strict=True)
    assert count(mha) == count(ref)
    assert rel_err(mha(x), ref(x)) > 1e-3


def hand_scores(block, x):
    """``head_dim^-0.5 q k^T`` per head from the block's own ``qkv`` weights, written out."""
    y = block.norm1(x)
    qkv = y @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, _ = qkv.split(D, dim=-1)
    q = q.reshape(x.shape[0], -1, H, D // H).transpose(1, 2)
    k = k.reshape(x.shape[0], -1, H, D // H).transpose(1, 2)
    return torch.einsum("bhid,bhjd->bhij", q, k) / (D // H) ** 0.5


@pytest.mark.parametrize("a", [0.2, 0.7])
def test_mha_recursion(a):
    model = perturb(VisionTransformer(**{**SMALL, "depth": 3}, alpha_h=a)).double().eval()
    x = images()
    states, scores = model.forward_blocks(model.embed(x))
    h_prev = None
    for n, block in enumerate(model.blocks):
        s = hand_scores(block, states[n])
        expected = s if h_prev is None else a * h_prev + (1 - a) * s
        assert scores[n].shape == (3, H, 1 + 49, 1 + 49)
        assert rel_err(scores[n], expected) <= 1e-12, n
        # the block's output: x + proj(softmax(h_n) v) + mlp(...)
        v = block.attn.qkv_heads(block.norm1(states[n]))[2]
        attn = (expected.softmax(-1) @ v).transpose(1, 2).reshape(3, -1, D)
        mid = states[n] + block.attn.proj(attn)
        assert rel_err(states[n + 1], mid + block.mlp(block.norm2(mid))) <= 1e-12, n
        h_prev = expected
    assert rel_err(model(x), model.head(model.norm(states[-1])[:, 0])) <= 1e-12


def test_attention_h_prev_memory():
    attn = perturb(Attention(D, H)).double()
    x, h_prev = randn(2, N, D), randn(2, H, N, N, seed=5)
    _, s = attn(x)
    _, h = attn(x, h_prev, alpha_h=0.3)
    assert rel_err(h, 0.3 * h_prev + 0.7 * s) <= 1e-13
    _, h = attn(x, h_prev, alpha_h=0.0)
    assert torch.equal(h, s)


# ------------------------------------------------------------------------------------------ skip modes
def zero_branches(block):
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    return block


def test_skip_none_has_no_identity_path():
    block = zero_branches(perturb(Block(D, H, skip="none")).double())
    assert block(randn(2, N, D))[0].abs().max() == 0
    model = perturb(VisionTransformer(**SMALL, skip="none")).double()
    for block in model.blocks:
        zero_branches(block)
    _, states = model.forward_features(images(), return_layers=True)
    assert all(s.abs().max() == 0 for s in states[1:])
    residual = zero_branches(perturb(Block(D, H)).double())
    x = randn(2, N, D)
    assert torch.equal(residual(x)[0], x)


def test_skip_convex():
    x = randn(2, N, D)
    block = perturb(Block(D, H, skip="convex", alpha=1.0)).double()
    with torch.no_grad():
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()
    assert torch.equal(block(x)[0], x)
    block.alpha = 0.3
    a = block.attn(block.norm1(x))[0]
    assert rel_err(block(x)[0], 0.3 * x + 0.7 * a) <= 1e-13
    # stochastic depth drops the update (1 - alpha)(a - x), keeping x, not the attention branch alone
    dropped = zero_branches(perturb(Block(D, H, skip="convex", alpha=0.3, drop_path=1.0)).double()).train()
    with torch.no_grad():
        dropped.attn.proj.bias.fill_(1.0)
    assert torch.equal(dropped(x)[0], x)


def test_invalid_configs():
    with pytest.raises(ValueError):
        ViTConfig(skip="bogus")
    with pytest.raises(ValueError):
        ViTConfig(alpha_h=1.5)
    with pytest.raises(ValueError):
        ViTConfig(skip="none", drop_path_rate=0.1)
    with pytest.raises(ValueError):
        ViTConfig(class_token=False, global_pool="token")


def test_forward_features_layers():
    model = VisionTransformer(**SMALL, alpha_h=0.2)
    out, states = model.forward_features(images(torch.float32, batch=2), return_layers=True)
    assert len(states) == SMALL["depth"] + 1
    assert all(s.shape == (2, 1 + 49, D) for s in states)
    assert torch.equal(out, model.norm(states[-1]))


def test_backward_and_checkpointing():
    model = perturb(VisionTransformer(**SMALL, alpha_h=0.5, drop_path_rate=0.1)).double().eval()
    x = images(batch=2)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reset_classifier_keeps_the_config_in_step(dtype):
    model = VisionTransformer(**SMALL).to(dtype).eval()
    x = images(dtype, batch=2)
    model.reset_classifier(4)
    perturb(model)
    assert model.cfg.num_classes == model.num_classes == 4 and not model.head.training
    rebuilt = VisionTransformer(model.cfg).to(dtype).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))
    model.reset_classifier(6, global_pool="avg")
    assert (model.cfg.num_classes, model.cfg.global_pool) == (6, "avg") and model(x).shape == (2, 6)
    with pytest.raises(ValueError, match="global_pool 'token' is not available"):
        VisionTransformer(**{**SMALL, "global_pool": "avg"}, class_token=False).reset_classifier(3, "token")


# ------------------------------------------------------------------------------------------ timm registration
@pytest.mark.parametrize("name", VIT_MODEL_NAMES)
def test_registered_names_build(name):
    assert timm.is_model(name)
    model = timm.create_model(name, depth=1, in_chans=1, img_size=28, num_classes=7)
    assert isinstance(model, VisionTransformer)
    assert model.cfg.alpha_h == (0.2 if name.startswith("mhavit") else 0.0)
    assert model(images(torch.float32, batch=2)).shape == (2, 7)
    with pytest.raises(RuntimeError, match="pretrained"):
        timm.create_model(name, pretrained=True)


def test_registered_defaults_and_overrides():
    std, mha = timm.create_model("hvit_t4_28"), timm.create_model("mhavit_t4_28")
    assert count(std) == count(mha)
    assert (mha.cfg.embed_dim, mha.cfg.depth, mha.cfg.num_heads, mha.cfg.in_chans) == (192, 12, 3, 1)
    assert std(images(torch.float32, batch=1)).shape == (1, 10)
    small = mixers.vit._VIT_SIZES["s4_32"]
    assert (small["embed_dim"], small["num_heads"], small["in_chans"]) == (384, 6, 3)
    model = timm.create_model("mhavit_t4_32", depth=2, alpha_h=0.5, skip="convex", alpha=0.6)
    assert (model.cfg.depth, model.cfg.alpha_h, model.cfg.skip, model.cfg.alpha) == (2, 0.5, "convex", 0.6)
    with pytest.raises(TypeError):
        timm.create_model("hvit_t4_28", bogus=1)
