"""docs/tutorial.md runs: its python blocks in one namespace, its bash blocks in a shell, in order, in a scratch
folder; its sweep file is a valid sweep whose models build."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments import sweep, train
from experiments.train import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_block_of_the_tutorial_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"```(python|bash|yaml)\n(.*?)```", text, re.S)
    assert [lang for lang, _ in blocks].count("python") >= 5 and any(lang == "bash" for lang, _ in blocks)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the venv's, as the README's
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REPO": str(ROOT), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, "docs/tutorial.md", "exec"), namespace)
        elif lang == "bash":
            r = subprocess.run(["bash", "-euc", code], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert r.returncode == 0, (code, r.stderr[-3000:])
        else:
            spec = yaml.safe_load(code)
            spec["base"] = str(ROOT / spec["base"])
            sweep.check_spec(spec)
            for overrides in sweep.expand(spec).values():
                train.check_model(load_config(spec["base"], overrides))
    assert (tmp_path / "runs" / "my_block" / "summary.json").exists()
    assert (tmp_path / "runs" / "my_block_analysis" / "report.json").exists()
    assert (tmp_path / "runs" / "my_star" / "summary.json").exists()
    assert (tmp_path / "verify.png").exists()
