"""Training: config errors, checkpoints (atomic, weights-only, resumable after a kill), DDP, end to end."""

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from experiments import analyze, build, reports, runs, sweep, train
from experiments.config import import_modules
from experiments.runs import load_checkpoint
from experiments.train import CheckpointError, ConfigError, RunFileError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "configs" / "fashion_small.yaml")
TINY = ["model=vmixer_t4_28", "model_kwargs={embed_dim: 32, num_blocks: 2}", "data.num_workers=0",
        "progress=false", "warmup_epochs=0"]


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ config
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        load_config(CONFIG, ["epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown config key data\.'nam'|unknown config key 'data\.nam'|nam"):
        load_config(CONFIG, ["data.nam=cifar10"])
    with pytest.raises(ConfigError, match="'batch_size' must be a positive integer"):
        load_config(CONFIG, ["batch_size=0"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(CONFIG, ["epochs"])
    with pytest.raises(ConfigError, match="'amp' must be one of"):
        load_config(CONFIG, ["amp=fp8"])
    assert load_config(CONFIG, ["amp=true"]).amp == "auto" and load_config(CONFIG, ["amp=false"]).amp == "off"
    with pytest.raises(ConfigError, match="'amp' must be str"):
        load_config(CONFIG, ["amp=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' is a folder, not a YAML file"):
        load_config(str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"override 'model_kwargs=\{a: \[1,': the value of config key "
                                          "'model_kwargs' is not valid YAML"):
        load_config(CONFIG, ["model_kwargs={a: [1,"])
    cfg = load_config(CONFIG, ["epochs=3", "model_kwargs.h_ratio=2", "data.name=cifar10", "data.root=/data/c10"])
    assert cfg.epochs == 3 and cfg.model_kwargs == {"h_ratio": 2} and cfg.data.name == "cifar10"
    with pytest.raises(ConfigError, match="unknown model 'nomodel'"):
        train.build_model(load_config(CONFIG, ["model=nomodel"]), 10, 1, 28)
    with pytest.raises(ConfigError, match="model_kwargs"):
        train.build_model(load_config(CONFIG, ["model_kwargs.wings=2"]), 10, 1, 28)
    for override, message in (("sched=plateau", "'sched' must be one of"), ("opt=adamx", "'opt': 'adamx' is not"),
                              ("lr=-1", "'lr' must be > 0"), ("mixup=-0.1", "'mixup' must be >= 0"),
                              ("drop_path=1.0", r"'drop_path' must be in \[0, 1\)"),
                              ("data.hflip=2", r"'data': DataConfig.hflip must be a probability"),
                              ("data.name=mnist", "'data': DataConfig.name='mnist' is not a known dataset")):
        with pytest.raises(ConfigError, match=message):
            load_config(CONFIG, [override])
    with pytest.raises(ConfigError, match="'batch_size' must be even with mixup"):
        load_config(CONFIG, ["cutmix=1.0", "batch_size=33"])
    # the model is checked without data or memory (meta device), as a sweep does before training anything
    train.check_model(load_config(CONFIG, ["model=mhavit_t4_28"]))
    for kwargs in ("{wings: 2}", "{n_iter: -1}", "{h_ratio: -1}", "{embed_dim: 0}"):
        with pytest.raises(ConfigError, match="config key 'model_kwargs' does not fit 'derived_imixer_t4_28'"):
            train.check_model(load_config(CONFIG, [f"model_kwargs={kwargs}"]))
    # timm.create_model drops a null keyword argument: YAML's {n_iter:4} (no space after the colon) is the key
    # 'n_iter:4' with a null value, which trained the default n_iter without a word before the check
    for override, message in (("model_kwargs={n_iter:4}", "config key 'model_kwargs.n_iter:4' is null, which "
                               "timm's create_model drops without a word: give it a value or remove it (YAML reads "
                               "'n_iter:4' as one key with no value: write 'n_iter: 4', with a space after the colon)"),
                              ("model_kwargs.n_iter=", "config key 'model_kwargs.n_iter' is null, which timm's")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            train.check_model(load_config(CONFIG, [override]))
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'data.name:cifar10'; valid keys: ['aa'")
                       + ".*" + re.escape("(YAML reads 'name:cifar10' as one key with no value: write 'name: "
                                          "cifar10', with a space after the colon)")):
        load_config(CONFIG, ["data={name:cifar10}"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.nam'; valid keys: \[[^(]*\]$"):
        load_config(CONFIG, ["data={nam: cifar10}"])  # no hint where the key has no colon


def test_errors_before_the_run_come_before_its_folder(tmp_path):
    """An unknown device, CUDA without a GPU, a batch larger than the training images and a subset larger than its
    split fail before anything is read or the run folder is made; a one-epoch run that is all warm-up warns."""
    out = tmp_path / "run"
    cases = [("device=tpu", "'device': 'tpu' is not a device"),
             ("data.train_subset=100", "'batch_size': 128 exceeds the 100 training images"),
             ("data.train_subset=70000", "train_subset=70000 exceeds the 60000 images of fashion_mnist's train"),
             ("data.test_subset=20000", "test_subset=20000 exceeds the 10000 images"),
             ("model_kwargs.img_size=32", "config key 'model_kwargs.img_size': set by the dataset (data.img_size)"),
             ("model_kwargs.drop_path_rate=0.1", "'model_kwargs.drop_path_rate': set by config key 'drop_path'")]
    if not torch.cuda.is_available():
        cases.append(("device=cuda", "'device': 'cuda', but this machine has no CUDA GPU"))
    for override, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            train.train(load_config(CONFIG, [*TINY, override, f"out_dir={out}"]))
        assert not out.exists(), override
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=f"config key 'out_dir': '{a_file}' is a file, not a folder"):
        train.train(load_config(CONFIG, [*TINY, f"out_dir={a_file}"]))
    finished = tmp_path / "finished"  # a committed run: summary.json kept, its checkpoint not
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds a finished run \(summary.json\) and no checkpoint to resume from"):
        train.train(load_config(CONFIG, [*TINY, f"out_dir={finished}"]), resume=True)
    assert load_config(CONFIG, ["out_dir=~/runs/x"]).out_dir == str(Path.home() / "runs" / "x")
    with pytest.raises(ConfigError, match=r"--import my_block\.py: give a module's name, not a file's path"):
        import_modules(["my_block.py"])
    with pytest.warns(RuntimeWarning, match=r"'warmup_epochs' \(1\) >= 'epochs' \(1\): the whole run is warm-up"), \
            pytest.warns(RuntimeWarning, match=r"'min_lr' \(1\) >= the learning rate \(0.001\): the schedule never"):
        train.train(load_config(CONFIG, [*TINY, "warmup_epochs=1", "epochs=1", "data.train_subset=64", "lr=1e-3",
                                         "min_lr=1", "data.test_subset=32", "batch_size=32", f"out_dir={out}"]))


def test_write_failures_name_the_file_and_keep_the_previous_checkpoint(tmp_path, monkeypatch):
    """A read-only folder, a full disk or the file-size limit while a checkpoint is written: an error that names
    the file and the reason; the previous checkpoint is intact and no temporary file is left."""
    import errno

    path = tmp_path / "checkpoint.pt"
    train.save_checkpoint(path, {"w": torch.zeros(4)})
    before = path.read_bytes()
    for code, reason in ((errno.EROFS, "read-only"), (errno.ENOSPC, "no space is left"),
                         (errno.EACCES, "permission denied")):
        def fail(self, data, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(Path, "write_bytes", fail)
        with pytest.raises(train.RunWriteError, match=rf"cannot write '{re.escape(str(path))}': .*{reason}.*"
                                                      "its previous version is intact"):
            train.save_checkpoint(path, {"w": torch.ones(1000)})
        monkeypatch.undo()
        assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    # the real file-size limit, in a child process (ulimit -f)
    code = ("import resource, torch, sys; from pathlib import Path; from experiments import train\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            f"train.save_checkpoint(Path({str(path)!r}), {{'w': torch.ones(100000)}})\n")
    r = subprocess.run([sys.executable, "-c", code], env=env1(), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "file-size limit" in r.stderr and str(path) in r.stderr, r.stderr[-1000:]
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.slow
def test_kill_9_then_an_immediate_resume_is_not_refused(tmp_path):
    """The DataLoader worker that a kill -9 orphans must not hold the run's lock: a supervisor that restarts at
    once gets the run folder."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.train", "--config", CONFIG, *TINY, "epochs=3", "data.num_workers=1",
           "data.train_subset=3000", "data.test_subset=500", "batch_size=32", f"out_dir={out}"]
    proc = subprocess.Popen(cmd, env=env1(), cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2: its loader worker is running
    workers = [int(c) for f in Path(f"/proc/{proc.pid}/task").glob("*/children") for c in f.read_text().split()]
    assert workers, "the loader worker should be running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(Path(f"/proc/{w}").exists() for w in workers)  # the orphaned worker is still alive ...
    with train.hold_out_dir(out) as mine:  # ... and does not hold the lock
        assert mine


def test_sweep_file_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "sweep.yaml"
    for text, message in (("runs: {a: [1,\n", "is not valid YAML"), ("- 1\n", "must hold a mapping"),
                          ("runs: {a: 3}\n", "run 'a' must be a mapping of config keys, got 3"),
                          ("runs: {a: {grid: {lr: 3}}}\n", "run 'a': grid key 'lr' must be a non-empty list"),
                          ("runs: {a: {grid: [lr]}}\n", "run 'a': 'grid' must map config keys"),
                          ("seeds: 0\nruns: {a: {}}\n", "key 'seeds' must be a non-empty list of distinct integers"),
                          ("seeds: []\nruns: {a: {}}\n", "key 'seeds' must be a non-empty list"),
                          ("seeds: [0, 0]\nruns: {a: {}}\n", "key 'seeds' must be a non-empty list of distinct"),
                          ("runs: {../../x: {}}\n", r"run '../../x': a run's name is its folder's"),
                          ("runs: {1: {}}\n", "run 1: a run's name is its folder's"),
                          ("runs: {a: {seed: 3}}\n", r"run 'a': \['seed'\] are set by the sweep itself"),
                          ("runs: {a: {grid: {out_dir: [x, y]}}}\n", r"run 'a': \['out_dir'\] are set by the sweep"),
                          ("overrides: [seed=3]\nruns: {a: {}}\n", r"key 'overrides': \['seed=3'\] set what the sweep"),
                          ("overrides: epochs=1\nruns: {a: {}}\n", "key 'overrides' must be a list"),
                          ("runs: [a]\n", "key 'runs' must map run names"),
                          ("compare: a\nruns: {a: {}}\n", "key 'compare' must be a list of run names, got 'a'"),
                          ("compare: [b]\nruns: {a: {grid: {lr: [1, 2]}}}\n",
                           r"key 'compare': \['b'\] not among the runs \['a\[lr=1\]', 'a\[lr=2\]'\]"),
                          ("pairs: [a, b]\nruns: {a: {}, b: {}}\n",
                           r"key 'pairs' must be a list of \[run, reference\]"),
                          ("pairs: [[a, b, a]]\nruns: {a: {}, b: {}}\n", "key 'pairs' must be a list of"),
                          ("pairs: [[a, c]]\nruns: {a: {}, b: {}}\n",
                           r"key 'pairs': \['a', 'c'\] names \['c'\], not among the runs \['a', 'b'\]"),
                          ("pairs: [[a, a]]\nruns: {a: {}, b: {}}\n",
                           r"key 'pairs': \['a', 'a'\] pairs a run with itself"),
                          ("compares: [a]\nruns: {a: {}}\n", "unknown key 'compares'"),
                          # the second value would be the first run again, silently dropped
                          ("runs: {a: {grid: {lr: [0.1, 0.1]}}}\n",
                           r"run 'a': grid key 'lr' lists a value twice: \[0.1, 0.1\]"),
                          # a[n_iter=2] trains in a_n_iter2/, the folder of a run named a_n_iter2
                          ("runs: {a: {grid: {model_kwargs.n_iter: [2]}}, a_n_iter2: {}}\n",
                           r"runs 'a\[n_iter=2\]' and 'a_n_iter2' would train into one folder, 'a_n_iter2'"),
                          ("runs: {a: {lr: !!binary aGk=}}\n",
                           r"run 'a': config key 'lr' has a value that is not plain data .*: b'hi'"),
                          ("runs: {a: {grid: {lr: [!!set {1: null}]}}}\n",
                           r"run 'a': config key 'lr' has a value that is not plain data .*: \[?\{1\}")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=f"sweep file '{f}'.*{message}"):
            sweep.load_sweep(str(f))


def test_every_shipped_config_and_sweep_builds_its_models():
    """Each YAML in experiments/configs loads, and each of its models builds (meta device): a typo in a shipped
    config fails here, not hours into a sweep."""
    configs = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))
    sweeps = [c for c in configs if c.name.startswith("sweep_")]
    assert sweeps and len(configs) > len(sweeps)
    for path in configs:
        if path in sweeps:
            spec = sweep.load_sweep(str(path))
            for overrides in sweep.expand(spec).values():
                train.check_model(load_config(str(ROOT / spec["base"]), [*spec.get("overrides", []), *overrides]))
        else:
            train.check_model(load_config(str(path)))


def test_command_line_reports_config_errors():
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config", CONFIG, "lr_bsae=1"],
                         capture_output=True, text=True, env=env1(), cwd=ROOT)
    assert out.returncode == 2 and "unknown config key 'lr_bsae'" in out.stderr


def test_command_line_reports_model_and_checkpoint_errors_without_a_traceback(tmp_path):
    """A wrong model fails before any data is read or any folder made; a corrupt checkpoint names its file."""
    run = [sys.executable, "-m", "experiments.train", "--config", CONFIG, f"out_dir={tmp_path}"]
    out = subprocess.run([*run, "model=nomodel", f"out_dir={tmp_path / 'new'}"], capture_output=True, text=True,
                         env=env1(), cwd=ROOT)
    assert out.returncode == 2 and "unknown model 'nomodel'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "new").exists()
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    out = subprocess.run([*run, "--resume"], capture_output=True, text=True, env=env1(), cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"error: checkpoint '{tmp_path / 'checkpoint.pt'}' cannot be read" in out.stderr
    # a loss that leaves the finite range stops the run with one line, not a FloatingPointError traceback
    out = subprocess.run([*run[:-1], *TINY, "lr=1e6", "clip_grad=null", "epochs=1", "data.train_subset=256",
                          "data.test_subset=64", "batch_size=64", f"out_dir={tmp_path / 'nan'}"],
                         capture_output=True, text=True, env=env1(), cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.search(r"error: loss is (nan|inf) .* at epoch 0 step \d+; last good checkpoint: .*a lower lr", out.stderr)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_are_atomic_weights_only_and_errors_name_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train.save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    assert path.exists() and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(RuntimeError, match="lacks"):
        train.load_checkpoint(path)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(RuntimeError, match=f"checkpoint '{path}' cannot be read"):
        train.load_checkpoint(path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, path)  # an arbitrary pickle is refused, not executed
    with pytest.raises(RuntimeError, match="cannot be read"):
        train.load_checkpoint(path)


def tb_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_a_previous_run_is_kept_unless_overwritten_and_resume_trims_tensorboard(tmp_path, monkeypatch):
    cfg = load_config(CONFIG, [*TINY, "epochs=2", "data.train_subset=128", "data.test_subset=64", "batch_size=64",
                               f"out_dir={tmp_path}"])
    save = train.save_checkpoint
    with monkeypatch.context() as m:  # a kill between logging epoch 2 and checkpointing it
        m.setattr(train, "save_checkpoint", lambda path, payload: payload["epoch"] == 2 or save(path, payload))
        train.train(cfg)
    assert tb_steps(tmp_path, "test_top1") == [1, 2] and torch.load(tmp_path / "checkpoint.pt")["epoch"] == 1
    train.train(cfg, resume=True)  # epoch 2 again: TensorBoard keeps only the new one, as metrics.jsonl does
    assert tb_steps(tmp_path, "test_top1") == [1, 2] and [h["epoch"] for h in metrics(tmp_path)] == [1, 2]
    with pytest.raises(ConfigError, match=rf"config key 'out_dir': '{tmp_path}' holds a previous run "
                                          r"\(checkpoint.pt, summary.json\); continue it with --resume"):
        train.train(cfg)
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2  # untouched
    one = load_config(CONFIG, [*TINY, "epochs=1", "data.train_subset=128", "data.test_subset=64", "batch_size=64",
                               f"out_dir={tmp_path}"])
    train.train(one, overwrite=True)  # nothing of the old run is left to mix with the new one
    assert tb_steps(tmp_path, "test_top1") == [1] and len(metrics(tmp_path)) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 1


def test_out_dir_in_use_by_another_process_is_refused_and_orphans_are_cleaned(tmp_path, capsys):
    """Two trainings into one out_dir would overwrite each other's checkpoints: the second is refused, naming the
    folder, before it writes anything. Once the folder is free, a writer's temporary files that a kill left behind
    are deleted; other files stay."""
    import fcntl
    cfg = load_config(CONFIG, [*TINY, "epochs=1", "data.train_subset=128", "data.test_subset=64", "batch_size=64",
                               f"out_dir={tmp_path}"])
    with open(tmp_path / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # stands for another training process
        with pytest.raises(train.RunBusyError, match=rf"config key 'out_dir': '{tmp_path}' is in use by another "
                                                     r"training process"):
            train.train(cfg)
        with pytest.raises(SystemExit):
            train.main(["--config", CONFIG, *TINY, f"out_dir={tmp_path}"])
        assert "is in use by another training process" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    for name in ("checkpoint.pt.tmp4242", "summary.json.tmp7", "notes.tmp"):
        (tmp_path / name).write_text("x")
    train.train(cfg)
    left = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint.pt", "summary.json", "notes.tmp"} <= left and not any(".tmp4242" in n or ".tmp7" in n
                                                                             for n in left)
    with train.hold_out_dir(tmp_path) as mine:  # re-entrant in one process: a sweep holds it, then trains
        assert mine
        with train.hold_out_dir(tmp_path) as again:
            assert again
        train.train(cfg, resume=True)
        with open(tmp_path / ".lock", "a") as other:  # still held after the nested exits
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.slow
def test_a_signal_during_the_last_evaluation_is_delivered_after_the_summary(tmp_path, monkeypatch):
    """The run is complete, so it is summarised; then the signal goes on to the caller's handler (a sweep's, a
    scheduler job's), which would otherwise never see it."""
    evaluate = train.evaluate

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args)

    monkeypatch.setattr(train, "evaluate", interrupted)
    cfg = load_config(CONFIG, [*TINY, "epochs=1", "data.train_subset=128", "data.test_subset=64", "batch_size=64",
                               f"out_dir={tmp_path}"])
    caught = []
    caller = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        summary = train.train(cfg)
    finally:
        signal.signal(signal.SIGTERM, caller)
    assert caught == [signal.SIGTERM] and summary["epochs"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path):
    cfg = load_config(CONFIG, [*TINY, "epochs=1", "data.train_subset=256", "data.test_subset=128",
                               "batch_size=64", f"out_dir={tmp_path}"])
    train.train(cfg)
    other = load_config(CONFIG, [*TINY, "epochs=1", "data.train_subset=256", "data.test_subset=128",
                                 "batch_size=32", f"out_dir={tmp_path}"])
    with pytest.raises(RuntimeError, match=r"different configuration \(batch_size: 64 -> 32\)"):
        train.train(other, resume=True)
    # epochs is not part of the configuration check, but the LR schedule's length is
    longer = load_config(CONFIG, [*TINY, "epochs=2", "data.train_subset=256", "data.test_subset=128",
                                  "batch_size=64", f"out_dir={tmp_path}"])
    with pytest.raises(RuntimeError, match=r"different LR schedule \(epochs=1; this config has epochs=2"):
        train.train(longer, resume=True)
    path = tmp_path / "checkpoint.pt"
    good = torch.load(path, weights_only=True)
    train.save_checkpoint(path, {**good, "world_size": 2})
    with pytest.raises(RuntimeError, match=f"checkpoint '{path}' was written by 2 processes"):
        train.train(cfg, resume=True)
    train.save_checkpoint(path, {**good, "model": {k: v for k, v in list(good["model"].items())[1:]}})
    with pytest.raises(RuntimeError, match=f"checkpoint '{path}' does not fit model 'vmixer_t4_28'"):
        train.train(cfg, resume=True)
    train.save_checkpoint(path, {**good, "ranks": []})
    with pytest.raises(CheckpointError, match=f"checkpoint '{path}' has a damaged training state"):
        train.train(cfg, resume=True)
    train.save_checkpoint(path, {**good, "scheduler": [1]})
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}': \['scheduler'\] are not mappings"):
        train.train(cfg, resume=True)
    # a metrics line cut short by a kill is dropped on resume; the finished run is summarised again
    train.save_checkpoint(path, good)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr"')
    assert train.train(cfg, resume=True)["epochs"] == 1 and len(metrics(tmp_path)) == 1
    # a damaged line before the last is an error naming the file and the line, and the file is left as it was
    damaged = "[1, 2]\n" + (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(damaged)
    with pytest.raises(train.RunFileError, match=r"metrics.jsonl:1: expected a JSON object per line, got list"):
        train.train(cfg, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == damaged


@pytest.mark.slow
def test_recipe_lr_scaling_schedule_mixup_clipping_and_penalty(tmp_path):
    """lr = lr_base * global batch / lr_base_size, a cosine schedule stepped per update and then a cooldown at
    min_lr; mixup/cutmix (soft targets: no running accuracy) with gradient clipping; the parallelized Mixer's
    lam * ||W2||^2 is part of the loss that is minimised."""
    common = [*TINY, "model=paramixer_t4_28", "epochs=2", "cooldown_epochs=1", "min_lr=1e-6", "data.train_subset=256",
              "data.test_subset=64", "batch_size=32", "mixup=0.8", "cutmix=1.0", "clip_grad=0.5"]
    runs = {}
    for lam in (0.0, 1.0):
        out = tmp_path / f"lam{lam}"
        cfg = load_config(CONFIG, [*common, f"model_kwargs={{embed_dim: 32, num_blocks: 2, form: broken, lam: {lam}}}",
                                   "lr=null", "lr_base=4e-2", "lr_base_size=256", f"out_dir={out}"])
        train.train(cfg)
        lr, m = 4e-2 * 32 / 256, metrics(out)
        assert [h["lr"] for h in m] == pytest.approx([1e-6 + 0.5 * (lr - 1e-6), 1e-6, 1e-6], rel=1e-12)
        assert all(h["train_top1"] is None and math.isfinite(h["train_loss"]) for h in m)
        assert (m[0]["train_loss"] > 10) == (lam > 0)  # the logged loss holds lam ||W2||^2 (about 100 at first)
        state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        runs[lam] = sum(v.square().sum().item() for k, v in state.items() if k.endswith("fc2.weight"))
    assert runs[1.0] < 0.7 * runs[0.0], runs


def test_weight_decay_exemptions_and_the_symmetry_index_every_epoch(tmp_path):
    """no_weight_decay exempts the named parameters (here the symmetry-breaking matrices and the 2-D LayerNorm
    affine, which timm's 1-D rule decays) on top of timm's exemptions; a pattern that matches nothing is a config
    error. The weight-symmetry index is logged after every epoch and stored at initialisation: started at the
    tied point (tied_init), an untied parallelized Mixer has corr 1 there."""
    kw = "model_kwargs={embed_dim: 32, num_blocks: 2, form: broken}"
    cfg = load_config(CONFIG, [*TINY, "model=derived_paramixer_t4_28", kw,
                               "no_weight_decay=['*.weight_break', '*.affine.*']"])
    train.check_model(cfg)
    model = train.build_model(cfg, 10, 1, 28)
    groups = train.param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {n for n in names.values() if n.endswith("weight_break") or ".affine." in n} <= no_decay
    assert "blocks.0.net.synapses.0.weight" in decay and not any(n.endswith("weight_break") for n in decay)
    plain = train.param_groups(model, load_config(CONFIG, [*TINY, "model=derived_paramixer_t4_28", kw]))
    assert any(names[id(p)].endswith("affine.weight") for g in plain if g["weight_decay"] > 0 for p in g["params"])
    with pytest.raises(ConfigError, match=r"no_weight_decay.*match no parameter"):
        train.check_model(load_config(CONFIG, [*TINY, "no_weight_decay=['*.nonexistent']"]))
    with pytest.raises(ConfigError, match="no_weight_decay"):
        load_config(CONFIG, [*TINY, "no_weight_decay=weight_break"])

    out = tmp_path / "tied"
    train.train(load_config(CONFIG, [*TINY, "model=paramixer_t4_28", "epochs=2", "data.train_subset=128",
                                     "data.test_subset=64", "batch_size=32", f"out_dir={out}",
                                     "model_kwargs={embed_dim: 32, num_blocks: 2, tied_init: true}"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["symmetry_init"]["sym_corr_tokens"] == pytest.approx(1.0, abs=1e-6)
    m = metrics(out)
    assert all({"sym_corr_tokens", "sym_corr_channels", "sym_corr_b1_channels"} <= set(h) for h in m)
    assert m[-1]["sym_corr_tokens"] < 1 - 1e-6  # training moved it off the tied point


def test_bf16_autocast_trains_a_derived_imixer_on_cpu(tmp_path, monkeypatch):
    """amp=bf16 runs the recipe's mixed precision on any device; the spectral-norm state stays float32; a CPU
    without bf16 kernels gets a warning naming the config key."""
    cfg = load_config(CONFIG, [*TINY, "model=derived_imixer_t4_28", "model_kwargs={embed_dim: 32, num_blocks: 2, "
                               "h_ratio: 2, n_iter: 2}", "epochs=1", "data.train_subset=256",
                               "data.test_subset=128", "batch_size=64", "amp=bf16", f"out_dir={tmp_path}"])
    for module in (build, runs):  # the run's device warning, and the environment the summary records
        monkeypatch.setattr(module, "cpu_has_bf16_kernels", lambda: False)
    with pytest.warns(RuntimeWarning, match="config key 'amp' is 'bf16'.*no oneDNN bf16 kernels"):
        summary = train.train(cfg)
    assert summary["precision"] == "bf16 autocast" and summary["last_top1"] is not None
    # what produced it: versions, hardware, threads, and this checkout's commit
    env = json.loads((tmp_path / "summary.json").read_text())["env"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads() and env["hardware"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu_bf16_kernels"] is False
    head = subprocess.run(["git", "-C", str(Path(train.__file__).parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(env["git_dirty"], bool) or env["git_commit"] is None
    (m,) = metrics(tmp_path)
    assert all(map(math.isfinite, (m["train_loss"], m["test_loss"])))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    sigmas = [v for k, v in state.items() if k.endswith("weight_sigma")]
    assert sigmas and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sigmas)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    """SIGTERM to the whole process group (main process and loader worker, as Ctrl-C or a scheduler does) part-way
    through, --resume, and the run ends exactly where an uninterrupted one does."""
    args = [*TINY, "epochs=3", "data.train_subset=3000", "data.test_subset=500", "batch_size=32",
            "data.crop_pad=2", "data.num_workers=1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.train", "--config", CONFIG, *args]
    subprocess.run([*cmd, f"out_dir={full}"], check=True, env=env1(), cwd=ROOT, capture_output=True)

    proc = subprocess.Popen([*cmd, f"out_dir={killed}"], env=env1(), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:  # after epoch 1
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    workers = [int(c) for f in Path(f"/proc/{proc.pid}/task").glob("*/children") for c in f.read_text().split()]
    assert workers, "the loader worker should be running"
    for pid in workers:  # the worker first, so that its death (if it dies) reaches the main process mid-epoch
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by signal" in err, err
    assert not (killed / "summary.json").exists()
    subprocess.run([*cmd, f"out_dir={killed}", "--resume"], check=True, env=env1(), cwd=ROOT, capture_output=True)

    a, b = metrics(full), metrics(killed)
    assert [m["epoch"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        assert ma["test_top1"] == mb["test_top1"]
        assert abs(ma["test_loss"] - mb["test_loss"]) < 1e-9 and abs(ma["train_loss"] - mb["train_loss"]) < 1e-9
        assert ma["train_top1"] == mb["train_top1"]
        # images/s and epoch time cover the whole epoch, both parts of the interrupted one (not the fast-forward)
        images = ma["images_per_s"] * ma["epoch_time_s"]
        assert images == pytest.approx(mb["images_per_s"] * mb["epoch_time_s"], rel=1e-9) and images >= 2900
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert sa["last_top1"] == sb["last_top1"] and sa["best_top1"] == sb["best_top1"]


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_the_timed_checkpoint_to_the_same_metrics(tmp_path):
    """SIGKILL cannot be caught: with checkpoint_minutes the run still has a recent mid-epoch checkpoint, and
    --resume from it ends exactly where an uninterrupted run without timed checkpoints does."""
    args = [*TINY, "epochs=2", "data.train_subset=3000", "data.test_subset=500", "batch_size=32",
            "data.crop_pad=2", "data.num_workers=1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.train", "--config", CONFIG, *args]
    subprocess.run([*cmd, f"out_dir={full}"], check=True, env=env1(), cwd=ROOT, capture_output=True)

    timed = [*cmd, f"out_dir={killed}", "checkpoint_minutes=0.002"]  # every 0.12 s
    proc = subprocess.Popen(timed, env=env1(), cwd=ROOT, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, ckpt = time.time() + 120, {}
    while not (ckpt.get("epoch") == 1 and ckpt.get("step", 0) > 10) and time.time() < deadline:
        time.sleep(0.05)
        if (killed / "checkpoint.pt").exists():  # renamed into place whole: never half written
            ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["step"] < 94 and not (killed / "summary.json").exists(), ckpt["step"]
    subprocess.run([*timed, "--resume"], check=True, env=env1(), cwd=ROOT, capture_output=True)

    a, b = metrics(full), metrics(killed)
    assert [m["epoch"] for m in b] == [1, 2]
    for ma, mb in zip(a, b):
        assert ma["test_top1"] == mb["test_top1"] and ma["train_top1"] == mb["train_top1"]
        assert abs(ma["test_loss"] - mb["test_loss"]) < 1e-9 and abs(ma["train_loss"] - mb["train_loss"]) < 1e-9
    assert mb["images_per_s"] * mb["epoch_time_s"] == pytest.approx(3000, abs=32)


# ------------------------------------------------------------------------------------------ distributed
@pytest.mark.slow
def test_ddp_two_processes_gloo_match_single_process(tmp_path):
    """torchrun, 2 CPU processes (gloo): identical weights on both, metrics close to one process with the same
    global batch (the data order differs, so only within tolerance). The learning rate scales with the global
    batch (2 x 32), not the per-process one: both runs get lr_base * 64 / lr_base_size = 3e-3."""
    common = [*TINY, "epochs=2", "data.train_subset=4000", "data.test_subset=1000", "lr=null", "lr_base=3e-3",
              "lr_base_size=64"]
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "experiments.train",
                    "--config", CONFIG, *common, "batch_size=32", f"out_dir={tmp_path / 'ddp'}"],
                   check=True, env=env1(), cwd=ROOT, capture_output=True)
    single = train.train(load_config(CONFIG, [*common, "batch_size=64", f"out_dir={tmp_path / 'one'}"]))
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["ranks_identical"]
    assert abs(ddp["last_top1"] - single["last_top1"]) <= 6.0, (ddp, single)
    m_ddp, m_one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert abs(m_ddp[-1]["test_loss"] - m_one[-1]["test_loss"]) <= 0.1 * m_one[-1]["test_loss"]
    assert [h["lr"] for h in m_ddp] == pytest.approx([h["lr"] for h in m_one], rel=1e-12)
    # halfway down the cosine from 3e-3 to min_lr 1e-5 (scaled by the per-process batch it would be 7.6e-4)
    assert m_one[0]["lr"] == pytest.approx(1e-5 + 0.5 * (3e-3 - 1e-5), rel=1e-12)


@pytest.mark.slow
def test_ddp_signal_to_one_process_stops_both_and_resumes_exactly(tmp_path):
    """SIGTERM to rank 1 alone, mid-epoch: both processes stop at the same step (rank 0 writes the checkpoint, with
    each rank's RNG state), and the resumed 2-process run ends exactly where an uninterrupted one does. The
    interrupted run also writes timed mid-epoch checkpoints (a collective at a step both ranks agree on), which
    must not change its course."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "experiments.train", "--config", CONFIG,
           *TINY, "epochs=3", "data.train_subset=3000", "data.test_subset=500", "batch_size=32", "data.crop_pad=2",
           "drop_path=0.1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([*cmd, f"out_dir={full}"], check=True, env=env1(), cwd=ROOT, capture_output=True)
    timed = [*cmd, f"out_dir={killed}", "checkpoint_minutes=0.002"]  # every 0.12 s
    proc = subprocess.Popen(timed, env=env1(), cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        log, timed_steps = killed / "metrics.jsonl", set()
        while not (log.exists() and log.read_text().strip()) and time.time() < deadline:  # after epoch 1
            time.sleep(0.05)
            if (killed / "checkpoint.pt").exists():
                timed_steps.add(torch.load(killed / "checkpoint.pt", weights_only=True)["step"])
        assert timed_steps - {0}, "no mid-epoch checkpoint was written in epoch 1"
        time.sleep(0.3)  # into epoch 2
        rank1 = [pid for pid in _descendants(proc.pid) if b"\0RANK=1\0" in b"\0" + _environ(pid)]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # without the shared stop flag, rank 0 waits forever
    finally:
        if proc.poll() is None:
            for pid in [*_descendants(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0 and "stopped by a signal to another process" in err, err
    stopped_at = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert "ranks" in stopped_at and stopped_at["epoch"] >= 1 and stopped_at["step"] > 0
    subprocess.run([*timed, "--resume"], check=True, env=env1(), cwd=ROOT, capture_output=True)
    a, b = metrics(full), metrics(killed)
    assert [m["epoch"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        assert (ma["test_top1"], ma["train_top1"]) == (mb["test_top1"], mb["train_top1"])
        assert abs(ma["test_loss"] - mb["test_loss"]) < 1e-9 and abs(ma["train_loss"] - mb["train_loss"]) < 1e-9


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (torchrun's workers live in their own sessions, so a process group misses them)."""
    children = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except (OSError, ValueError):
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_end_to_end_fashion_mnist_subset_beats_75_percent(tmp_path):
    """A derived iMixer on 6,000 real Fashion-MNIST images, 4 epochs: >= 75% on 1,000 test images (it reaches
    about 80%; chance is 10%)."""
    cfg = load_config(CONFIG, ["model=derived_imixer_t4_28", "model_kwargs={embed_dim: 64, num_blocks: 2}",
                               "data.num_workers=0", "progress=false", "epochs=4", "warmup_epochs=0", "lr=2e-3",
                               "smoothing=0.0", "data.crop_pad=0", "data.hflip=0.0", "data.train_subset=6000",
                               "data.test_subset=1000", "batch_size=32", f"out_dir={tmp_path}"])
    summary = train.train(cfg)
    assert summary["last_top1"] >= 75.0, summary
    files = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl", "metrics.csv", "summary.json", "config.yaml", "tb"} <= files
    assert len(metrics(tmp_path)) == 4 and summary["params"] > 0 and summary["images_per_s"] > 0
    assert summary["images_per_s"] == pytest.approx(statistics.median(m["images_per_s"] for m in metrics(tmp_path)))


def test_sweep_expands_grids_and_tables_mean_std(tmp_path):
    spec = {"base": CONFIG, "out_dir": str(tmp_path), "seeds": [0, 1], "compare": ["mixer"],
            "runs": {"mixer": {"model": "vmixer_t4_28"},
                     "imixer": {"model": "imixer_t4_28", "model_kwargs": {"h_ratio": 2},
                                "grid": {"model_kwargs.n_iter": [1, 2, 4]}}}}
    runs = sweep.expand(spec)
    assert list(runs) == ["mixer", "imixer[n_iter=1]", "imixer[n_iter=2]", "imixer[n_iter=4]"]
    assert "model_kwargs.h_ratio=2" in runs["imixer[n_iter=4]"] and "model_kwargs.n_iter=4" in runs["imixer[n_iter=4]"]

    def finished(name, seed, best, last, params, ips):
        d = sweep._run_dir(tmp_path, name, seed)
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"best_top1": best, "last_top1": last, "params": params,
                                                    "images_per_s": ips}))

    finished("mixer", 0, 90.0, 89.0, 1000, 500.0)
    finished("mixer", 1, 92.0, 91.0, 1000, 400.0)  # the mean of its epochs, one of them slowed down:
    (sweep._run_dir(tmp_path, "mixer", 1) / "metrics.jsonl").write_text(  # the table takes their median
        "".join(json.dumps({"epoch": k + 1, "images_per_s": v}) + "\n" for k, v in enumerate([550.0, 100.0, 550.0])))
    finished("imixer[n_iter=1]", 0, 90.0, 90.0, 2000, 300.0)
    finished("imixer[n_iter=1]", 1, 91.0, 90.5, 2000, 300.0)
    finished("imixer[n_iter=4]", 1, 93.0, 92.5, 2000, 300.0)
    summary = sweep._run_dir(tmp_path, "imixer[n_iter=4]", 1) / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "env": {
        "hardware": "Intel Xeon", "cpu_capability": "AMX", "cpu_bf16_kernels": True, "torch": "2.14.1"}}))
    md = sweep.run_sweep(spec, table_only=True)
    # machines: A (no env recorded) for all but imixer[n_iter=4], which ran on B
    assert "| mixer | 2 | 91.00 ± 1.41 | 90.00 ± 1.41 | 1,000 | 525 | A A |" in md  # (500 + 550) / 2
    assert "| imixer[n_iter=4] | 1 | 93.00 | 92.50 | 2,000 | 300 | B |" in md  # one seed: no spread to show
    assert "Machines: A = ?, torch ?; B = Intel Xeon, AMX, bf16 kernels, torch 2.14.1." in md
    assert "| imixer[n_iter=2] | 0 |" in md and (tmp_path / "results.md").read_text() == md + "\n"
    # paired by seed: n_iter=1 is +1.0 on seed 0 and -0.5 on seed 1 (unpaired means would give +0.25 too, but
    # the spread of the differences, 1.06, is not the 1.41 of either run's seeds); n_iter=4 pairs with seed 1
    # 95 % CI of the mean difference: +0.25 +- t(0.975, 1 dof) 12.706 * 1.0607 / sqrt(2) = +0.25 +- 9.53
    # TOST within +-0.5: se = 0.75, p = max(t_1.sf(0.75 / 0.75), t_1.cdf(-0.25 / 0.75)) = max(0.25, 0.398)
    assert ("| model | seeds paired | last top-1 − mixer (points) | 95 % CI | ahead on | TOST ±0.5 p | same machine |"
            in md)
    assert "| imixer[n_iter=1] | 2 | +0.25 ± 1.06 | [-9.28, +9.78] | 1 of 2 | 0.398 | 2 of 2 |" in md
    assert "| imixer[n_iter=4] | 1 | +1.50 | – | 1 of 1 | – | 0 of 1 |" in md
    assert "| imixer[n_iter=2] | 0 | – | – | – | – | – |" in md and "| mixer | 2 | +" not in md
    assert "Every row pairs with the same mixer run of each seed" in md
    # pairs: only the named contrasts, labelled run − reference; a reference of several rows is named as shared
    pairs = reports.paired_differences(sweep._summaries(tmp_path, runs, [0, 1]), [
        ["imixer[n_iter=1]", "mixer"], ["imixer[n_iter=4]", "mixer"], ["imixer[n_iter=4]", "imixer[n_iter=1]"],
        ["imixer[n_iter=2]", "mixer"]])
    assert pairs.splitlines()[2:6] == [
        "| imixer[n_iter=1] − mixer | 2 | +0.25 ± 1.06 | [-9.28, +9.78] | 1 of 2 | 0.398 | 2 of 2 |",
        "| imixer[n_iter=4] − mixer | 1 | +1.50 | – | 1 of 1 | – | 0 of 1 |",
        "| imixer[n_iter=4] − imixer[n_iter=1] | 1 | +2.00 | – | 1 of 1 | – | 0 of 1 |",
        "| imixer[n_iter=2] − mixer | 0 | – | – | – | – | – |"]
    assert pairs.endswith("not independent of each other: mixer (3 rows).")
    # a sweep's pairs: their paired differences, then the same pairs seed by seed (run / reference)
    assert sweep.run_sweep({**spec, "pairs": [["imixer[n_iter=1]", "mixer"]]}, table_only=True).endswith(
        "| imixer[n_iter=1] − mixer | 2 | +0.25 ± 1.06 | [-9.28, +9.78] | 1 of 2 | 0.398 | 2 of 2 |\n\n"
        "| run / reference | measure | seed 0 | seed 1 |\n|---|---|---|---|\n"
        "| imixer[n_iter=1] / mixer | last top-1 (%) | 90.00 / 89.00 | 90.50 / 91.00 |")
    # with the runs' analysis.json recording rank_collapse (ViT runs), the last block's uniformity joins the rows
    for name, seed, cos in [("mixer", 0, 0.5), ("mixer", 1, 0.25), ("imixer[n_iter=1]", 0, 0.75),
                            ("imixer[n_iter=1]", 1, 1.0)]:
        (sweep._run_dir(tmp_path, name, seed) / "analysis.json").write_text(json.dumps(
            {"rank_collapse": {"layer": [0, 1], "cosine": [0.1, cos], "residual": [0.9, 1e-7 if cos == 1 else 0.5]}}))
    assert sweep.run_sweep({**spec, "pairs": [["imixer[n_iter=1]", "mixer"]]}, table_only=True).endswith(
        "| imixer[n_iter=1] / mixer | last-block cosine | 0.750 / 0.500 | 1.000 / 0.250 |\n"
        "| imixer[n_iter=1] / mixer | last-block ‖X − 1xᵀ‖/‖X‖ | 0.5 / 0.5 | 1e-07 / 0.5 |")
    (sweep._run_dir(tmp_path, "mixer", 0) / "analysis.json").write_text('{"rank_collapse": ')  # cut short: named
    with pytest.raises(RunFileError, match=r"mixer/seed0/analysis\.json: not a JSON object"):
        sweep.run_sweep(spec, table_only=True)
    assert reports.tost([0.1, 0.2, 0.15], 0.5) < 0.01 and reports.tost([1.0, 1.2, 1.1], 0.5) > 0.5
    with pytest.raises(ConfigError, match="not in this sweep"):
        sweep.run_sweep(spec, only=["nope"])
    with pytest.raises(ConfigError, match=r"--seeds \[7\]: not in this sweep's seeds \[0, 1\]"):
        sweep.run_sweep(spec, seeds=[7])
    # a damaged summary.json is named, on the command line without a traceback
    summary = sweep._run_dir(tmp_path, "mixer", 0) / "summary.json"
    summary.write_text('{"best_top1": 9')
    with pytest.raises(RunFileError, match=f"{summary}: not a JSON object"):
        sweep.run_sweep(spec, table_only=True)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match=f"error: {summary}: not a JSON object"):
        sweep.main(["--sweep", str(sweep_file), "--table-only"])


def test_sweep_tables_name_the_precision_where_runs_differ_in_it():
    """Runs of one machine in bf16 autocast and in float32 get two machine letters, and a pair of them does not
    count as run on the same machine; runs of one precision keep the plain machine description."""
    env = {"hardware": "AMD EPYC", "cpu_capability": "AVX2", "torch": "2.14.1"}

    def row(seed, last, precision):
        return {"seed": seed, "best_top1": last, "last_top1": last, "params": 10, "images_per_s": 1.0, "env": env,
                "precision": precision}

    summaries = {"a": [row(0, 80.0, "bf16 autocast"), row(1, 81.0, "float32")],
                 "b": [row(0, 79.0, "bf16 autocast"), row(1, 80.0, "bf16 autocast")]}
    md = reports.table(summaries)
    assert "| a | 2 | 80.50 ± 0.71 | 80.50 ± 0.71 | 10 | 1 | A B |" in md and "| b | 2 |" in md and "| A A |" in md
    assert md.endswith("Machines: A = AMD EPYC, AVX2, torch 2.14.1, bf16 autocast; "
                       "B = AMD EPYC, AVX2, torch 2.14.1, float32.")
    # the same difference on both seeds: no spread, so the CI is that difference (not NaN) and TOST's p is 1
    # outside the margin
    assert "| a − b | 2 | +1.00 ± 0.00 | [+1.00, +1.00] | 2 of 2 | 1.000 | 1 of 2 |" in reports.paired_differences(
        summaries, [["a", "b"]])
    summaries["a"][1]["precision"] = "bf16 autocast"
    assert reports.table(summaries).endswith("Machines: A = AMD EPYC, AVX2, torch 2.14.1.")
    assert "| 2 of 2 | 1.000 | 2 of 2 |" in reports.paired_differences(summaries, [["a", "b"]])


def test_sweep_status_counts_epochs_and_hours_left(tmp_path, capsys, monkeypatch):
    spec = {"base": CONFIG, "out_dir": str(tmp_path), "seeds": [0, 1, 2], "overrides": ["epochs=4", "amp=off"],
            "runs": {"a": {}, "b": {"lr": 1e-3}}}
    # seed 0, logged a day ago on a busier machine, took 2 hours an epoch; seed 1, logged last, takes an hour an
    # epoch, but its second epoch was paused for 3 hours: the median epoch of the seed logged last, 1 hour, counts
    for seed, walls in ((0, [7200.0, 14400.0, 21600.0, 28800.0]), (1, [3600.0, 18000.0, 21600.0])):
        d = tmp_path / "a" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": k + 1, "test_top1": 80.0 + k, "wall_s": w}) + "\n"
                                                for k, w in enumerate(walls)))
        os.utime(d / "metrics.jsonl", (time.time() - 86400 * (1 - seed),) * 2)
    other = {"hardware": "Other CPU", "cpu_capability": "AVX512", "cpu_bf16_kernels": True, "torch": "9.9"}
    (tmp_path / "a" / "seed0" / "summary.json").write_text(json.dumps({"env": other}))
    for seed, minutes in ((0, 1), (1, 10)):  # a finished run's checkpoint is not reported
        ckpt = tmp_path / "a" / f"seed{seed}" / "checkpoint.pt"
        ckpt.write_bytes(b"")
        os.utime(ckpt, (time.time() - 60 * minutes,) * 2)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    md = sweep.main(["--sweep", str(tmp_path / "s.yaml"), "--status"])
    assert md in capsys.readouterr().out
    assert "| a | 0 | 4 of 4 | 83.00 | – | – |" in md
    assert "| a | 1 | 3 of 4 | 82.00 | 1.0 | 10 min ago |" in md and "| a | 2 | 0 of 4 | – | 4.0 | – |" in md
    assert "| b | 2 | 0 of 4 | – | ? | – |" in md
    assert ("\n5.0 hours of training left, plus 3 runs of unmeasured speed (one process's hours: several processes "
            "share them)\n") in md
    # the hours are the speeds of the machine the runs ran on; where that is not this one, the status says so
    here = reports.machine({"env": runs.environment("cuda" if torch.cuda.is_available() else "cpu")})
    assert md.endswith(f"Finished runs ran on: Other CPU, AVX512, bf16 kernels, torch 9.9 (1 run). This machine: "
                       f"{here}, which none of them ran on: the hours above are their speeds, not this machine's.")
    assert "amp=bf16" not in md
    (tmp_path / "a" / "seed0" / "summary.json").write_text(json.dumps({"env": runs.environment()}))
    assert sweep.status(spec).endswith(f"Finished runs ran on: {here} (1 run). This machine: {here}.")
    # a run killed after logging its last epoch, before its summary: counted done, no machine to read
    (tmp_path / "b" / "seed0").mkdir(parents=True)
    (tmp_path / "b" / "seed0" / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": k + 1, "test_top1": 70.0, "wall_s": 60.0 * (k + 1)}) + "\n" for k in range(4)))
    assert "| b | 0 | 4 of 4 | 70.00 | – | – |" in sweep.status(spec)
    # bf16 autocast asked for on a CPU without bf16 kernels: a warning that the hours do not hold
    spec["runs"]["b"]["amp"] = "bf16"
    monkeypatch.setattr(sweep, "cpu_has_bf16_kernels", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "\nwarning: the sweep asks for amp=bf16, and this CPU has no oneDNN bf16 kernels" in sweep.status(spec)
    monkeypatch.setattr(sweep, "cpu_has_bf16_kernels", lambda: True)
    assert "warning" not in sweep.status(spec)
    with pytest.raises(SystemExit):
        sweep.main(["--sweep", str(tmp_path / "s.yaml"), "--status", "--table-only"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_sweep_processes_share_runs_through_locks(tmp_path, capsys, monkeypatch):
    """A run another process has claimed (its flock held) is skipped; a free one is trained; the lock is released
    afterwards, so the skipped run can be claimed later."""
    import fcntl
    spec = {"base": CONFIG, "out_dir": str(tmp_path), "seeds": [0, 1],
            "overrides": [*TINY, "epochs=1", "data.train_subset=200", "data.test_subset=100", "batch_size=50",
                          "data.crop_pad=0", "data.hflip=0.0"],
            "runs": {"busy": {}, "free": {}}}
    (tmp_path / "busy" / "seed0").mkdir(parents=True)
    with open(tmp_path / "busy" / "seed0" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # stands for another sweep process
        md = sweep.run_sweep(spec, seeds=[0])  # seed 1 is left for later
        assert "busy seed 0: another process is training it, skipped" in capsys.readouterr().out
    assert not (tmp_path / "busy" / "seed0" / "checkpoint.pt").exists()
    assert (tmp_path / "free" / "seed0" / "summary.json").exists()
    assert not (tmp_path / "free" / "seed1").exists()
    assert "| busy | 0 |" in md and "| free | 1 |" in md
    with open(tmp_path / "free" / "seed0" / ".lock", "a") as free:  # released when the run ended
        fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # analysed the moment it finished, while its checkpoint is there (sweep folders are kept without it)
    free = tmp_path / "free" / "seed0"
    record = json.loads((free / "analysis.json").read_text())
    assert record["images"] == analyze.IMAGES and record["model"]["block"] == "mixer"
    assert len(record["symmetry"]) == 4  # 2 blocks x (tokens, channels)
    # a process killed between a run's end and its analysis: the next sweep analyses it without training again
    (free / "analysis.json").unlink()
    metrics = (free / "metrics.jsonl").read_text()
    sweep.run_sweep(spec, only=["free"], seeds=[0])
    assert json.loads((free / "analysis.json").read_text()) == record
    assert (free / "metrics.jsonl").read_text() == metrics
    # an analysis that fails is reported, and the checkpoint it needs is kept for experiments.analyze to retry
    (free / "analysis.json").unlink()
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(sweep, "run_record", lambda run, images: 1 / 0)
        sweep.run_sweep(spec, only=["free"], seeds=[0])
    err = capsys.readouterr().err
    assert f"warning: {free}: analysis failed (ZeroDivisionError" in err and "experiments.analyze --runs" in err
    assert (free / "checkpoint.pt").exists() and not (free / "analysis.json").exists()
    # an edited sweep file does not reuse the finished run under the new settings, in training or table mode
    spec["runs"]["free"] = {"lr": 1e-4, "model_kwargs": {"embed_dim": 16}}
    for table_only in (False, True):
        with pytest.raises(ConfigError, match=r"free/seed0: lr: 0\.002 -> 0\.0001; model_kwargs: .*embed_dim"):
            sweep.run_sweep(spec, seeds=[1], table_only=table_only)
    assert not (tmp_path / "busy" / "seed1").exists()


def test_carry_sweep_stages_unfinished_checkpoints_only(tmp_path):
    """scripts/carry_sweep.sh: the checkpoint of an unfinished run is staged (git ignores checkpoints), that of a
    finished run is not, one still training (its flock held) is refused by name, and a carried checkpoint is
    unstaged once its run has finished."""
    import fcntl

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    def carry():
        return subprocess.run(["bash", str(ROOT / "scripts" / "carry_sweep.sh"), "sweep"], cwd=tmp_path,
                              capture_output=True, text=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("checkpoint.pt\n.lock\n")
    for run, done in (("a", False), ("b", True)):
        d = tmp_path / "sweep" / run / "seed0"
        d.mkdir(parents=True)
        for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl"):
            (d / name).write_text(f"{run} {name}\n")
        if done:
            (d / "summary.json").write_text("{}")
    with open(tmp_path / "sweep" / "a" / "seed0" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # stands for the process training it
        r = carry()
    assert r.returncode == 1 and "'sweep/a/seed0' is still training" in r.stderr
    assert git("diff", "--cached", "--name-only") == ""
    r = carry()
    assert r.returncode == 0, r.stderr
    assert "staged sweep/a/seed0 (1 epochs logged)" in r.stdout
    assert git("diff", "--cached", "--name-only").split() == [
        "sweep/a/seed0/checkpoint.pt", "sweep/a/seed0/config.yaml", "sweep/a/seed0/metrics.jsonl"]
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "carry a")
    (tmp_path / "sweep" / "a" / "seed0" / "summary.json").write_text("{}")
    r = carry()
    assert r.returncode == 0 and "unstaged sweep/a/seed0/checkpoint.pt" in r.stdout
    assert git("diff", "--cached", "--name-status").split() == ["D", "sweep/a/seed0/checkpoint.pt"]
    assert (tmp_path / "sweep" / "a" / "seed0" / "checkpoint.pt").exists()  # kept on disk for the analysis
    r = subprocess.run(["bash", str(ROOT / "scripts" / "carry_sweep.sh"), "nope"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no sweep folder 'nope'" in r.stderr


@pytest.mark.slow
def test_analyze_makes_figures_and_tables_from_finished_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, model, kw in (("imixer", "derived_imixer_t4_28", "{embed_dim: 16, num_blocks: 2, n_iter: 3}"),
                            ("sym", "paramixer_t4_28", "{embed_dim: 16, num_blocks: 2, form: symmetric}"),
                            ("broken", "derived_paramixer_t4_28", "{embed_dim: 16, num_blocks: 2, form: broken, "
                                                                  "lam: 0.001}")):
        train.train(load_config(CONFIG, ["data.num_workers=0", "progress=false", "epochs=1", "warmup_epochs=0",
                                         "data.train_subset=512", "data.test_subset=64", "batch_size=64",
                                         f"model={model}", f"model_kwargs={kw}", f"out_dir={runs / name}"]))
    for seed in (0, 1):  # a ViT run with two seeds: its rank-collapse rows are grouped
        train.train(load_config(CONFIG, ["data.num_workers=0", "progress=false", "epochs=1", "warmup_epochs=0",
                                         "data.train_subset=256", "data.test_subset=64", "batch_size=64",
                                         "model=mhavit_t4_28", f"seed={seed}",
                                         f"out_dir={runs / 'vit' / f'seed{seed}'}",
                                         "model_kwargs={embed_dim: 24, depth: 2, num_heads: 2, patch_size: 7}"]))

    report = analyze.main(["--runs", str(runs), "--out", str(tmp_path / "fig"), "--images", "4"])
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {"curves.png", "fixed_point_imixer.png", "energy_sym.png", "symmetry.md", "symmetry_by_run.md",
            "report.json"} <= names
    assert len(report["fixed_point"]["imixer"]["layers"]) == 2
    assert len(report["fixed_point"]["imixer"]["layers"][0]["norm"]) == 3
    sym_rows = [r for r in report["symmetry"] if r["run"] == "sym"]
    assert sym_rows and all(abs(r["corr"] - 1) < 1e-9 for r in sym_rows)
    assert "| sym |" in (tmp_path / "fig" / "symmetry.md").read_text()
    by_run = (tmp_path / "fig" / "symmetry_by_run.md").read_text()
    assert "| sym | 1 | tokens | +1.000 → +1.000 | 0.000 |" in by_run and "| imixer | 1 | channels |" in by_run
    # the lambda curve (one point) with the symmetric run as a reference; ViT and iMixer runs are not in it
    assert report["symmetry_breaking"].keys() == {"sym", "broken"}
    assert report["symmetry_breaking"]["broken"][0]["lam"] == 0.001
    sb = (tmp_path / "fig" / "symmetry_breaking.md").read_text()
    assert "| broken | broken | 0.001 | 1 |" in sb and "| sym | symmetric | ∞ | 1 |" in sb
    assert {"symmetry_breaking.png", "symmetry_breaking.md"} <= names
    assert {"rank_collapse.png", "rank_collapse.md"} <= names and len(report["rank_collapse"]["vit"]) == 2
    analyze.main(["--runs", str(runs / "vit"), "--out", str(tmp_path / "fig_vit"), "--images", "4"])
    vit_only = {p.name for p in (tmp_path / "fig_vit").iterdir()}
    assert "rank_collapse.md" in vit_only and "symmetry.md" not in vit_only  # no empty symmetry tables for ViTs
    assert "| vit | 2 | 2 |" in (tmp_path / "fig" / "rank_collapse.md").read_text()
    # the symmetry index at initialisation and after each epoch; the trained iMixer blocks' certificates
    assert {"symmetry_trajectory.png", "symmetry_trajectory.md", "fixed_point_certificate.md"} <= names
    trajectory = (tmp_path / "fig" / "symmetry_trajectory.md").read_text()
    assert "| sym | 1 | tokens | +1.000 | +1.000 |" in trajectory and "| vit |" not in trajectory
    cert = report["fixed_point"]["imixer"]["layers"][0]["certificate"]
    assert cert["probe_iter"] == 8 and len(cert["ratios"]) == 7 and cert["lipschitz_bound"] > 0
    assert "| imixer | 1 | 0 | " in (tmp_path / "fig" / "fixed_point_certificate.md").read_text()
    # run folders kept without their checkpoints (as the sweeps keep them in git) are read from analysis.json
    for ckpt in runs.rglob("checkpoint.pt"):
        ckpt.unlink()
    again = analyze.main(["--runs", str(runs), "--out", str(tmp_path / "fig2"), "--images", "4"])
    assert again == report
    assert names == {p.name for p in (tmp_path / "fig2").iterdir()}
    for name in ("symmetry.md", "symmetry_by_run.md", "symmetry_breaking.md", "rank_collapse.md",
                 "symmetry_trajectory.md", "fixed_point_certificate.md"):
        assert (tmp_path / "fig2" / name).read_text() == (tmp_path / "fig" / name).read_text()
    # a run that cannot be analysed as asked is named and skipped, with the reason
    bad = analyze.main(["--runs", str(runs / "imixer"), "--out", str(tmp_path / "fig3"), "--images", "5"])
    assert re.search(r"imixer/analysis\.json: analysed on 4 test images, not --images 5", bad["failed"][0]["error"])
    saved = (runs / "broken" / "analysis.json").read_text()
    stale = json.loads(saved)
    del stale["model"]  # as written before analysis.json recorded the model
    (runs / "broken" / "analysis.json").write_text(json.dumps(stale))
    bad = analyze.main(["--runs", str(runs / "broken"), "--out", str(tmp_path / "fig3"), "--images", "4"])
    assert re.search(r"broken/analysis\.json: written before analysis\.json recorded the model",
                     bad["failed"][0]["error"])
    (runs / "broken" / "analysis.json").write_text(saved)
    # a run whose weights were lost before they were analysed: named, and left out of the weight analyses only
    (runs / "sym" / "analysis.json").unlink()
    capsys.readouterr()
    lost = analyze.main(["--runs", str(runs), "--out", str(tmp_path / "fig3"), "--images", "4"])
    assert re.search(r"warning: .*sym: neither checkpoint\.pt .* nor analysis\.json", capsys.readouterr().err)
    assert lost["not_analysed"] == [str(runs / "sym")] and "sym" not in lost["energy"]
    assert lost["runs"] == report["runs"] and lost["fixed_point"] == report["fixed_point"]
    assert lost["symmetry_breaking"].keys() == {"broken"} and not any(r["run"] == "sym" for r in lost["symmetry"])
    assert "| sym |" not in (tmp_path / "fig3" / "symmetry_by_run.md").read_text()


@pytest.mark.slow
def test_analyze_command_line_errors_name_the_argument(tmp_path, capsys):
    for argv, message in ((["--images", "0"], "--images 0: the analyses need at least one test image"),
                          ([], f"no finished runs (summary.json) below {tmp_path}")):
        with pytest.raises(SystemExit):
            analyze.main(["--runs", str(tmp_path), "--out", str(tmp_path / "fig"), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "fig").exists()


def test_analyze_reports_broken_runs_by_name_and_finishes_the_rest(tmp_path, capsys):
    """One truncated checkpoint and one checkpoint of another model: both named and skipped, the other run
    analysed and every report file written; a single run folder is labelled with its own name."""
    runs = tmp_path / "runs"
    common = ["data.num_workers=0", "progress=false", "epochs=1", "warmup_epochs=0", "data.train_subset=128",
              "data.test_subset=32", "batch_size=32", "model=derived_vmixer_t4_28",
              "model_kwargs={embed_dim: 16, num_blocks: 1}"]
    for name in ("good", "truncated", "other"):
        train.train(load_config(CONFIG, [*common, f"out_dir={runs / name / 'seed0'}"]))
    ckpt = runs / "truncated" / "seed0" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    other = load_config(CONFIG, [*common, "model_kwargs={embed_dim: 24, num_blocks: 1}", f"out_dir={tmp_path / 'x'}"])
    train.train(other)
    (runs / "other" / "seed0" / "checkpoint.pt").write_bytes((tmp_path / "x" / "checkpoint.pt").read_bytes())
    metrics = runs / "other" / "seed0" / "metrics.jsonl"  # a damaged line: its curve is left out, by name
    metrics.write_text("not json\n" + metrics.read_text())
    capsys.readouterr()
    report = analyze.main(["--runs", str(runs), "--out", str(tmp_path / "fig"), "--images", "4"])
    err = capsys.readouterr().err
    assert f"{metrics}:1: not a JSON line" in err and "left out of the training curves" in err
    failed = {f["run"]: f["error"] for f in report["failed"]}
    assert set(failed) == {str(runs / "truncated" / "seed0"), str(runs / "other" / "seed0")}
    assert "cannot be read" in failed[str(runs / "truncated" / "seed0")]
    assert "does not fit its model" in failed[str(runs / "other" / "seed0")] and "other/seed0" in err
    assert next(r["run"] for r in report["symmetry"]) == "good_seed0"
    assert {"curves.png", "symmetry.md", "symmetry_by_run.md", "report.json"} <= {p.name for p in
                                                                                 (tmp_path / "fig").iterdir()}
    import shutil  # a summary.json cut short or holding null: named and left out, the rest analysed

    for name, text in (("good", None), ("cut", '{"epochs": 1, "last'), ("null", "null")):
        shutil.copytree(runs / "good" / "seed0", tmp_path / "mixed" / name / "seed0")
        if text is not None:
            (tmp_path / "mixed" / name / "seed0" / "summary.json").write_text(text)
    capsys.readouterr()
    mixed = analyze.main(["--runs", str(tmp_path / "mixed"), "--out", str(tmp_path / "fig_mixed"), "--images", "4"])
    err = capsys.readouterr().err
    assert {f["run"] for f in mixed["failed"]} == {str(tmp_path / "mixed" / n / "seed0") for n in ("cut", "null")}
    assert "summary.json: not a JSON object (Unterminated" in err and "not a JSON object (it holds a NoneType)" in err
    assert {r["run"] for r in mixed["symmetry"]} == {"good_seed0"}
    single = analyze.main(["--runs", str(runs / "good" / "seed0"), "--out", str(tmp_path / "one"), "--images", "4"])
    assert {r["run"] for r in single["symmetry"]} == {"good_seed0"}
    assert "| good | 1 |" in (tmp_path / "one" / "symmetry_by_run.md").read_text()
    # a checkpoint of an earlier epoch than the run's last (an old copy restored from git, say) is not analysed:
    # the analysis.json of the final weights is kept as it was, and without one the run is named as failed
    good = runs / "good" / "seed0"
    saved = (good / "analysis.json").read_text()
    old = load_checkpoint(good / "checkpoint.pt")
    train.save_checkpoint(good / "checkpoint.pt", {**old, "epoch": 0, "step": 3})
    capsys.readouterr()
    again = analyze.main(["--runs", str(good), "--out", str(tmp_path / "two"), "--images", "4"])
    assert "holds the weights of epoch 0 and 3 steps, the run finished after epoch 1" in capsys.readouterr().err
    assert (good / "analysis.json").read_text() == saved and not again["failed"]
    (good / "analysis.json").unlink()
    again = analyze.main(["--runs", str(good), "--out", str(tmp_path / "three"), "--images", "4"])
    assert "not its final weights" in again["failed"][0]["error"]


def test_rank_collapse_at_initialisation_script(tmp_path, capsys):
    """Fresh ViT-Tiny on real Fashion-MNIST images: without skips the tokens collapse to rank 1 (down to float32
    round-off), with skips they stay far from it; the figure and table are written."""
    from experiments import rank_collapse_init

    md = rank_collapse_init.main(["--out", str(tmp_path), "--seeds", "1", "--images", "4", "--alphas", "0", "0.5"])
    assert {p.name for p in tmp_path.iterdir()} == {"rank_collapse_init.png", "rank_collapse_init.md"}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines()[2:]}
    assert set(rows) == {"skip=residual, alpha'=0", "skip=residual, alpha'=0.5", "skip=none, alpha'=0",
                         "skip=none, alpha'=0.5"}
    last_residual = {k: float(v[-1].split("±")[0]) for k, v in rows.items()}
    assert last_residual["skip=none, alpha'=0"] < 1e-5 < 0.5 < last_residual["skip=residual, alpha'=0"]
    for argv, message in ((["--images", "1"], "2 to 10,000 test images"), (["--alphas", "1.5"], r"lie in \[0, 1\)")):
        with pytest.raises(SystemExit):
            rank_collapse_init.main(["--out", str(tmp_path / "no"), *argv])
        assert re.search(message, capsys.readouterr().err) and not (tmp_path / "no").exists()
