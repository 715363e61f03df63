"""Derived blocks and models equal the hand-written ``mixers`` modules and timm's Mixer.

Max-abs error relative to the output's max-abs: float64 <= 1e-10, float32 <= 1e-5; random weights far from the
initialisation; batch 3; train and eval mode (dropout and drop-path 0 unless a test seeds both twins alike; in train
mode the spectral-norm power iterations run in both twins and must leave the same state).
"""

import pytest
import timm
import torch
from helpers import DTYPES, TOL, perturb, rel_err
from timm.models.mlp_mixer import MixerBlock as TimmMixerBlock

import derive
import mixers

S, C = 12, 8  # tokens, channels


def assert_same(derived, ref, x, dtype, buffers=True):
    for train in (True, False):
        derived.train(train)
        ref.train(train)
        out_d, out_r = derived(x), ref(x)
        assert rel_err(out_d, out_r) <= TOL[dtype], (train, rel_err(out_d, out_r))
    if buffers:  # the spectral-norm state and the BatchNorm statistics moved identically
        for key_d, key_r in derive.convert._block_map(derived):
            if key_d.startswith(("spectral.", "batch_norm.")):
                b_d, b_r = derived.state_dict()[key_d], ref.state_dict()[key_r]
                assert (b_d - b_r).abs().max() <= 10 * TOL[dtype], key_d


