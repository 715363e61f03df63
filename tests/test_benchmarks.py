"""Smoke tests of the benchmark scripts at tiny sizes (they are not run as part of the package)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package); its dataclasses need it in sys.modules."""
    key = f"_benchmark_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


@pytest.fixture(scope="module")
def tt():
    return load("train_throughput")


def test_train_throughput_cpu(tt):
    args = tt.parse_args(["--device", "cpu", "--models", "vmixer_t4_28", "imixer_t4_28", "--img-size", "28",
                          "--in-chans", "1", "--num-classes", "10", "--batch", "4", "--precision", "fp32", "bf16",
                          "--modes", "eager", "--warmup", "1", "--steps", "1", "--rounds", "2"])
    rows = tt.run(args)
    assert [(r["model"], r["mode"], r["precision"]) for r in rows] == [
        ("vmixer_t4_28", "eager", "fp32"), ("vmixer_t4_28", "eager", "bf16"),
        ("imixer_t4_28", "eager", "fp32"), ("imixer_t4_28", "eager", "bf16")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and len(r["times"]) == 2
        assert r["flops_per_step"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None and r["peak_mem_bytes"] is None  # CPU: neither is reported
    mixer, mixer_bf16, imixer, imixer_bf16 = rows
    assert imixer["flops_per_step"] > mixer["flops_per_step"]  # the iMixer's fixed-point iterations
    assert mixer["vs_first"] == 1.0 and mixer_bf16["vs_first"] == 1.0
    assert imixer["vs_first"] == pytest.approx(imixer["images_per_s"] / mixer["images_per_s"])
    assert imixer_bf16["bf16_speedup"] == pytest.approx(imixer["ms_per_step"] / imixer_bf16["ms_per_step"])
    assert mixer["bf16_speedup"] is None
    text = "\n".join(tt.table(rows))
    assert "| `imixer_t4_28` | eager | bf16 |" in text
    assert "ms / step" not in text and "TFLOP/s" not in text  # CPU: ratios only, no absolute times
    assert f"| {imixer_bf16['vs_first']:.3f} | – | {imixer_bf16['bf16_speedup']:.2f} |" in text


def test_simulate_report_gives_ratios_per_round():
    """The side-by-side table is the per-round ratio HAMUX / ours (median [range]), without the CPU seconds."""
    sim = load("simulate_vs_hamux")
    keys = ["vf", "rk4_energy", "rk4_plain", "euler_energy", "euler_plain", "dopri5", "dopri5_plain",
            "dopri5_torchdiffeq"]
    times = {f"ours:{k}": [1.0, 2.0, 4.0] for k in keys}
    times |= {f"theirs:{k}": [3.0, 4.0, 4.0] for k in [*keys[:6], "dopri5_per_sample"]}
    times["ours:dopri5_torchdiffeq"] = [2.5, 5.0, 12.0]
    text = sim.render({"times": times, "rounds": 3, "dopri5_nfe": 512, "dopri5_descent": "energy never rose"})
    assert "| RK4, 100 steps, energy at every step | 2.00 [1.00-3.00] |" in text  # 3/1, 4/2, 4/4
    assert "| torchdiffeq | 2.50 [2.50-3.00] |" in text
    assert "seconds" not in text and "GFLOP/s" not in text


def test_train_throughput_model_kwargs(tt):
    assert tt.parse_model('imixer_s16_224:{"h_ratio": 2, "n_iter": 3}') == ("imixer_s16_224",
                                                                           {"h_ratio": 2, "n_iter": 3})
    assert tt.parse_model("derived_vmixer_s16_224") == ("derived_vmixer_s16_224", {})
    with pytest.raises(ValueError):
        tt.parse_model("no_such_model_xyz")
    with pytest.raises(ValueError):
        tt.parse_model("imixer_s16_224:[2]")
    for bad in ("no_such_model_xyz", "vmixer_t4_28:{bad"):  # named on the command line, before anything is built
        with pytest.raises(SystemExit):
            tt.parse_args(["--models", bad])


def test_adiabatic_solve_benchmark_compares_both_solvers(capsys):
    table = load("adiabatic_solve").main(["--sizes", "4x8", "--rounds", "1", "--max-jacobian-gb", "8"])
    rows = [r for r in table.splitlines() if r.startswith("| 4x8 |")]
    assert len(rows) == 2 and "dense Newton" in rows[0] and "Anderson (default)" in rows[1]
    assert float(rows[1].split("|")[-2]) < 1e-9  # the two fields agree
    skipped = load("adiabatic_solve").main(["--sizes", "4x8", "--rounds", "1", "--max-jacobian-gb", "0"])
    assert "skipped: the Jacobian alone needs" in skipped


def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    """benchmarks/gpu_check.sh --dry-run (tiny sizes, CPU) runs all three stages and writes one section: what a
    lent GPU will run cannot rot unnoticed."""
    import os
    import subprocess

    doc = tmp_path / "doc.md"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_DOC": str(doc)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    text = doc.read_text()
    assert text.count("## GPU check: CPU dry run") == 1
    for heading in ("### Simulation at scale", "### Training throughput", "### Fashion-MNIST, derived iMixer"):
        assert heading in text, text
    assert "failed" not in text and "stopped at its limit" not in text, text
    assert "<!--" not in text and "\n# " not in text  # the training table alone, no file heading or markers
