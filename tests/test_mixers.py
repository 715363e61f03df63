"""Reference Mixer modules: timm equivalence, spectral normalisation, fixed points, parallel blocks, registry."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import DTYPES, TOL, assert_same_intermediates, rel_err
from timm.layers import Mlp as TimmMlp
from timm.models._features import FeatureGetterNet
from timm.models.mlp_mixer import MixerBlock as TimmMixerBlock
from timm.models.mlp_mixer import MlpMixer as TimmMlpMixer
from torch import nn

import mixers
from mixers import (
    AsymMlp,
    IMixerBlock,
    LiMixerBlock,
    LiMlp,
    MixerBlock,
    MixerConfig,
    Mlp,
    MlpMixer,
    ParaMixerBlock,
    SpectralNormLinear,
    SymMlp,
    iMlp,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter away from its initial value (zero heads and unit LayerNorms included)."""
    for p in module.parameters():
        p.add_(scale * torch.randn_like(p))


# ---------------------------------------------------------------------------------------------------------------
# timm equivalence


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", [False, True])
def test_mixer_block_loads_timm_state_dict_and_matches(dtype, train):
    theirs = TimmMixerBlock(24, 10).to(dtype)
    perturb(theirs)
    ours = MixerBlock(24, 10).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.train(train)
    ours.train(train)
    x = torch.randn(3, 10, 24, dtype=dtype)
    assert rel_err(ours(x), theirs(x)) < TOL[dtype]


def test_mlp_loads_timm_mlp_and_matches_with_dropout():
    theirs, ours = TimmMlp(7, 11, drop=0.3), Mlp(7, 11, drop=0.3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(4, 7)
    torch.manual_seed(1)
    y_theirs = theirs(x)
    torch.manual_seed(1)
    assert torch.equal(ours(x), y_theirs)


def test_mlp_mixer_s16_loads_timm_state_dict_and_gives_same_logits():
    theirs = timm.create_model("mixer_s16_224", num_classes=10)
    perturb(theirs)
    ours = MlpMixer(MixerConfig(num_classes=10, img_size=224, patch_size=16, num_blocks=8, embed_dim=512))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32):
            theirs.to(dtype)
            ours.to(dtype)
            for train in (False, True):
                theirs.train(train)
                ours.train(train)
                assert rel_err(ours(x.to(dtype)), theirs(x.to(dtype))) < TOL[dtype], (dtype, train)


