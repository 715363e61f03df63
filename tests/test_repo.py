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


def test_docs_name_tests_and_files_that_exist():
    """Each check a document cites (``tests/test_x.py::test_y``, or ``::test_y`` in the test file named last before
    it) is a test of that file, and each cited path of the repository exists: a renamed test or moved module would
    otherwise leave an equation next to a check that is not there."""
    import ast
    import re

    tests = {str(f.relative_to(ROOT)): {n.name for n in ast.walk(ast.parse(f.read_text()))
                                        if isinstance(n, ast.FunctionDef)} for f in (ROOT / "tests").glob("test_*.py")}
    broken, cited = [], 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text, current = doc.read_text(), None
        for m in re.finditer(r"(tests/test_\w+\.py)(?:::(test_\w+))?|::(test_\w+)", text):
            current, name = m.group(1) or current, m.group(2) or m.group(3)
            if name is None or name == "test_name":  # a file alone; the docs' placeholder `tests/...::test_name`
                continue
            cited += 1
            if current not in tests or name not in tests[current]:
                broken.append(f"{doc.name}: {current}::{name}")
        for m in re.finditer(r"`((?:hopfield|derive|experiments|mixers|benchmarks|scripts|tests|docs)/[\w/.-]+)`",
                             text):
            if not (ROOT / m.group(1)).exists():
                broken.append(f"{doc.name}: {m.group(1)}")
    assert cited >= 50 and not broken, broken
