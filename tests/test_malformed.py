"""Malformed input, generated at random: every failure of the config loader, the spec reader and the network
constructor is one of the project's error classes, raised by the project's own code, and its message names the
offending config key, spec entry, layer or synapse. Never a raw traceback from torch, yaml or sympy."""

from __future__ import annotations

import copy
import datetime
import math
import re
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from derive import NetworkSpec, SpecError
from experiments.build import check_run
from experiments.config import ConfigError, load_config
from hopfield import DenseSynapse, Layer, Network
from hopfield import lagrangians as lag

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "fashion_small.yaml"
SPEC = ROOT / "experiments" / "configs" / "specs" / "paramixer_memory_arm.yaml"
PROJECT = tuple(str(ROOT / d) for d in ("hopfield", "derive", "experiments", "mixers"))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])

# values a user might write by mistake: wrong types, out of range, nonsense strings, nested junk
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, -1.0, 1e9, math.nan, math.inf, 0.5]),
    st.text(max_size=6), st.sampled_from(["", "x", "1e-3", "none", "[1", "{a: 1}", "-2", "S * C", "C / 0"]),
    st.lists(st.integers(-2, 4), max_size=3), st.dictionaries(st.sampled_from(["a", "name", "axis"]),
                                                              st.integers(-1, 2), max_size=2))