def test_vmixer_is_timm_mixer_and_same_seed_gives_same_init():
    kw = dict(num_classes=7, img_size=32, patch_size=8, num_blocks=2, embed_dim=24)
    torch.manual_seed(3)
    theirs = TimmMlpMixer(**kw)
    torch.manual_seed(3)
    ours = timm.create_model("vmixer_t4_32", **kw)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_intermediates_and_features_only_match_timm(dtype):
    """timm's feature API: ``forward_intermediates`` (indices, norm, NCHW/NLC, stop_early), ``feature_info`` and
    ``create_model(..., features_only=True)`` give what timm's Mixer gives with the same weights."""
    kw = dict(num_classes=7, img_size=32, patch_size=8, num_blocks=3, embed_dim=24)
    theirs = TimmMlpMixer(**kw)
    perturb(theirs)
    ours = timm.create_model("vmixer_t4_32", **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        assert_same_intermediates(ours.to(dtype), theirs.to(dtype), x, dtype)
        assert ours.feature_info == theirs.feature_info
        theirs = FeatureGetterNet(theirs, out_indices=(0, 2))  # what timm's features_only=True builds
        ours = timm.create_model("vmixer_t4_32", features_only=True, out_indices=(0, 2), **kw).to(dtype)
        ours.model.load_state_dict(theirs.model.state_dict(), strict=True)  # both pruned: no norm, no head
        assert ours.feature_info.channels() == theirs.feature_info.channels() == [24, 24]
        assert ours.feature_info.reduction() == theirs.feature_info.reduction() == [8, 8]
        a, b = ours(x), theirs(x)
        assert [t.shape for t in a] == [t.shape for t in b] == [(2, 24, 4, 4)] * 2
        assert all(rel_err(u, v) <= TOL[dtype] for u, v in zip(a, b))


def test_forward_intermediates_of_imixer_and_derived_imixer_agree_with_checkpointing():
    """Spectrally normalised blocks (power iteration in train mode) under gradient checkpointing: the derived
    iMixer's intermediates equal the hand-written one's, the final output equals ``forward_features``, and
    ``prune_intermediate_layers`` keeps exactly the blocks needed."""
    import derive
    kw = dict(num_classes=5, img_size=16, patch_size=4, num_blocks=3, embed_dim=16, n_power=1)
    ref = timm.create_model("imixer_t4_32", **kw).double()
    perturb(ref)
    derived = derive.from_reference(ref)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for model in (ref, derived):
        model.set_grad_checkpointing(True)
    assert_same_intermediates(derived, ref, x, torch.float64)
    ref.eval()
    final, inter = ref.forward_intermediates(x, indices=[1], output_fmt="NLC")
    assert rel_err(final, ref.forward_features(x)) <= TOL[torch.float64] and inter[0].shape == (2, 16, 16)
    assert ref.prune_intermediate_layers([0, 1]) == [0, 1] and len(ref.blocks) == 2 and ref.num_classes == 0
    assert len(ref.feature_info) == 2 and isinstance(ref.head, torch.nn.Identity)


@pytest.mark.parametrize("name", ["imixer_t4_28", "paramixer_t4_28"])
def test_derived_twins_build_timm_feature_extractors_equal_to_their_references(name):
    """``timm.create_model("derived_<name>", features_only=True, out_indices=...)``: a FeatureGetterNet whose
    maps equal the hand-written model's of the same seed (float32, train-mode power iterations off: eval)."""
    import derive  # noqa: F401  (registers derived_*)

    torch.manual_seed(0)
    ref = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
    torch.manual_seed(0)
    twin = timm.create_model(f"derived_{name}", features_only=True, out_indices=(1, 2)).eval()
    assert isinstance(twin, FeatureGetterNet) and twin.feature_info.channels() == ref.feature_info.channels()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(twin(x), ref(x), strict=True):
            assert a.shape == b.shape == (3, 128, 7, 7) and rel_err(a, b) <= TOL[torch.float32]


def test_feature_options_are_checked():
    with pytest.raises(ValueError, match="feature_cls must be 'getter'"):
        timm.create_model("vmixer_t4_28", features_only=True, feature_cls="hook")
    with pytest.raises(TypeError, match="out_indices is given without features_only"):
        timm.create_model("imixer_t4_28", out_indices=(1,))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        timm.create_model("vmixer_t4_28").forward_intermediates(torch.zeros(1, 1, 28, 28), output_fmt="NHWC")


# ---------------------------------------------------------------------------------------------------------------
# parameter counts (built on the meta device: no memory, no init cost)


@pytest.mark.parametrize(
    ("name", "kwargs", "count"),
    [
        ("vmixer_s16_224", {}, 18_020_394),
        ("imixer_s16_224", dict(h_ratio=2), 20_123_690),
        ("imixer_s16_224", {}, 19_073_066),
        ("paramixer_s16_224", dict(form="untied"), 19_585_546),
        ("paramixer_s16_224", dict(form="symmetric"), 10_795_530),
        ("paramixer_s16_224", dict(form="broken"), 19_585_546),
    ],
)
def test_parameter_counts(name, kwargs, count):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == count


def test_timm_mixer_count_is_the_vmixer_count():
    with torch.device("meta"):
        theirs = timm.create_model("mixer_s16_224", num_classes=10)
    assert sum(p.numel() for p in theirs.parameters()) == 18_020_394


def test_imixer_state_dict_names_and_shapes():
    with torch.device("meta"):
        model = timm.create_model("imixer_s16_224", num_classes=10, h_ratio=2)
    sd = model.state_dict()
    assert sd["blocks.0.mlp_tokens.fc1.weight"].shape == (256, 196)
    assert sd["blocks.0.mlp_tokens.fc_sn1.weight_orig"].shape == (512, 256)
    assert sd["blocks.0.mlp_tokens.fc_sn1.weight_u"].shape == (512,)
    assert sd["blocks.0.mlp_tokens.fc_sn1.weight_v"].shape == (256,)
    assert sd["blocks.0.mlp_tokens.fc_sn1.weight_sigma"].shape == (1,)
    assert sd["blocks.0.mlp_tokens.fc_sn2.weight_orig"].shape == (256, 512)
    assert sd["blocks.0.mlp_tokens.fc2.weight"].shape == (196, 256)
    assert sd["blocks.0.mlp_channels.fc1.weight"].shape == (2048, 512)


# ---------------------------------------------------------------------------------------------------------------
# spectral normalisation


def test_spectral_norm_state_dict_keys():
    layer = SpectralNormLinear(4, 6)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight_orig": (6, 4), "bias": (6,), "weight_u": (6,), "weight_v": (4,), "weight_sigma": (1,)}
    assert torch.allclose(layer.weight_u.norm(), torch.tensor(1.0))
    assert torch.allclose(layer.weight_v.norm(), torch.tensor(1.0))


def test_spectral_norm_is_soft_below_coeff():
    layer = SpectralNormLinear(4, 6, coeff=0.9).double()
    with torch.no_grad():
        layer.weight_orig.mul_(0.3 / torch.linalg.matrix_norm(layer.weight_orig, ord=2))
    x = torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight_orig, layer.bias))
    assert layer.weight_sigma.item() <= 0.3 + 1e-12