def pair(kind, ref, dtype, **kw):
    ref = perturb(ref).to(dtype)
    block = derive.derived_block(kind, S, C, **kw).to(dtype)
    derive.load_reference_block(block, ref)
    x = torch.randn(3, S, C, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return block, ref, x


# ------------------------------------------------------------------------------------------ blocks
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixer_block_equals_handwritten_and_timm(dtype):
    block, ref, x = pair("mixer", mixers.MixerBlock(C, S), dtype)
    assert_same(block, ref, x, dtype)
    tm = TimmMixerBlock(C, S).to(dtype)
    tm.load_state_dict(ref.state_dict(), strict=True)
    assert_same(block, tm, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_iter", [1, 3])
def test_vanilla_mixer_block_equals_handwritten(dtype, n_iter):
    """The parallelized-Mixer authors' serial baseline: LayerNorm Lagrangian over the whole matrix, no biases, the
    block repeated n_iter times (Euler steps of the derived block with the same weights)."""
    ref = mixers.MixerBlock(C, S, norm="matrix", bias=False, n_iter=n_iter)
    block, ref, x = pair("mixer", ref, dtype, norm="matrix", bias=False, steps=n_iter)
    assert_same(block, ref, x, dtype)
    assert "LN(v)" in block.explain() and "b^(" not in block.explain()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_ratio, n_iter", [(2, 2), (1, 4), (2, 1)])
@pytest.mark.parametrize("inner_norm", ["spectral", "none", "batch"])
def test_imixer_block_equals_handwritten(dtype, h_ratio, n_iter, inner_norm):
    # the iMixer's Table 3 arms too: spectral norm, none, BatchNorm in its place (whose running statistics must
    # move identically in train mode, and are then used in eval mode)
    ref = mixers.IMixerBlock(C, S, h_ratio=h_ratio, n_iter=n_iter, inner_norm=inner_norm)
    block, ref, x = pair("imixer", ref, dtype, h_ratio=h_ratio, n_iter=n_iter, inner_norm=inner_norm)
    assert_same(block, ref, x, dtype)
    if inner_norm == "batch":
        assert block.state_dict()["batch_norm.x_h.num_batches_tracked"] == n_iter  # one per call in the loop


def test_imixer_block_under_bf16_autocast_matches_handwritten_and_keeps_float32_sigma():
    # the training recipe's mixed precision: both twins keep the spectral-norm state in float32, so it moves
    # identically; outputs agree to bf16 rounding and gradients reach every parameter
    ref = mixers.IMixerBlock(C, S, h_ratio=2, n_iter=2)
    block, ref, x = pair("imixer", ref, torch.float32, h_ratio=2, n_iter=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_d, out_r = block(x), ref(x)
    assert out_d.dtype == out_r.dtype
    assert rel_err(out_d.float(), out_r.float()) <= 2e-2
    out_d.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters() if p.requires_grad)
    for key_d, key_r in derive.convert._block_map(block):
        if key_d.startswith("spectral."):
            b_d, b_r = block.state_dict()[key_d], ref.state_dict()[key_r]
            assert b_d.dtype == torch.float32 and (b_d - b_r).abs().max() <= 1e-5, key_d


@pytest.mark.parametrize("inner_norm", ["none", "batch"])
def test_imixer_ablation_arms_under_bf16_autocast_match_handwritten(inner_norm):
    ref = mixers.IMixerBlock(C, S, h_ratio=2, n_iter=2, inner_norm=inner_norm)
    block, ref, x = pair("imixer", ref, torch.float32, h_ratio=2, n_iter=2, inner_norm=inner_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_d, out_r = block(x), ref(x)
    assert rel_err(out_d.float(), out_r.float()) <= 2e-2
    out_d.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_imixer_without_iterations_is_the_mixer_block(dtype):
    """n_iter = 0: iMlp is a plain MLP, and the derived iMixer block is the derived Mixer block."""
    ref = mixers.IMixerBlock(C, S, h_ratio=2, n_iter=0)
    block, ref, x = pair("imixer", ref, dtype, h_ratio=2, n_iter=0)
    assert_same(block, ref, x, dtype)
    plain = mixers.MixerBlock(C, S).to(dtype)
    plain.load_state_dict({k: v for k, v in ref.state_dict().items() if "fc_sn" not in k}, strict=True)
    mixer = derive.derived_block("mixer", S, C).to(dtype)
    derive.load_reference_block(mixer, plain)
    assert_same(mixer, block, x, dtype, buffers=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth, inner_norm", [(3, "spectral"), (4, "spectral"), (5, "spectral"), (4, "none"),
                                               (4, "batch")])
def test_l_layer_imixer_block_equals_handwritten(dtype, depth, inner_norm):
    ref = mixers.LiMixerBlock(C, S, depth=depth, h_ratio=1.5, n_iter=2, inner_norm=inner_norm)
    block, ref, x = pair("limixer", ref, dtype, depth=depth, h_ratio=1.5, n_iter=2, inner_norm=inner_norm)
    assert_same(block, ref, x, dtype)


def test_three_layer_imixer_derived_as_limixer_is_the_imixer():
    ref = perturb(mixers.IMixerBlock(C, S, h_ratio=2, n_iter=2)).double()
    a = derive.load_reference_block(derive.derived_block("imixer", S, C, h_ratio=2).double(), ref)
    b = derive.load_reference_block(derive.derived_block("limixer", S, C, depth=3, h_ratio=2).double(), ref)
    x = torch.randn(3, S, C, dtype=torch.float64)
    assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["symmetric", "untied", "broken"])
@pytest.mark.parametrize("norm", ["matrix", "channel"])
def test_parallelized_mixer_block_equals_handwritten(dtype, form, norm):
    ref = mixers.ParaMixerBlock(C, S, form=form, norm=norm)
    block, ref, x = pair("paramixer", ref, dtype, form=form, norm=norm)
    assert_same(block, ref, x, dtype)
    assert abs(block.penalty().item() - ref.penalty().item()) <= 1e-6 * max(1.0, ref.penalty().item())


def test_symmetry_breaking_with_zero_w2_is_exactly_the_symmetric_block():
    sym = perturb(mixers.ParaMixerBlock(C, S, form="symmetric")).double()
    broken = mixers.ParaMixerBlock(C, S, form="broken").double()
    with torch.no_grad():
        for mlp_b, mlp_s in ((broken.mlp_tokens, sym.mlp_tokens), (broken.mlp_channels, sym.mlp_channels)):
            mlp_b.fc1.weight.copy_(mlp_s.fc2.weight)
            mlp_b.fc2.weight.zero_()
        broken.norm.load_state_dict(sym.norm.state_dict())
    d_sym = derive.load_reference_block(derive.derived_block("paramixer", S, C, form="tied").double(), sym)
    d_brk = derive.load_reference_block(derive.derived_block("paramixer", S, C, form="broken").double(), broken)
    x = torch.randn(3, S, C, dtype=torch.float64)
    assert torch.equal(d_brk(x), d_sym(x))
    assert torch.equal(broken(x), sym(x))
    assert rel_err(d_brk(x), broken(x)) <= 1e-10


# ------------------------------------------------------------------------------------------ whole models
@pytest.mark.slow
def test_from_timm_mixer_s16_gives_the_same_logits_and_round_trips():
    torch.manual_seed(0)
    model = perturb(timm.create_model("mixer_s16_224", num_classes=10), scale=0.02).eval()
    derived = derive.from_timm(model).eval()
    assert sum(p.numel() for p in derived.parameters()) == 18_020_394
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(derived(x), model(x)) <= 1e-5
    back = derive.to_timm(derived)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_timm_small_mixer_in_both_dtypes_and_modes(dtype):
    model = timm.models.mlp_mixer.MlpMixer(num_classes=7, img_size=32, in_chans=1, patch_size=8, num_blocks=2,
                                           embed_dim=C)
    model = perturb(model).to(dtype)
    derived = derive.from_timm(model)
    x = torch.randn(3, 1, 32, 32, dtype=dtype)
    assert_same(derived, model, x, dtype, buffers=False)
    assert isinstance(derive.to_timm(derived), timm.models.mlp_mixer.MlpMixer)


@pytest.mark.parametrize("block, kw", [
    ("imixer", {"h_ratio": 2, "n_iter": 2}),
    ("limixer", {"depth": 4, "n_iter": 2}),
    ("paramixer", {"form": "broken", "n_iter": 2}),
    ("paramixer", {"form": "symmetric", "norm": "channel"}),
])
def test_from_reference_models_give_the_same_logits_and_round_trip(block, kw):
    cfg = mixers.MixerConfig(num_classes=5, img_size=16, in_chans=2, patch_size=4, num_blocks=2, embed_dim=C,
                             block=block, block_kwargs=kw, lam=0.1)
    ref = perturb(mixers.MlpMixer(cfg)).double()
    derived = derive.from_reference(ref)
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    for train in (True, False):
        ref.train(train)
        derived.train(train)
        assert rel_err(derived(x), ref(x)) <= 1e-10
    assert abs(derived.penalty().item() - ref.penalty().item()) <= 1e-10 * max(1.0, ref.penalty().item())
    back = derive.to_reference(derived)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_derived_models_match_registered_parameter_counts():
    for name, kw in [("imixer_s16_224", {"h_ratio": 2}), ("paramixer_s16_224", {"form": "symmetric"})]:
        ref = timm.create_model(name, num_classes=10, **kw)
        derived = derive.from_reference(ref)
        n_ref = sum(p.numel() for p in ref.parameters())
        assert sum(p.numel() for p in derived.parameters()) == n_ref
    assert n_ref == 10_795_530


def test_from_timm_rejects_other_models():
    with pytest.raises(TypeError, match="MlpMixer made of MixerBlocks"):
        derive.from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="only block='mixer' has a timm twin"):
        derive.to_timm(derive.DerivedMixer(derive.DerivedMixerConfig(img_size=16, patch_size=4, num_blocks=1,
                                                                     embed_dim=8, block="imixer")))


