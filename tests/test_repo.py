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
