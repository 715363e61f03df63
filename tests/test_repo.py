"""Repository hygiene that CI enforces: ruff is clean and the README's commands are what CI runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme if line.startswith("bash scripts/setup.sh")]
    assert len(commands) >= 2, "the README opens with the main-job and the test command"
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    """Every ```python block of the README runs; ``timm_mixer`` is the one name it leaves to the reader."""
    import re

    import torch
    from timm.models.mlp_mixer import MlpMixer

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2 and "net.relax(" in blocks[0]
    monkeypatch.chdir(tmp_path)  # the example writes energy.png
    torch.manual_seed(0)
    ns = {"timm_mixer": MlpMixer(num_classes=10, img_size=32, patch_size=4, num_blocks=2, embed_dim=64)}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), ns)
        if i == 0:  # the state the README relaxes to is a fixed point: max |dx/dt| < tol on the free layers
            with torch.no_grad():
                speed = ns["net"].vector_field(ns["fixed_point"], clamped=("v",))
            assert max(float(d.abs().max()) for d in speed.values()) < 1e-3
    assert (tmp_path / "energy.png").stat().st_size > 0