def test_derived_models_are_registered_in_timm_and_equal_their_twins():
    assert len(derive.DERIVED_MODEL_NAMES) == len(mixers.MODEL_NAMES)
    assert not any(n.startswith("mixer_") for n in derive.DERIVED_MODEL_NAMES)
    torch.manual_seed(3)
    derived = timm.create_model("derived_imixer_t4_28", h_ratio=2, n_iter=1)
    torch.manual_seed(3)
    ref = timm.create_model("imixer_t4_28", h_ratio=2, n_iter=1)
    assert isinstance(derived, derive.DerivedMixer)
    x = torch.randn(2, 1, 28, 28)
    derived.eval()
    ref.eval()
    assert rel_err(derived.forward_features(x), ref.forward_features(x)) <= 1e-5  # the head starts at zero
    for name in ("vanillamixer_t4_28", "vanillamixer_s16_224_ni2"):  # the authors' vanilla baseline and names
        kw = dict(num_classes=10, img_size=32) if "224" in name else {}
        torch.manual_seed(4)
        derived = timm.create_model(f"derived_{name}", **kw).eval()
        torch.manual_seed(4)
        ref = timm.create_model(name, **kw).eval()
        x = torch.randn(2, ref.in_chans, *ref.cfg.image_hw)
        assert rel_err(derived.forward_features(x), ref.forward_features(x)) <= 1e-5
        assert derived.cfg.block_kwargs == {"norm": "matrix", "bias": False, "steps": ref.blocks[0].n_iter}
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        timm.create_model("derived_paramixer_t4_32", pretrained=True)


