"""The README's main job runs end to end on a small state and its derived block equals the hand-written one."""

import re

import pytest

from experiments import main


@pytest.mark.slow
def test_main_job_simulates_and_derives(tmp_path, capsys):
    out = main.main(["--tokens", "8", "--channels", "6", "--batch", "2", "--t-end", "1", "--points", "5",
                     "--out", str(tmp_path), "--train-epochs", "1", "--train-subset", "2000"])
    assert out["descent_ok"] and (tmp_path / "energy.png").stat().st_size > 1000
    errors = out["errors"]
    assert errors["float64/train"] <= 1e-10 and errors["float64/eval"] <= 1e-10
    assert errors["float32/train"] <= 1e-5 and errors["float32/eval"] <= 1e-5
    assert out["train"]["last_top1"] > 40.0  # one epoch on 2,000 real images; chance is 10%
    text = capsys.readouterr().out
    assert "FPA_2^x(" in text and "NOT certified" in text and "coeff < 0.8858" in text


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "0"], "--tokens 0: must be at least 1"),
    (["--taus", "1", "0", "-1"], r"--taus\[1\] 0.0: must be a finite number > 0"),
    (["--t-end", "nan"], "--t-end nan: must be a finite number > 0"),
    (["--train-epochs", "1", "--train-subset", "3"], "--train-subset 3: must be at least the run's batch size, 64"),
    (["--method", "rk99"], "unknown solver 'rk99'"),
])
def test_main_job_names_the_option_it_cannot_run_with(tmp_path, capsys, argv, message):
    small = ["--tokens", "4", "--channels", "4", "--points", "2", "--train-epochs", "0", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main.main([*small, *argv])  # (the later value of an option wins)
    assert re.search(message, capsys.readouterr().err)