def raised_by_project(e: BaseException) -> bool:
    """The innermost frame of the exception that reached the user is the project's own code."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PROJECT)


# ---------------------------------------------------------------------------------------------- configs
BASE = yaml.safe_load(CONFIG.read_text())
CONFIG_KEYS = [*BASE, "model_kwargs.n_iter", "model_kwargs.h_ratio", "model_kwargs.spec", "data.name",
               "data.train_subset", "data.test_subset", "data.num_workers", "data.root", "no_weight_decay",
               "amp", "device", "opt", "sched", "lr", "epochs", "batch_size", "warmup_epochs", "bogus", "data.bogus"]


def with_junk(draw, tree: dict, paths: list, values) -> str:
    """``tree``'s YAML text with one to three of ``paths`` (dotted, or a tuple where a key holds a dot) set to a value
    drawn from ``values``, sometimes cut short."""
    tree = copy.deepcopy(tree)
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True)):
        set_entry(tree, path, draw(values))
    text = yaml.safe_dump(tree)
    if draw(st.booleans()):
        text = text[:draw(st.integers(0, len(text)))]
    return text


def set_entry(tree: dict, path, value) -> None:
    *parents, leaf = path.split(".") if isinstance(path, str) else path
    for key in parents:
        tree = tree.setdefault(key, {}) if isinstance(tree.get(key, {}), dict) else {}
    tree[leaf] = value


@st.composite
def configs(draw):
    """A valid config with one to three keys set to junk, sometimes as YAML text cut short."""
    return with_junk(draw, BASE, CONFIG_KEYS, junk)


@SETTINGS
@given(configs())
def test_malformed_configs_fail_with_a_config_error_naming_the_key(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    try:
        cfg = load_config(str(path), [f"out_dir={tmp_path / 'run'}"])
        check_run(cfg)  # what a run checks before it makes its folder
    except ConfigError as e:
        msg = str(e)  # a truncated file can break any key, so any key may be the one named
        assert str(path) in msg or re.search(r"config key '[\w.]+'", msg), msg
        assert raised_by_project(e), traceback.format_exception(e)
    else:
        assert cfg.epochs > 0 and cfg.batch_size > 0
    assert not (tmp_path / "run").exists()  # nothing was made


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([*CONFIG_KEYS, "", " ", "a..b", "data."]), junk), min_size=1, max_size=3),
       st.booleans())
def test_malformed_overrides_fail_with_a_config_error(tmp_path, items, raw_text):
    overrides = [f"{k}={v}" if raw_text else f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                 for k, v in items]
    try:
        load_config(str(CONFIG), overrides)
    except ConfigError as e:
        assert re.search(r"config key '[\w.]+'|override ['\"]", str(e)), str(e)
        assert raised_by_project(e), traceback.format_exception(e)


# ---------------------------------------------------------------------------------------------- sweeps
SWEEP = {"base": str(CONFIG), "out_dir": "OUT", "seeds": [0, 1], "overrides": ["epochs=1"], "equivalence_margin": 1.0,
         "pairs": [["b", "a"]], "compare": ["a"],
         "runs": {"a": {"model": "vmixer_t4_28", "model_kwargs": {"embed_dim": 32, "num_blocks": 2}},
                  "b": {"model": "vmixer_t4_28", "lr": 1.0e-3},
                  "c": {"model": "imixer_t4_28", "grid": {"model_kwargs.n_iter": [1, 2]}}}}
SWEEP_PATHS = ["base", "out_dir", "seeds", "overrides", "equivalence_margin", "pairs", "compare", "runs", "runs.a",
               "runs.a.model", "runs.a.model_kwargs", "runs.a.model_kwargs.embed_dim", "runs.b.lr", "runs.b.epochs",
               "runs.c.grid", ("runs", "c", "grid", "model_kwargs.n_iter"), "runs.a.bogus", "runs.a_n_iter1", "bogus"]
# a sweep file's junk also holds dates (which YAML 1.1 turns into datetime.date, and JSON cannot carry)
sweep_junk = st.one_of(junk, st.dates(), st.lists(st.one_of(st.integers(-1, 2), st.dates()), max_size=3))


@st.composite
def sweeps(draw):
    """A valid sweep file with one to three entries set to junk, sometimes as YAML text cut short."""
    return with_junk(draw, SWEEP, SWEEP_PATHS, sweep_junk)


def _sweep_with(path: str, value) -> str:
    spec = copy.deepcopy(SWEEP)
    set_entry(spec, path, value)
    return yaml.safe_dump(spec)


@SETTINGS
@given(sweeps())
@example(_sweep_with("runs.b.lr", datetime.date(2024, 1, 1)))  # a raw TypeError from json once
@example(_sweep_with("runs.a_n_iter1", None))  # shares the folder of c[n_iter=1]
@example(_sweep_with("runs.c.grid", {"model_kwargs.n_iter": [2, 2]}))
def test_malformed_sweep_files_fail_with_a_config_error_naming_the_file_or_key(tmp_path, text):
    """What a sweep does before it trains anything (read the file, expand its runs, check every run's config and
    model) fails with a ConfigError from the project naming the sweep file or the config key, and makes nothing."""
    from experiments import sweep

    path, out = tmp_path / "sweep.yaml", tmp_path / "out"
    path.write_text(text.replace("OUT", str(out)))
    try:
        spec = sweep.load_sweep(str(path))
        for overrides in sweep.expand(spec).values():
            check_run(load_config(spec.get("base"), [*spec.get("overrides", []), *overrides, f"out_dir={out}"]))
    except ConfigError as e:
        msg = str(e)
        assert str(path) in msg or re.search(r"config key '[^']+'|config file '[^']+'", msg), msg
        assert raised_by_project(e), traceback.format_exception(e)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- specs
SPEC_DATA = yaml.safe_load(SPEC.read_text())
SPEC_PATHS = ["visible", "splitting", "groups", "kind", "sizes", "sizes.T", "sizes.K", "sizes.S", "affines",
              "affines.norm", "layers", "layers.v", "layers.s.shape", "layers.m.lagrangian", "layers.c.tau",
              "layers.s.lagrangian.name", "layers.v.lagrangian.axis", "layers.new", "synapses", "synapses.0",
              "synapses.1.layers", "synapses.2.axis", "synapses.0.form", "synapses.1.bias", "synapses.2.affine",
              "synapses.0.bogus", "bogus"]
# what a spec error names: an entry of the spec, or an argument of build (the model's tokens and channels)
ENTRY = re.compile(r"\b(visible|splitting|groups|kind|sizes|affines|layers|synapses|spec|seq_len|dim)\b")


def set_path(data, path: str, value, delete: bool):
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        if isinstance(node, list):
            node = node[int(p)] if p.isdigit() and int(p) < len(node) else None
        else:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, (dict, list)):
            return
    if isinstance(node, list):
        if leaf.isdigit() and int(leaf) < len(node):
            if delete:
                del node[int(leaf)]
            else:
                node[int(leaf)] = value
    elif delete:
        node.pop(leaf, None)
    else:
        node[leaf] = value


@st.composite
def specs(draw):
    data = copy.deepcopy(SPEC_DATA)
    for path in draw(st.lists(st.sampled_from(SPEC_PATHS), min_size=1, max_size=3, unique=True)):
        set_path(data, path, draw(junk), delete=draw(st.booleans()))
    return data, draw(st.integers(-1, 6)), draw(st.integers(-1, 6))


@SETTINGS
@given(specs())
def test_malformed_specs_fail_with_a_spec_error_naming_the_entry(case):
    data, seq_len, dim = case
    try:
        net = NetworkSpec.from_dict(data).build(seq_len, dim)
    except SpecError as e:
        assert ENTRY.search(str(e)), str(e)
        assert raised_by_project(e), traceback.format_exception(e)
    else:
        assert isinstance(net, Network) and net.layers["v"].shape == (seq_len, dim)


# ---------------------------------------------------------------------------------------------- networks
LAGRANGIANS = [lag.identity(), lag.tanh(), lag.gelu(), lag.softmax(), lag.layernorm()]


@st.composite
def networks(draw):
    """Layers of random (sometimes invalid) shapes and taus; synapses between named, sometimes unknown, layers
    along random axes, sometimes with a weight of the wrong shape."""
    names = draw(st.lists(st.sampled_from(["v", "h", "c", "m"]), min_size=1, max_size=3, unique=True))
    layers = {}
    for n in names:
        shape = tuple(draw(st.lists(st.integers(-1, 4), min_size=0, max_size=3)))
        tau = draw(st.sampled_from([1.0, 0.1, 0.0, -1.0, math.nan]))
        layers[n] = (shape, draw(st.sampled_from(LAGRANGIANS)), tau)
    synapses = []
    for _ in range(draw(st.integers(0, 3))):
        a, b = draw(st.sampled_from([*names, "x"])), draw(st.sampled_from([*names, "x"]))
        axis = draw(st.one_of(st.integers(-3, 3), st.sampled_from([1.5, "0"])))
        weight = torch.randn(draw(st.integers(1, 4)), draw(st.integers(1, 4))) if draw(st.booleans()) else None
        synapses.append((a, b, axis, draw(st.sampled_from(["tied", "untied", "broken", "odd"])), weight))
    return layers, synapses


@SETTINGS
@given(networks())
def test_malformed_networks_fail_with_an_error_naming_the_layer_or_synapse(case):
    layer_args, synapse_args = case
    try:
        layers = {n: Layer(shape, lagrangian, tau) for n, (shape, lagrangian, tau) in layer_args.items()}
        synapses = [DenseSynapse(a, b, axis=axis, form=form, weight=w) for a, b, axis, form, w in synapse_args]
        net = Network(layers, synapses)
        net.energy(net.init_state(2))
    except (ValueError, TypeError) as e:
        msg = str(e)
        named = [*layer_args, "x"] + [f"{a}" for a, *_ in synapse_args]
        assert any(repr(n) in msg or f"{n}-" in msg or f"-{n}" in msg for n in named) or "Layer" in msg, msg
        assert raised_by_project(e), traceback.format_exception(e)
    else:
        assert math.isfinite(float(net.energy(net.init_state(2)).sum()))


def test_wrong_inputs_to_simulate_derive_and_models_are_named_by_the_project():
    """Inputs of the wrong shape or value reach no torch kernel: the error comes from the project and names the
    layer, option or argument."""
    import timm

    import derive
    import hopfield
    from hopfield import presets

    net = presets.imixer_chain(8, 16)
    state = net.init_state(2)
    t = torch.linspace(0, 1, 3)
    cases = [
        (lambda: hopfield.simulate(net, state, t, method="rk4", options={"step_size": -0.1}), "step_size'. must be"),
        (lambda: hopfield.simulate(net, state, t, method="euler", options={"step_size": 0.0}), "step_size'. must be"),
        (lambda: hopfield.simulate(net, state, t, options=[1]), "options must be a dict"),
        (lambda: hopfield.simulate(net, state, t, grad="yes"), "simulate: grad must be True or False"),
        (lambda: derive.adiabatic(net)(torch.randn(2, 3, 3)), r"'v' takes states of shape \(batch, \*\(8, 16\)\)"),
        (lambda: derive.discretize(net, n_iter=2)(torch.randn(8, 16)), "visible layer 'v' takes states"),
        (lambda: derive.verify(net, eps=[0.0]), "verify: eps must be"),
        (lambda: derive.verify(net, eps=[]), "verify: eps must be"),
        (lambda: derive.verify(net, v=torch.randn(2, 3, 3)), "visible layer 'v' takes states"),
        (lambda: derive.verify(net, visible="q"), "unknown visible layer 'q'"),
        (lambda: timm.create_model("derived_imixer_t4_28", num_classes=10)(torch.randn(2, 3, 28, 28)), "in_chans 1"),
        (lambda: derive.adiabatic(net, tol="1e-6"), "ReducedField: tol must be None"),
        (lambda: derive.adiabatic(net, alpha=None), "ReducedField: alpha must be a finite number"),
        (lambda: derive.adiabatic(net, m=0), "ReducedField: m must be an int >= 1"),
        (lambda: derive.adiabatic(net, beta="x"), r"ReducedField: beta must be in \(0, 1\]"),
        (lambda: derive.discretize(net, alpha="x"), "DiscreteConfig.alpha must be a finite number"),
        (lambda: derive.discretize(net, dt="0.1"), "DiscreteConfig.dt must be None"),
        (lambda: derive.discretize(net, coeff=float("nan")), "DiscreteConfig.coeff must be a number > 0"),
        (lambda: derive.discretize(net, n_power=0), "DiscreteConfig.n_power must be an int >= 1"),
        (lambda: derive.discretize(net, drop_path="0.1"), r"DiscreteConfig.drop_path must be in \[0, 1\)"),
        (lambda: hopfield.lagrangians.softmax(beta="2"), r"softmax\(beta\) must be a finite number > 0"),
        (lambda: net.init_state(-1), "batch must be a positive integer"),
        (lambda: hopfield.Layer((4, 8), hopfield.lagrangians.relu(), tau="fast"), "Layer tau must be finite and > 0"),
        (lambda: hopfield.DenseSynapse("v", "x", bias="yes"), r"DenseSynapse\('v', 'x'\): bias must be True or False"),
        (lambda: timm.create_model("imixer_t4_28")(torch.randn(2, 1, 28, 28, dtype=torch.float64)),
         r"input images are torch.float64 on cpu, but the model computes in torch.float32"),
        (lambda: derive.discretize(net)(torch.randn(2, 8, 16, dtype=torch.float64)),
         r"the state of the visible layer 'v' is torch.float64 on cpu, but the network computes in torch.float32"),
        (lambda: timm.create_model("derived_imixer_t4_28", foo=1),
         r"derived_imixer_t4_28 \(the derived twin of imixer_t4_28\): imixer_t4_28\(\) got an unexpected keyword"),
        # int() floored a fractional size without a word
        (lambda: derive.derived_block("imixer", 8, 4.5), r"dim \(C, the channels\) must be an integer >= 1, got 4.5"),
        (lambda: derive.block_network("mixer", True, 4), r"seq_len \(S, the tokens\) must be an integer >= 1, got Tru"),
        # a block, or the other family's model, where a model goes: a torch AttributeError ('no attribute cfg') before
        (lambda: derive.to_timm(derive.derived_block("mixer", 8, 4)),
         r"to_timm expects a derived model \(derive.DerivedMixer: .*\), got DerivedBlock"),
        (lambda: derive.to_reference(derive.derived_block("mixer", 8, 4)), "to_reference expects a derived model"),
        (lambda: derive.from_reference(timm.create_model("mixer_s16_224", num_classes=2)),
         r"from_reference expects a mixers.MlpMixer .*got timm.models.mlp_mixer.MlpMixer: for timm's own Mixer use "
         "from_timm"),
        (lambda: derive.from_reference_vit(timm.create_model("vmixer_t4_28")),
         r"from_reference_vit expects a mixers.VisionTransformer .*got MlpMixer"),
        # a size of 0 fell back to the default (``0 or default``), a negative coeff flipped the weights' sign and a
        # zero weight became NaN
        (lambda: presets.star(8, 4, token_hidden=0), r"Layer shape must be .* positive ints, got \(0, 4\)"),
        (lambda: presets.imixer_chain(8, 4, hidden=0), r"Layer shape must be .* positive ints, got \(0, 4\)"),
        (lambda: presets.mixing(8, 4, hidden=0), r"Layer shape must be .* positive ints, got \(0, 4\)"),
        (lambda: presets.imixer_chain(8, 4, coeff=-0.9), r"spectral_rescale\(coeff\) must be a finite number > 0"),
        (lambda: presets.spectral_rescale(presets.chain([4, 3, 2], symmetric=False).requires_grad_(False)
                                          .apply(lambda m: [p.zero_() for p in m.parameters(recurse=False)]), 0.9),
         r"spectral_rescale: synapse '.*' has a weight of spectral norm 0.0; only a finite, non-zero weight"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message) as info:
            call()
        assert raised_by_project(info.value), traceback.format_exception(info.value)


def test_misspelt_options_odd_sizes_and_non_finite_weights_are_named():
    """What torchdiffeq, scipy, timm or matplotlib would warn about and ignore, or fail on deep inside, or what
    a solver would misreport as the dynamics blowing up: named by the project."""
    import matplotlib.pyplot as plt
    import timm

    import derive
    import hopfield
    from hopfield import presets
    from hopfield.plot import save_figure

    net = presets.imixer_chain(8, 16)
    state = net.init_state(2)
    t = torch.linspace(0, 1, 3)
    cases = [
        (lambda: hopfield.simulate(net, state, t, method="euler", options={"stepsize": 0.5}),
         r"simulate: \['stepsize'\] not among the options of method 'euler': \[.*'step_size'"),
        (lambda: hopfield.simulate(net, state, t, method="dopri5", options={"foo": 1}), r"\['foo'\] not among"),
        (lambda: hopfield.simulate(net, state, t, method="scipy_solver", options={"solver": "Foo"}),
         r"options\['solver'\] is one of scipy's"),
        (lambda: net.relax(state, clamped=("v",), options={"foo": 1}), r"relax: \['foo'\] not among"),
        (lambda: Layer((4, 4), lag.layernorm(axis=3)), r"Layer of shape \(4, 4\) with layernorm.*axis 3 is out of"),
        (lambda: net.init_state(2, dtype="float64"), "init_state: dtype is a floating torch.dtype"),
        (lambda: derive.verify("imixer"), "verify: net is a hopfield.Network"),
        (lambda: derive.block_spec("foo"), "block_spec: kind must be one of"),
        (lambda: timm.create_model("vmixer_t4_28", num_classes=-1), "MixerConfig.num_classes must be an integer >= 0"),
        (lambda: timm.create_model("imixer_t4_28", features_only=True, out_indices=(7,)),
         r"imixer_t4_28: out_indices: block indices \(7,\) do not fit a model of 4 blocks"),
        (lambda: timm.create_model("vmixer_t4_28").forward_intermediates(torch.zeros(1, 1, 28, 28), indices=[99]),
         r"block indices \[99\] do not fit a model of 4 blocks"),
        (lambda: timm.create_model("imixer_t4_28", h_ratio=0.001), "token chain's hidden layer .* is 0"),
        (lambda: timm.create_model("imixer_t4_28", embed_dim=1), r"the token MLP \(int\(mlp_ratio\[0\] \* embed_dim"),
        (lambda: save_figure(plt.figure(), "/tmp/energy.xyz"), "'.xyz' is not an image format matplotlib writes"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message) as info:
            call()
        assert raised_by_project(info.value), traceback.format_exception(info.value)
    assert hopfield.simulate(net, state, t, method="euler", options={"step_size": 0.25}).energy.shape == (3, 2)
    bad_v = torch.randn(2, 8, 16)
    bad_v[1, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"the visible state of sample\(s\) \[1\] is not finite"):
        derive.adiabatic(net)(bad_v)
    with torch.no_grad():
        net.synapses[0].weight[0, 0] = math.nan
    for call, where in ((lambda: hopfield.simulate(net, state, t), "simulate"),
                        (lambda: net.relax(state, clamped=("v",)), "relax"),
                        (lambda: derive.adiabatic(net)(torch.randn(2, 8, 16)), "the fast layers' fixed point")):
        with pytest.raises(ValueError, match=f"{where}: the parameter 'weight' of synapse 'v-x' is not finite"):
            call()


def test_yaml_files_keep_no_key_twice_and_must_be_text(tmp_path):
    """A key given twice (PyYAML keeps the last, silently) and a file that is not UTF-8 text are errors naming the
    file; a spec read by plain yaml.safe_load (YAML 1.1: '1e-6' a string) still reads its numbers."""
    import derive

    twice = tmp_path / "twice.yaml"
    twice.write_text(CONFIG.read_text() + "\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: line \d+: the key 'epochs' is given a second time \(first"):
        load_config(str(twice))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"epochs: 2\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=f"config file '{binary}' is not valid YAML: it is not UTF-8 text"):
        load_config(str(binary))
    spec_text = SPEC.read_text()
    layer_twice = tmp_path / "layers_twice.yaml"
    first = spec_text.index("layers:") + len("layers:\n")
    line = spec_text[first:spec_text.index("\n", first) + 1]
    layer_twice.write_text(spec_text[:first] + line + spec_text[first:])
    with pytest.raises(SpecError, match=rf"'{layer_twice}' is not valid YAML: line \d+: the key 'v' is given"):
        derive.load_spec(str(layer_twice))
    plain = yaml.safe_load(spec_text.replace("eps: 1.0e-", "eps: 1e-").replace("tau: 0.01", "tau: 1e-2"))
    assert any(isinstance(v, str) for L in plain["layers"].values() for v in
               [*(L["lagrangian"].values() if isinstance(L["lagrangian"], dict) else []), L.get("tau")])
    assert derive.load_spec(plain).to_dict() == derive.load_spec(str(SPEC)).to_dict()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