def test_untied_parallelized_mixer_started_at_the_tied_point():
    """tied_init: every untied MLP starts with fc2 = fc1^T (derived: feedback = forward^T), in both twins and in a
    derived model built from its config alone; it is refused where there is no free second matrix."""
    torch.manual_seed(5)
    ref = timm.create_model("paramixer_t4_28", tied_init=True)
    torch.manual_seed(5)
    derived = timm.create_model("derived_paramixer_t4_28", tied_init=True)
    rebuilt = derive.DerivedMixer(derived.cfg)
    for model in (derived, rebuilt):
        for block in model.blocks:
            for syn in block.net.synapses:
                assert torch.equal(syn.feedback_weight(), syn.weight.T)
    for block in ref.blocks:
        assert torch.equal(block.mlp_tokens.fc2.weight, block.mlp_tokens.fc1.weight.T)
    x = torch.randn(2, 1, 28, 28)
    assert rel_err(derived.eval().forward_features(x), ref.eval().forward_features(x)) <= 1e-5
    with pytest.raises(ValueError, match="tied_init"):
        timm.create_model("paramixer_t4_28", form="broken", tied_init=True)
    with pytest.raises(ValueError, match="tied_init"):
        derive.derived_block("paramixer", S, C, form="symmetric", tied_init=True)


def test_mismatched_weights_are_refused_with_the_offending_names():
    with pytest.raises(ValueError, match="fc_sn1"):  # an iMixer block is not a Mixer block
        derive.load_reference_block(derive.derived_block("mixer", S, C), mixers.IMixerBlock(C, S))
    with pytest.raises(ValueError, match="shape"):
        derive.load_reference_block(derive.derived_block("mixer", S, C), mixers.MixerBlock(C, S + 1))
    with pytest.raises(ValueError, match="use steps="):
        derive.derived_block("paramixer", S, C, n_iter=3)
    with pytest.raises(ValueError, match="proj_drop_rate"):
        derive.from_timm(timm.models.mlp_mixer.MlpMixer(img_size=16, patch_size=4, num_blocks=1, embed_dim=C,
                                                        proj_drop_rate=0.1))


# ------------------------------------------------------------------------------------------ conversions keep state
SMALL = dict(num_classes=7, img_size=16, in_chans=2, patch_size=4, num_blocks=2, embed_dim=C)


def images(dtype, batch=3):
    return torch.randn(batch, 2, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(2))