def test_spectral_norm_rescales_big_weights_to_coeff():
    layer = SpectralNormLinear(5, 7, coeff=0.9, n_power=100).double()
    with torch.no_grad():
        layer.weight_orig.mul_(10.0)
    layer(torch.randn(2, 5, dtype=torch.float64))
    sigma = torch.linalg.matrix_norm(layer.weight_orig.detach(), ord=2)
    assert abs(layer.weight_sigma.item() - sigma.item()) < 1e-8 * sigma.item()
    effective = layer.normalized_weight(power_iteration=False)
    assert abs(torch.linalg.matrix_norm(effective.detach(), ord=2).item() - 0.9) < 1e-8


def test_spectral_norm_power_iterates_on_every_train_call_and_never_in_eval():
    layer = SpectralNormLinear(8, 9, n_power=1)
    x = torch.randn(3, 8)
    u0 = layer.weight_u.clone()
    layer(x)
    u1 = layer.weight_u.clone()
    layer(x)
    u2 = layer.weight_u.clone()
    assert not torch.equal(u0, u1) and not torch.equal(u1, u2)
    layer.eval()
    y1 = layer(x)
    y2 = layer(x)
    assert torch.equal(layer.weight_u, u2) and torch.equal(y1, y2)


def test_spectral_norm_gradient_goes_through_sigma():
    layer = SpectralNormLinear(4, 5, coeff=0.5).double().eval()
    with torch.no_grad():
        layer.weight_orig.mul_(5.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    layer(x).square().sum().backward()
    w = layer.weight_orig.detach().clone().requires_grad_(True)
    sigma = layer.weight_u @ w @ layer.weight_v
    F.linear(x, w / torch.clamp(sigma / 0.5, min=1.0), layer.bias.detach()).square().sum().backward()
    assert torch.allclose(layer.weight_orig.grad, w.grad, rtol=1e-12, atol=1e-12)


def test_imlp_ablation_arms_have_their_layers_and_names():
    """iMixer Table 3: spectral norm (the paper's), none (plain nn.Linear), BatchNorm after each fc_sn layer."""
    keys = {n: set(iMlp(6, 4, 8, inner_norm=n).state_dict()) for n in ("spectral", "none", "batch")}
    assert {"fc_sn1.weight_orig", "fc_sn1.weight_u"} <= keys["spectral"]
    assert {"fc_sn1.weight", "fc_sn1.bias"} <= keys["none"] and not any("weight_u" in k for k in keys["none"])
    assert {"fc_sn2.norm.running_var", "fc_sn2.norm.weight"} <= keys["batch"]
    m = iMlp(6, 4, 8, n_iter=3, inner_norm="batch").double()
    z = torch.randn(5, 3, 4, dtype=torch.float64)
    y = m.fc_sn1(z)  # train mode: each output feature standardised over batch x channels
    assert y.reshape(-1, 8).mean(0).abs().max() < 1e-12
    assert (y.reshape(-1, 8).var(0, correction=0) - 1).abs().max() < 1e-3
    m(torch.randn(5, 3, 6, dtype=torch.float64))
    assert m.fc_sn1.norm.num_batches_tracked.item() == 1 + 3  # every call inside the loop counts
    with pytest.raises(ValueError, match="inner_norm"):
        iMlp(6, 4, 8, inner_norm="layer")
    model = timm.create_model("imixer_t4_28", inner_norm="none")
    assert isinstance(model.blocks[0].mlp_tokens.fc_sn1, nn.Linear)


def test_spectral_norm_stays_float32_under_bf16_autocast():
    layer = SpectralNormLinear(6, 6, n_power=3)
    reference = SpectralNormLinear(6, 6, n_power=3)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    reference(x)
    assert y.dtype == torch.bfloat16
    assert layer.weight_sigma.dtype == torch.float32
    assert torch.equal(layer.weight_u, reference.weight_u)
    assert torch.equal(layer.weight_sigma, reference.weight_sigma)


# ---------------------------------------------------------------------------------------------------------------
# iMLP and the L-layer iMLP


@pytest.mark.parametrize("train", [False, True])
def test_imlp_without_iterations_is_mlp(train):
    imlp = iMlp(9, 6, 8, n_iter=0, drop=0.2).train(train)
    mlp = Mlp(9, 6, drop=0.2).train(train)
    missing, unexpected = mlp.load_state_dict(imlp.state_dict(), strict=False)
    assert not missing and all(k.startswith(("fc_sn1.", "fc_sn2.")) for k in unexpected)
    x = torch.randn(4, 7, 9)
    torch.manual_seed(5)
    y = imlp(x)
    torch.manual_seed(5)
    assert torch.equal(mlp(x), y)


def test_imlp_reaches_the_fixed_point_of_the_inverted_residual():
    imlp = iMlp(7, 5, 6, n_iter=200, n_power=50, coeff=0.5).double()
    with torch.no_grad():
        imlp.fc_sn1.weight_orig.mul_(4.0)
        imlp.fc_sn2.weight_orig.mul_(4.0)
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    imlp(x)  # converge the power iterations
    imlp.eval()
    imlp.record = True
    with torch.no_grad():
        imlp(x)
        u, z = imlp.fc1(x), imlp.trace[-1]
        assert len(imlp.trace) == 201 and torch.equal(imlp.trace[0], u)
        residual = (z - u - imlp.contraction(z)).abs().max().item()
    assert residual < 1e-10


def test_imlp_backward_through_train_mode_iterations():
    imlp = iMlp(7, 5, 6, n_iter=3)
    imlp(torch.randn(2, 3, 7)).sum().backward()
    assert imlp.fc_sn1.weight_orig.grad is not None and imlp.fc1.weight.grad is not None


@pytest.mark.parametrize("train", [False, True])
def test_limlp_with_three_layers_is_imlp(train):
    imlp = iMlp(9, 6, 8, n_iter=3, n_power=2).double().train(train)
    limlp = LiMlp([9, 6, 8], n_iter=3, n_power=2).double().train(train)
    perturb(imlp, 0.5)
    assert list(limlp.state_dict()) == list(imlp.state_dict())
    limlp.load_state_dict(imlp.state_dict(), strict=True)
    x = torch.randn(2, 5, 9, dtype=torch.float64)
    assert torch.equal(limlp(x), imlp(x))
    for k, v in imlp.state_dict().items():
        assert torch.equal(limlp.state_dict()[k], v), k


def test_limlp_names_shapes_and_call_order():
    limlp = LiMlp([10, 6, 5, 4], n_iter=2, n_power=1)
    shapes = {n: tuple(m.weight_orig.shape) for n, m in limlp.named_children() if n.startswith("fc_sn")}
    # G^2, G^3 going down, then H^4, H^3 coming back up
    assert shapes == {"fc_sn1": (5, 6), "fc_sn2": (4, 5), "fc_sn3": (5, 4), "fc_sn4": (6, 5)}
    calls = []
    for n, m in limlp.named_children():
        if n.startswith("fc_sn"):
            m.register_forward_hook(lambda mod, args, out, n=n: calls.append(n))
    limlp(torch.randn(2, 3, 10))
    f2 = ["fc_sn1", "fc_sn2", "fc_sn3", "fc_sn2", "fc_sn3", "fc_sn4"]  # G^2, 2 x (G^3, H^4), H^3
    assert calls == f2 + f2


def test_limlp_four_layers_matches_the_appendix_b_equations():
    n = 3
    limlp = LiMlp([10, 6, 5, 4], n_iter=n).double().eval()
    perturb(limlp, 0.3)
    g = F.gelu
    G2, G3, H4, H3 = limlp.fc_sn1, limlp.fc_sn2, limlp.fc_sn3, limlp.fc_sn4

    def fpa(f, z):
        x = z
        for _ in range(n):
            x = z + f(x)
        return x

    def f3(x):  # Eq. (40)
        return H4(g(G3(g(x))))

    def f2(x):  # Eq. (39)
        return H3(g(fpa(f3, G2(g(x)))))

    x = torch.randn(2, 3, 10, dtype=torch.float64)
    expected = limlp.fc2(g(fpa(f2, limlp.fc1(x))))  # Eqs. (37)-(38)
    assert torch.allclose(limlp(x), expected, rtol=0, atol=1e-13)


def test_limlp_reaches_nested_fixed_points():
    limlp = LiMlp([6, 5, 4, 3], n_iter=1, n_power=200, coeff=0.5).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    limlp(x)  # converge the power iterations
    limlp.eval()
    limlp.n_iter = 40
    limlp.record = True
    with torch.no_grad():
        limlp(x)
        z, u = limlp.trace[-1], limlp.fc1(x)
        assert (z - u - limlp.contraction(z, 2)).abs().max().item() < 1e-10
        y = limlp.G(2)(F.gelu(z))
        inner = limlp.solve(y, 3)
        assert (inner - y - limlp.contraction(inner, 3)).abs().max().item() < 1e-10


# ---------------------------------------------------------------------------------------------------------------
# symmetric and symmetry-broken MLPs, parallel blocks


def phi_gelu(x: torch.Tensor) -> torch.Tensor:
    """Lagrangian with Phi' = GELU."""
    gauss = math.sqrt(2 / math.pi) * torch.exp(-(x**2) / 2)
    return 0.25 * (x**2 + (x**2 - 1) * torch.erf(x / math.sqrt(2)) + x * gauss)


@pytest.mark.parametrize("bias", [False, True])
def test_asym_mlp_without_w2_is_sym_mlp(bias):
    sym, asym = SymMlp(7, 5, bias=bias).double(), AsymMlp(7, 5, bias=bias).double()
    with torch.no_grad():
        asym.fc1.weight.copy_(sym.fc2.weight)
        asym.fc2.weight.zero_()
        if bias:
            asym.fc1.bias.copy_(sym.fc2.bias)
            asym.fc2.bias.zero_()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    assert torch.equal(asym(x), sym(x))
    assert asym.penalty().item() == 0.0
    with torch.no_grad():
        asym.fc2.weight.fill_(0.5)
    assert asym.penalty().item() == pytest.approx(0.25 * 35)


def test_sym_mlp_is_the_gradient_of_a_lagrangian():
    sym = SymMlp(7, 5, bias=True).double()
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(phi_gelu(sym.fc2(x)).sum(), x)
    assert torch.allclose(sym(x), grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["untied", "symmetric", "broken"])
@pytest.mark.parametrize("norm", ["matrix", "channel"])
def test_para_mixer_block(form, norm):
    block = ParaMixerBlock(16, 9, form=form, norm=norm).double()
    perturb(block)
    assert block.norm.weight.shape == ((9, 16) if norm == "matrix" else (16,))
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y = block.norm(x)
    expected = x + block.mlp_tokens(y.transpose(1, 2)).transpose(1, 2) + block.mlp_channels(y)
    assert torch.allclose(block(x), expected, rtol=0, atol=1e-13)
    twice = ParaMixerBlock(16, 9, form=form, norm=norm, n_iter=2).double()
    twice.load_state_dict(block.state_dict(), strict=True)
    assert torch.allclose(twice(x), block(block(x)), rtol=0, atol=1e-12)
    if form == "broken":
        w2 = block.mlp_tokens.fc2.weight.square().sum() + block.mlp_channels.fc2.weight.square().sum()
        assert torch.allclose(block.penalty(), w2)
    else:
        assert block.penalty().item() == 0.0


def test_model_penalty_scales_block_penalties():
    model = timm.create_model("paramixer_t4_28", form="broken", lam=0.1)
    expected = sum(b.mlp_tokens.penalty() + b.mlp_channels.penalty() for b in model.blocks)
    assert torch.allclose(model.penalty(), 0.1 * expected)
    model.penalty().backward()
    assert model.blocks[0].mlp_channels.fc2.weight.grad is not None
    assert timm.create_model("paramixer_t4_28", form="broken").penalty().item() == 0.0


def test_convenience_blocks():
    block = IMixerBlock(16, 9, h_ratio=2.0, n_iter=1)
    assert isinstance(block.mlp_tokens, iMlp) and block.mlp_tokens.fc_sn1.out_features == 16
    deep = LiMixerBlock(16, 9, depth=5, h_ratio=0.5)
    assert deep.mlp_tokens.widths == (9, 8, 4, 4, 4)
    assert deep(torch.randn(2, 9, 16)).shape == (2, 9, 16)


def test_init_reaches_spectral_norm_weights():
    model = MlpMixer(img_size=32, patch_size=8, num_blocks=1, embed_dim=16, num_classes=3, block="imixer")
    sn = model.blocks[0].mlp_tokens.fc_sn1
    bound = math.sqrt(6 / (sn.in_features + sn.out_features))
    assert sn.weight_orig.abs().max().item() <= bound
    assert sn.bias.abs().max().item() < 1e-4  # N(0, 1e-6): "mlp" is in its name
    assert torch.equal(model.head.weight, torch.zeros_like(model.head.weight))


def test_grad_checkpointing_gives_the_same_gradients_and_buffers():
    # the recomputation must rebuild the spectral-norm weights from the u, v the forward pass started with
    kw = dict(img_size=16, patch_size=4, num_blocks=2, embed_dim=32, num_classes=3, n_power=1)
    plain = timm.create_model("imixer_t4_32", **kw).double()
    perturb(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reset_classifier_keeps_the_config_in_step(dtype):
    """A model built from ``cfg`` after ``reset_classifier`` is the same model (what ``derive`` relies on)."""
    model = MlpMixer(num_classes=7, img_size=16, patch_size=4, num_blocks=1, embed_dim=32).to(dtype).eval()
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    for num_classes, pool, shape in [(5, None, (2, 5)), (10, "", (2, 16, 10)), (0, "avg", (2, 32))]:
        model.reset_classifier(num_classes, global_pool=pool)
        perturb(model)
        assert (model.cfg.num_classes, model.cfg.global_pool) == (model.num_classes, model.global_pool)
        assert not model.head.training and all(p.dtype == dtype for p in model.head.parameters())
        rebuilt = MlpMixer(model.cfg).to(dtype).eval()
        rebuilt.load_state_dict(model.state_dict())
        assert model(x).shape == shape and torch.equal(rebuilt(x), model(x))
    with pytest.raises(ValueError, match="global_pool must be 'avg' or '', got 'token'"):
        model.reset_classifier(3, global_pool="token")
    assert model.num_classes == model.cfg.num_classes == 0  # a refused reset changes nothing


# ---------------------------------------------------------------------------------------------------------------
# timm registry


def test_registered_names():
    names = set(timm.list_models())
    assert len(mixers.MODEL_NAMES) == 5 * 8 + 6
    assert set(mixers.MODEL_NAMES) <= names
    assert not any(n.startswith("mixer_") for n in mixers.MODEL_NAMES)
    for family in ("vmixer", "vanillamixer", "imixer", "limixer", "paramixer"):
        for size in ("s16", "s32", "b16", "b32", "l16", "l32"):
            assert f"{family}_{size}_224" in names
        assert {f"{family}_t4_28", f"{family}_t4_32"} <= names
    for family in ("vanillamixer", "paramixer"):  # the parallelized-Mixer authors' repeated blocks
        for k in (2, 3, 4):
            model = timm.create_model(f"{family}_s16_224_ni{k}", num_classes=10, img_size=32)
            assert all(b.n_iter == k for b in model.blocks)


def test_vanilla_mixer_is_the_authors_serial_baseline():
    """vanillamixer_*: timm's serial block with the LayerNorm over the whole token x channel matrix ((S, C)
    affines), no biases, the block repeated n_iter times with the same weights (the authors' vMixerBlock)."""
    model = timm.create_model("vanillamixer_t4_28").double()
    block = model.blocks[0]
    assert block.norm1.weight.shape == block.norm2.weight.shape == (49, 128)
    assert not any(n.endswith("bias") and "mlp" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 49, 128, dtype=torch.float64)

    def step(x):
        y = F.layer_norm(x, (49, 128), block.norm1.weight, block.norm1.bias, 1e-6).transpose(1, 2)
        x = x + (F.gelu(y @ block.mlp_tokens.fc1.weight.T) @ block.mlp_tokens.fc2.weight.T).transpose(1, 2)
        y = F.layer_norm(x, (49, 128), block.norm2.weight, block.norm2.bias, 1e-6)
        return x + F.gelu(y @ block.mlp_channels.fc1.weight.T) @ block.mlp_channels.fc2.weight.T

    assert (block(x) - step(x)).abs().max() < 1e-12
    block.n_iter = 3
    assert (block(x) - step(step(step(x)))).abs().max() < 1e-12
    with pytest.raises(ValueError, match="norm"):
        mixers.MixerBlock(8, 4, norm="token")
    with pytest.raises(ValueError, match="bias=False applies to the plain MLP"):
        mixers.MixerBlock(8, 4, token_mixer="imlp", bias=False)


@pytest.mark.parametrize("name", [n for n in mixers.MODEL_NAMES if "_t4_" in n])
def test_small_variants_build_and_run(name):
    model = timm.create_model(name, in_chans=1, img_size=28, num_classes=10, drop_path_rate=0.1)
    model.train()
    logits = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_entrypoint_errors():
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        timm.create_model("imixer_t4_32", pretrained=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'form'"):
        timm.create_model("imixer_t4_32", form="broken")
    with pytest.raises(ValueError, match="does not match"):
        timm.create_model("vmixer_t4_32")(torch.randn(1, 3, 28, 28))


def test_model_configs_name_the_bad_field():
    """Bad sizes fail in the config, naming its class and field, not deep inside a layer."""
    for cfg_cls in (mixers.MixerConfig, mixers.ViTConfig):
        name = cfg_cls.__name__
        with pytest.raises(ValueError, match=f"{name}: img_size 30 is not a multiple of patch_size 4"):
            cfg_cls(img_size=30, patch_size=4)
        with pytest.raises(ValueError, match=f"{name}.patch_size must be a positive integer, got 0"):
            cfg_cls(patch_size=0)
        with pytest.raises(ValueError, match=f"{name}.mlp_ratio must be > 0"):
            cfg_cls(mlp_ratio=-1.0)
        cfg = cfg_cls(img_size=(28, 32), patch_size=4)
        assert cfg.image_hw == (28, 32) and cfg.num_patches == 7 * 8
    # rates, the penalty and n_iter, for the hand-written and the derived models alike
    import derive  # noqa: F401 -- registers derived_*

    for name in ("imixer_t4_28", "derived_imixer_t4_28", "paramixer_t4_28", "derived_paramixer_t4_28"):
        for kw, message in (({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\), got 1.0"),
                            ({"drop_path_rate": -0.1}, r"drop_path_rate must be in \[0, 1\)"),
                            ({"lam": -1e-3}, "lam .* must be a finite number >= 0, got -0.001"),
                            ({"lam": float("nan")}, "lam .* must be a finite number >= 0, got nan"),
                            ({"n_iter": "2"}, "block_kwargs.n_iter must be an integer >= 0, got '2'")):
            if "n_iter" in kw and "paramixer" in name:
                continue
            with pytest.raises(ValueError, match=message):
                timm.create_model(name, **kw)
    # ViT's rates too (unchecked once: drop_rate=1.0 built a model whose head input is all zeros in training)
    for name in ("hvit_t4_28", "mhavit_t4_28"):
        for field in ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            with pytest.raises(ValueError, match=rf"ViTConfig.{field} must be in \[0, 1\), got 1.0"):
                timm.create_model(name, **{field: 1.0})
    # the L-layer iMixer's depth: the error names the option, not the widths of the LiMlp it builds
    for name in ("limixer_t4_28", "derived_limixer_t4_28"):
        for depth in (2, 2.5, True):
            with pytest.raises(ValueError, match=rf"MixerConfig.block_kwargs.depth \(the layers of the L-layer "
                                                 rf"iMixer's token chain, the visible one included\) must be an "
                                                 rf"integer >= 3, got {depth}"):
                timm.create_model(name, depth=depth)
    assert timm.create_model("limixer_t4_28", depth=3).blocks[0].mlp_tokens.depth == 3


@pytest.mark.parametrize("name", ["vmixer_t4_28", "imixer_t4_28", "derived_imixer_t4_28", "derived_paramixer_t4_28",
                                  "mhavit_t4_28"])
def test_timm_resolves_the_models_own_input_size_and_normalisation(name):
    """timm's data helpers read ``pretrained_cfg``; without it they would assume 3 x 224 x 224 ImageNet inputs."""
    from timm.data import resolve_data_config

    import derive  # noqa: F401 -- registers derived_*

    data = resolve_data_config({}, model=timm.create_model(name, in_chans=1, num_classes=7))
    assert data["input_size"] == (1, 28, 28) and data["mean"] == (0.5,) and data["std"] == (0.5,)
