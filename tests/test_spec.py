"""Network specs: a block's network as data (Python and YAML), the preset families as specs, models from specs."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from helpers import perturb

import derive
from derive import NetworkSpec, SpecError, load_spec, spec_block
from experiments import analyze, train
from experiments.train import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "configs" / "fashion_small.yaml")
S, C = 12, 8

CUSTOM = """
# a star of a tied tanh token layer and an untied ReLU channel layer with biases, one parallel step
visible: v
splitting: parallel
sizes: {T: C // 2, D: 3 * C}
layers:
  v: {shape: [S, C], lagrangian: {name: layernorm, axis: -1, eps: 1.0e-6}, tau: 1.0}
  a: {shape: [T, C], lagrangian: tanh, tau: 0.01}
  b: {shape: [S, D], lagrangian: relu, tau: 0.01}
synapses:
  - {layers: [v, a], axis: -2, form: tied}
  - {layers: [v, b], axis: -1, form: untied, bias: true}
"""


@pytest.mark.parametrize("kind, kw", [("mixer", {}), ("mixer", dict(norm="matrix", bias=False)),
                                      ("imixer", dict(h_ratio=2)), ("limixer", dict(depth=4, h_ratio=1.5)),
                                      ("paramixer", dict(form="broken")), ("paramixer", dict(form="symmetric"))])
def test_preset_specs_through_yaml_give_the_preset_blocks(kind, kw, tmp_path):
    """Each preset family is a spec: written to YAML, read back and discretised it is the preset's block, with
    the same state-dict names and, with the same weights, the same output (float64, train and eval)."""
    spec = derive.block_spec(kind, **kw)
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    again = load_spec(str(path))
    assert again.to_dict() == spec.to_dict()
    n_iter = {} if kind in ("mixer", "paramixer") else dict(n_iter=3)
    ref = perturb(derive.derived_block(kind, S, C, **kw, **n_iter)).double()
    block = spec_block(str(path), S, C, **n_iter).double()
    assert list(block.state_dict()) == list(ref.state_dict())
    block.load_state_dict(ref.state_dict())
    x = torch.randn(3, S, C, dtype=torch.float64)
    for train_mode in (True, False):
        ref.train(train_mode)
        block.train(train_mode)
        assert (block(x) - ref(x)).abs().max() <= 1e-12


def test_a_custom_spec_block_is_the_update_written_by_hand():
    spec = load_spec(yaml.safe_load(CUSTOM))
    block = perturb(spec_block(spec, S, C)).double()
    net = block.net
    assert net.layers["a"].shape == (C // 2, C) and net.layers["b"].shape == (S, 3 * C)
    wa, vb, syn_b = net.synapses[0].weight, None, net.synapses[1]
    vb = syn_b.weight_fb
    x = torch.randn(3, S, C, dtype=torch.float64)
    g = F.layer_norm(x, (C,), eps=1e-6)
    a = torch.tanh(torch.einsum("ts,bsc->btc", wa, g))
    b = torch.relu(g @ syn_b.weight.T + syn_b.bias)
    expected = x + torch.einsum("st,btc->bsc", wa.T, a) + b @ vb.T + syn_b.bias_fb
    assert (block(x) - expected).abs().max() <= 1e-12
    assert "tanh" in block.explain() and "ReLU" in block.explain()
    assert any("'v-b'" in c and "untied" in c for c in net.descent_caveats())


def test_spec_errors_name_the_offending_entry(tmp_path):
    base = yaml.safe_load(CUSTOM)

    def broken(edit):
        data = json.loads(json.dumps(base))
        edit(data)
        return data

    cases = [
        (lambda d: d["synapses"][1].update(layers=["v", "q"]), r"synapses\[1\]\.layers: 'q' is not a layer"),
        (lambda d: d["synapses"][0].update(form="symmetric"), r"synapses\[0\]\.form: one of"),
        (lambda d: d["synapses"][0].update(axs=-2), r"synapses\[0\]: unknown key\(s\) \['axs'\]"),
        (lambda d: d["layers"]["a"].update(lagrangian="softplus"), r"layers\.a\.lagrangian: unknown Lagrangian"),
        (lambda d: d["layers"]["a"].update(lagrangian={"name": "tanh", "bta": 2}), r"layers\.a\.lagrangian"),
        (lambda d: d["layers"]["a"].update(tau=0), r"layers\.a\.tau"),
        (lambda d: d.update(visible="w"), r"visible: 'w' is not a layer"),
        (lambda d: d.update(splitting="serial"), r"splitting: one of"),
        (lambda d: d.update(groups=[["a"], ["b"]]), r"groups: only a sequential splitting"),
        (lambda d: d.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
    ]
    for edit, match in cases:
        with pytest.raises(SpecError, match=match):
            load_spec(broken(edit))
    build_cases = [
        (lambda d: d["sizes"].update(T="C // 16"), r"sizes\.T: 'C // 16' gives 0"),
        (lambda d: d["sizes"].update(T="C ** 2"), r"sizes\.T: 'C \*\* 2' may use"),
        (lambda d: d["sizes"].update(T="K + 1"), r"sizes\.T: unknown size 'K'"),
        (lambda d: d["layers"]["a"].update(shape=["T", "C + 1"]), r"does not fit together.*'v-a'"),
    ]
    for edit, match in build_cases:
        with pytest.raises(SpecError, match=match):
            load_spec(broken(edit)).build(S, C)
    (tmp_path / "bad.yaml").write_text("layers: [1, 2\n")
    with pytest.raises(SpecError, match=r"bad\.yaml.*not valid YAML"):
        load_spec(str(tmp_path / "bad.yaml"))
    with pytest.raises(SpecError, match="neither a file nor a registered name"):
        load_spec(str(tmp_path / "missing.yaml"))


def test_a_network_built_in_python_becomes_a_spec():
    net = derive.block_network("paramixer", S, C, form="tied")
    spec = NetworkSpec.from_network(net, splitting="parallel")
    rebuilt = spec.build(S, C)
    assert [type(s).__name__ for s in rebuilt.synapses] == ["DenseSynapse"] * 2
    assert rebuilt.synapses[0].affine is rebuilt.synapses[1].affine  # the shared LayerNorm stays shared
    assert {n: L.shape for n, L in rebuilt.layers.items()} == {n: L.shape for n, L in net.layers.items()}
    with pytest.raises(SpecError, match=r"layers\.v\.shape: the visible layer is the model's token x channel"):
        spec.build(S + 1, C)  # fixed sizes fit only the network's own tokens x channels


def test_spec_models_register_train_resume_and_analyse_from_the_run_folder_alone(tmp_path, monkeypatch):
    """A YAML spec trains by config alone; the run folder stores the resolved spec, so resuming and analysing
    need neither the YAML file nor any user code; a spec registered by an --import-ed module works too."""
    spec_file = tmp_path / "net.yaml"
    spec_file.write_text(CUSTOM)
    model = timm.create_model("derived_spec_t4_28", spec=str(spec_file), embed_dim=16, num_blocks=2)
    assert isinstance(model, derive.DerivedMixer) and model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(TypeError, match="unexpected keyword argument 'h_ratio'"):
        timm.create_model("derived_spec_t4_28", spec=str(spec_file), h_ratio=2)
    out = tmp_path / "run"
    common = ["data.num_workers=0", "progress=false", "warmup_epochs=0", "data.train_subset=256",
              "data.test_subset=64", "batch_size=64", "model=derived_spec_t4_28", f"out_dir={out}"]
    kw = f"model_kwargs={{spec: {spec_file}, embed_dim: 16, num_blocks: 2}}"
    cfg = load_config(CONFIG, [*common, "epochs=2", kw])
    assert cfg.model_kwargs["spec"]["layers"]["a"]["lagrangian"] == {"name": "tanh"}
    evaluate = train.evaluate

    def stop_after_epoch_1(*args, **kw):  # a SIGTERM at the end of epoch 1: the run stops early in epoch 2
        signal.raise_signal(signal.SIGTERM)
        monkeypatch.setattr(train, "evaluate", evaluate)
        return evaluate(*args, **kw)

    monkeypatch.setattr(train, "evaluate", stop_after_epoch_1)
    assert train.train(cfg)["stopped"]
    spec_file.unlink()  # the run folder alone must do from here on
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["model_kwargs"]["spec"]["synapses"][0]["form"] == "tied"
    summary = train.train(load_config(str(out / "config.yaml")), resume=True)
    assert summary["epochs"] == 2 and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    record = analyze.analyse_run(out, 4)
    assert record["model"]["block"] == "spec" and record["symmetry"]
    with pytest.raises(ConfigError, match=r"model_kwargs\.spec.*neither a file nor a registered name"):
        load_config(CONFIG, [*common, "model_kwargs={spec: nowhere.yaml}"])

    module = tmp_path / "my_blocks.py"
    module.write_text("import yaml, derive\n"
                      f"derive.register_spec('my_star', yaml.safe_load('''{CUSTOM}'''))\n")
    r = subprocess.run([sys.executable, "-m", "experiments.train", "--import", "my_blocks", "--config", CONFIG,
                        *[c for c in common if not c.startswith("out_dir")], f"out_dir={tmp_path / 'run2'}",
                        "epochs=1", "model_kwargs={spec: my_star, embed_dim: 16, num_blocks: 1}"],
                       cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "my_star" not in (tmp_path / "run2" / "config.yaml").read_text()  # the spec itself, not its name
    r = subprocess.run([sys.executable, "-m", "experiments.train", "--import", "no_such_module", "--config", CONFIG],
                       cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    assert r.returncode == 2 and "--import no_such_module: the module cannot be imported" in r.stderr


@pytest.mark.slow
def test_the_new_architectures_are_limits_of_their_networks(tmp_path):
    """The two architectures designed as specs alone (experiments/configs/specs), through the script that writes
    their reports for docs/results.md: with random weights whose hidden-hidden couplings contract, the full
    network's visible velocity approaches the reduced field in proportion to eps, and the block with its fixed
    points converged is one split Euler step of it."""
    from experiments import verify_specs

    reports = verify_specs.main(["--out", str(tmp_path)])
    assert set(reports) == {"imixer_implicit_channels", "paramixer_memory_arm"}
    for name, report in reports.items():
        assert report.ok and 0.9 < report.slope < 1.1 and report.block_error < 1e-10, str(report)
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "verify_specs.md").read_text().count("verdict: the reduced field is the network's") == 2


def test_verify_specs_takes_one_file_and_names_a_bad_spec_before_writing(tmp_path, capsys):
    """--specs may name one file; a spec that does not build stops the script with its file and entry named
    (argparse's error, exit 2) before any report is written."""
    from experiments import verify_specs

    bad = tmp_path / "bad.yaml"
    bad.write_text("visible: v\nsizes: {T: C / 0}\nlayers:\n"
                   "  v: {shape: [S, C], lagrangian: {name: layernorm, axis: -1}, tau: 1.0}\n"
                   "  x: {shape: [T, C], lagrangian: gelu, tau: 0.1}\nsynapses:\n  - {layers: [v, x], axis: -2}\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        verify_specs.main(["--specs", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(bad) in err and "sizes.T: division by zero" in err and "Traceback" not in err
    assert not out.exists()


def test_sizes_resolve_in_any_order_and_a_cycle_is_named():
    """A stored config.yaml lists a spec's sizes sorted by name (H before T here): each size is evaluated once the
    sizes it names are known, so the resumed or analysed run builds the model it trained; a cycle is an error."""
    spec = load_spec(ROOT / "experiments" / "configs" / "specs" / "imixer_implicit_channels.yaml")
    stored = yaml.safe_load(yaml.safe_dump(spec.to_dict(), sort_keys=True))
    assert list(stored["sizes"]) == ["D", "E", "H", "T"]
    again = NetworkSpec.from_dict(stored)
    assert again.resolve_sizes(S, C) == spec.resolve_sizes(S, C) == {"S": S, "C": C, "T": 4, "H": 8, "D": 32, "E": 8}
    assert again.build(S, C).layers["h"].shape == (8, C)
    cyclic = dict(stored, sizes={"T": "H // 2", "H": "2 * T"})
    with pytest.raises(SpecError, match=r"sizes: \['H', 'T'\] refer to each other in a cycle"):
        NetworkSpec.from_dict(cyclic).resolve_sizes(S, C)
    with pytest.raises(SpecError, match=r"sizes\.T: unknown size 'Q'"):
        NetworkSpec.from_dict(dict(stored, sizes={"T": "Q + 1"})).resolve_sizes(S, C)


def test_analysis_reports_every_arm_of_a_spec_model():
    """The analysis of a spec model with two implicit arms (tokens and channels) reports both solves of each block;
    one with two arms along the tokens tells their symmetry indices apart, in the tables and in the per-epoch
    metrics (no key shared by two synapses)."""
    from experiments import analysis, reports, symmetry

    specs = ROOT / "experiments" / "configs" / "specs"
    torch.manual_seed(0)
    implicit = timm.create_model("derived_spec_t4_28", spec=str(specs / "imixer_implicit_channels.yaml"),
                                 embed_dim=16, num_blocks=2, n_iter=2)
    perturb(implicit, 0.05)
    result = analysis.fixed_point_convergence(implicit, torch.randn(3, 1, 28, 28))
    assert [(r["block"], r["layer"]) for r in result["layers"]] == [(0, "x"), (0, "c"), (1, "x"), (1, "c")]
    assert all(len(r["norm"]) == 2 and "certificate" in r for r in result["layers"])
    assert "| 0 (c) |" in reports.certificate_report({"spec": [result]})

    memory = timm.create_model("derived_spec_t4_28", spec=str(specs / "paramixer_memory_arm.yaml"),
                               embed_dim=16, num_blocks=2)
    rows = symmetry.symmetry_index(memory)
    label = symmetry.mlp_label(rows)
    assert [label(r) for r in rows[:3]] == ["tokens (v-s)", "channels", "tokens (v-m)"]
    scalars = symmetry.symmetry_scalars(memory)
    assert {"sym_corr_b0_tokens_v-s", "sym_corr_b0_tokens_v-m", "sym_corr_b0_channels"} <= scalars.keys()
    assert len([k for k in scalars if k.startswith("sym_corr_b")]) == len(rows)
    assert "| tokens (v-m) |" in symmetry.symmetry_report({"memory": [rows]})
    # a model with one synapse per kind keeps its plain labels and keys
    assert "sym_corr_b1_tokens" in symmetry.symmetry_scalars(implicit)


def test_yaml_reads_exponent_numbers_without_a_dot(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-6`` as a string; specs, configs and overrides read it as the float (YAML 1.2),
    so an untyped value (a Lagrangian's eps, a model_kwargs entry) reaches the code as a number."""
    text = (Path(__file__).parent.parent / "experiments/configs/specs/paramixer_memory_arm.yaml").read_text()
    assert "eps: 1.0e-6" in text
    path = tmp_path / "net.yaml"
    path.write_text(text.replace("eps: 1.0e-6", "eps: 1e-6"))
    assert load_spec(path).layers["v"].lagrangian["eps"] == 1e-6
    assert yaml.safe_load("eps: 1e-6") == {"eps": "1e-6"}  # what plain PyYAML gives
    cfg = load_config(None, ["model_kwargs.lam=1e-3", "model_kwargs.tag='1e-3'", "model_kwargs.shift=-2E+4"])
    assert cfg.model_kwargs == {"lam": 0.001, "tag": "1e-3", "shift": -2e4}
    # YAML 1.2 has no implicit timestamps: a date is a string (a datetime.date broke the sweep's JSON overrides)
    assert yaml.safe_load("d: 2024-01-01")["d"].__class__.__name__ == "date"  # what plain PyYAML gives
    cfg = load_config(None, ["model_kwargs.tag=2024-01-01", "model_kwargs.at=2001-12-14 21:59:43.10 -5"])
    assert cfg.model_kwargs == {"tag": "2024-01-01", "at": "2001-12-14 21:59:43.10 -5"}