def modes(model):
    return {m.training for m in model.modules()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
def test_conversions_keep_the_train_or_eval_mode(dtype, train):
    # an iMixer's spectral norms power-iterate in train mode only: a twin in the other mode gives other logits
    ref = perturb(mixers.MlpMixer(**SMALL, block="imixer", block_kwargs={"n_power": 1})).to(dtype).train(train)
    derived = derive.from_reference(ref)
    assert modes(derived) == {train}
    assert modes(derive.to_reference(derived)) == {train}
    x = images(dtype)
    assert rel_err(derived(x), ref(x)) <= TOL[dtype]
    timm_model = timm.models.mlp_mixer.MlpMixer(**SMALL).to(dtype).train(train)
    assert modes(derive.from_timm(timm_model)) == {train}
    assert modes(derive.to_timm(derive.from_timm(timm_model))) == {train}


@pytest.mark.parametrize("dtype", DTYPES)
def test_conversions_keep_the_drop_rates(dtype):
    """Same seed, same dropout and drop-path masks: the twins agree in train mode too, both ways."""
    rates = dict(drop_rate=0.3, drop_path_rate=0.2)
    timm_model = perturb(timm.models.mlp_mixer.MlpMixer(**SMALL, **rates)).to(dtype)
    ref = perturb(mixers.MlpMixer(**SMALL, **rates, block="paramixer")).to(dtype)
    x = images(dtype)
    for model, there, back in [(timm_model, derive.from_timm, derive.to_timm),
                               (ref, derive.from_reference, derive.to_reference)]:
        derived = there(model)
        assert (derived.cfg.drop_rate, derived.cfg.drop_path_rate) == (0.3, 0.2)
        twin = back(derived)
        assert twin.head_drop.p == 0.3 and {b.drop_path.drop_prob for b in twin.blocks} == {0.2}
        for other in (derived, twin):
            torch.manual_seed(5)
            out = model(x)
            torch.manual_seed(5)
            assert rel_err(other(x), out) <= TOL[dtype]
        torch.manual_seed(6)
        assert rel_err(derived(x), out) > 0.01  # other masks: the rates are in force


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_mlp_ratio_serves_both_mlps_as_in_the_reference(dtype):
    torch.manual_seed(0)
    derived = timm.create_model("derived_vmixer_t4_28", num_blocks=1, mlp_ratio=2.0)
    torch.manual_seed(0)
    ref = timm.create_model("vmixer_t4_28", num_blocks=1, mlp_ratio=2.0)
    assert derived.blocks[0].net.layers["s"].shape == (256, 128)  # 2.0 * embed_dim on the tokens
    assert derived.blocks[0].net.layers["c"].shape == (49, 256)  # and on the channels
    ref = perturb(ref).to(dtype)
    derived = derive.from_reference(ref)
    x = torch.randn(3, 1, 28, 28, dtype=dtype)
    assert_same(derived, ref, x, dtype, buffers=False)
    assert rel_err(derive.to_timm(derived)(x), ref(x)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_reference_after_reset_classifier_builds_the_new_head(dtype):
    ref = perturb(mixers.MlpMixer(**SMALL, block="imixer")).to(dtype)
    x = images(dtype)
    for num_classes, pool, shape in [(5, None, (3, 5)), (10, "", (3, 16, 10)), (4, "avg", (3, 4))]:
        ref.reset_classifier(num_classes, global_pool=pool)
        perturb(ref.head)
        derived = derive.from_reference(ref)
        assert derived.cfg.num_classes == num_classes and derived.global_pool == ref.global_pool
        assert_same(derived, ref, x, dtype, buffers=False)
        assert derived(x).shape == shape
        back = derive.to_reference(derived)
        assert back.global_pool == ref.global_pool and rel_err(back(x), ref(x)) <= TOL[dtype]


# ------------------------------------------------------------------------------------------ timm's model API
def test_derived_mixer_has_the_reference_model_api():
    ref = mixers.MlpMixer(**SMALL, block="imixer")
    derived = derive.from_reference(ref).double()
    for name in ("num_classes", "in_chans", "global_pool", "num_features", "head_hidden_size", "embed_dim",
                 "grad_checkpointing"):
        assert getattr(derived, name) == getattr(ref, name), name
    assert derived.num_features == C
    assert derived.get_classifier() is derived.head
    derived.eval()
    derived.reset_classifier(3)
    head = derived.get_classifier()
    assert (head.out_features, head.weight.dtype, head.training) == (3, torch.float64, False)
    assert derived.cfg.num_classes == derived.num_classes == 3
    x = images(torch.float64)
    assert derived(x).shape == (3, 3)
    derived.reset_classifier(0, global_pool="")
    assert isinstance(derived.head, torch.nn.Identity) and derived.cfg.global_pool == derived.global_pool == ""
    assert derived(x).shape == (3, 16, C)
    with pytest.raises(ValueError, match="global_pool must be 'avg' or '', got 'max'"):
        derived.reset_classifier(3, global_pool="max")
    assert derived.num_classes == 0 and derived.global_pool == ""  # a refused reset changes nothing
    with pytest.raises(ValueError, match=r"DerivedMixerConfig\.global_pool"):
        derive.DerivedMixerConfig(global_pool="token")


@pytest.mark.parametrize("dtype", DTYPES)
def test_derived_grad_checkpointing_recomputes_blocks_with_the_same_gradients_and_buffers(dtype):
    # n_power=1: the spectral-norm state moves on every train-mode call; the recomputation must start where it did
    ref = perturb(mixers.MlpMixer(**SMALL, block="imixer", block_kwargs={"n_power": 1})).to(dtype)
    plain = derive.from_reference(ref).train()
    ckpt = derive.from_reference(ref).train()
    ckpt.set_grad_checkpointing()
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    calls = []
    for block in ckpt.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    x = images(dtype)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    assert len(calls) == 2 * len(ckpt.blocks)  # each block ran again in the backward pass
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        ckpt(x)
    assert len(calls) == 3 * len(ckpt.blocks)  # no graph, nothing to recompute
