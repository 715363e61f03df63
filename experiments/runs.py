"""A run's folder: one process at a time (:func:`hold_out_dir`, an flock that forked workers do not keep), files
written atomically (:func:`atomic_write`; a failure is a :class:`RunWriteError` naming the file and why), the
checkpoint (:func:`save_checkpoint`, :func:`load_checkpoint` with ``weights_only=True``, :func:`restore_checkpoint`
into the run it continues), the metrics logs, and the environment that produced the run (:func:`environment`)."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig

__all__ = ["CHECKPOINT_KEYS", "CheckpointError", "RunBusyError", "RunFileError", "RunWriteError", "atomic_write",
           "check_resumable", "cpu_has_bf16_kernels", "cpu_name", "environment", "hold_out_dir", "load_checkpoint",
           "log_metrics", "median_images_per_s", "read_jsonl", "read_summary", "restore_checkpoint", "rewrite_logs",
           "rng_state", "save_checkpoint", "set_rng_state"]


class RunBusyError(ConfigError):
    """Another process is training into the same out_dir (it holds out_dir/.lock)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not continue this run: the message names the file."""


class RunFileError(ValueError):
    """A run's file (metrics.jsonl, summary.json) could not be read: the message names the file and the line."""


class RunWriteError(OSError):
    """A run's file could not be written: the message names the file and says why; the previous version of the
    file is intact and no temporary file is left."""


_WHY = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space is left on the device",
        errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "the file-size limit (ulimit -f) was reached",
        errno.EACCES: "permission denied", errno.EPERM: "the operation is not permitted (an immutable or read-only "
                                                         "file or folder?)"}


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` fills a temporary file in the same folder, which is flushed to disk and renamed over ``path``:
    a reader (or a crash at any point) sees the old file or the new one, never half of one. A failure to write is a
    ``RunWriteError`` naming ``path`` and the reason (read-only, no space, file-size limit, ...)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, RunWriteError):
            why = _WHY.get(e.errno, e.strerror or str(e))
            kept = "its previous version is intact" if path.exists() else "nothing was written"
            raise RunWriteError(e.errno, f"cannot write {str(path)!r}: {why}; {kept}") from e
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old checkpoint. The
    checkpoint is serialised in memory first, so that a failing write is Python's (with its errno: read-only, no
    space, file-size limit) rather than torch's."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "best", "rng", "wall_s", "config")


def load_checkpoint(path: Path) -> dict:
    """Read with weights_only=True (no arbitrary pickle); a clear error names a corrupt file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (corrupt or not a checkpoint): {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a training checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}: not written by experiments.train")
    wrong = [k for k in ("model", "optimizer", "scheduler", "scaler", "rng", "config") if not isinstance(ckpt[k], dict)]
    if wrong:
        raise CheckpointError(f"checkpoint {str(path)!r}: {wrong} are not mappings: not written by experiments.train")
    return ckpt


def restore_checkpoint(ckpt: dict, ckpt_path: Path, cfg: TrainConfig, rank: int, world: int, model, optimizer,
                       scheduler, scaler) -> tuple:
    """Load a checkpoint into the run's model, optimizer, scheduler and scaler; returns (start epoch, start step,
    best, wall seconds so far, this process's RNG state and partial-epoch counters). CheckpointError naming the file
    if it does not continue this run or is damaged."""
    start_epoch, start_step, best, wall_before, resumed = 0, 0, None, 0.0, {}
    check_resumable(ckpt, ckpt_path, scheduler, world, cfg.epochs)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} does not fit model {cfg.model!r}: {e}") from e
    try:
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step, best, wall_before = ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["wall_s"]
        # this process's RNG and partial-epoch counters (one entry per process since multi-process stops)
        resumed = ckpt["ranks"][rank] if "ranks" in ckpt else {
            k: ckpt.get(k, 0) for k in ("rng", "epoch_loss_sum", "epoch_correct", "epoch_counted", "epoch_seen",
                                        "epoch_time_s")}
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} has a damaged training state: {e!r}") from e
    return start_epoch, start_step, best, wall_before, resumed


def check_resumable(ckpt: dict, path: Path, scheduler, world: int, epochs: int) -> None:
    """A checkpoint continues only the run it came from: same number of processes and same LR schedule (the
    scheduler's state would otherwise silently keep the old run's length)."""
    if ckpt.get("world_size", world) != world:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by {ckpt['world_size']} processes; resume it "
                              f"with the same number (this run has {world}) or use another out_dir")
    fresh = scheduler.state_dict()
    differ = sorted(k for k, v in fresh.items() if k != "metric" and ckpt["scheduler"].get(k, v) != v)
    if differ:
        was = f"epochs={ckpt['epochs']}" if "epochs" in ckpt else "another length"
        raise CheckpointError(f"checkpoint {str(path)!r} was written for a different LR schedule ({was}; this "
                              f"config has epochs={epochs}; scheduler fields {differ} differ): resume with the "
                              "checkpoint's epochs, or start a new run in another out_dir")


def rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002 -- the global stream is what timm's Mixup draws from
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_HELD: dict[Path, int] = {}  # out_dirs whose lock this process holds -> nesting depth


@contextlib.contextmanager
def hold_out_dir(out: Path):
    """Yield True while this process holds ``out``'s exclusive lock (flock on out/.lock, released when the block
    ends or the process dies), False if another process holds it. Re-entrant within a process, so a sweep that
    holds a run's lock can call :func:`train` on it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield True
        finally:
            _HELD[key] -= 1
        return
    with open(out / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        _HELD[key] = 1
        _LOCK_FDS.add(f.fileno())
        try:
            yield True
        finally:
            _LOCK_FDS.discard(f.fileno())
            del _HELD[key]
            fcntl.flock(f, fcntl.LOCK_UN)


# An flock belongs to the open file, which a forked process (a DataLoader worker) shares: a worker orphaned by a
# kill -9 would hold the run's lock until it noticed, refusing an immediate --resume. Forked children close their
# copies at once (closing, not unlocking: the lock stays the parent's and goes when the parent dies).
_LOCK_FDS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in list(_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def read_jsonl(path) -> list[dict]:
    """The records of a metrics.jsonl file, one JSON object a line (blank lines skipped); [] when there is none. A
    last line cut short (a process killed while appending it) is dropped; any other line that is not a JSON object
    is a RunFileError naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [(k, line) for k, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    out = []
    for i, (k, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise RunFileError(f"{path}:{k}: not a JSON line ({e.msg}): {line[:60]!r}") from None
        if not isinstance(rec, dict):
            raise RunFileError(f"{path}:{k}: expected a JSON object per line, got {type(rec).__name__}")
        out.append(rec)
    return out


def read_summary(run: Path, name: str = "summary.json") -> dict:
    """A run folder's summary.json (or another JSON record of it: ``name="analysis.json"``) as a dict; RunFileError
    naming the file when it is not a JSON object."""
    path = Path(run) / name
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path}: not a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: not a JSON object (it holds a {type(data).__name__})")
    return data


def rewrite_logs(out: Path, history: list[dict]) -> None:
    """metrics.jsonl and metrics.csv holding exactly ``history``, each replaced atomically."""
    def jsonl(tmp):
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))

    def table(tmp):
        with open(tmp, "w", newline="") as f:
            if history:
                w = csv.DictWriter(f, fieldnames=list(history[0]))
                w.writeheader()
                w.writerows(history)

    atomic_write(out / "metrics.jsonl", jsonl)
    if history:
        atomic_write(out / "metrics.csv", table)
    else:
        (out / "metrics.csv").unlink(missing_ok=True)


def log_metrics(out: Path, writer, metrics: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    new = not (out / "metrics.csv").exists()
    with open(out / "metrics.csv", "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(metrics))
        if new:
            w.writeheader()
        w.writerow(metrics)
    if writer is None:
        return
    for k, v in metrics.items():
        if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
            writer.add_scalar(k, v, metrics["epoch"])
    writer.flush()


def median_images_per_s(history: list[dict]) -> float | None:
    """Median over epochs of the training loop's images/s: an epoch slowed by a paused process, a resume or another
    job on the CPU moves it less than it moves the mean."""
    values = [h["images_per_s"] for h in history if h.get("images_per_s") is not None]
    return float(np.median(values)) if values else None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows of it."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512, native with AVX512_BF16 or AMX). Without them, on
    AVX2-only CPUs, bf16 autocast falls back to slow reference code: 0.07–0.13× float32's speed
    (docs/benchmarks.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing to tell
        return True


def environment(device: torch.device | str = "cpu") -> dict:
    """What produced a run, for its summary: Python, torch, torchvision and timm versions, the device (GPU name or
    CPU model), the CPU's vector capability and whether it has bf16 kernels (two CPUs of one model name can
    differ), cores and torch threads, and the code's git commit (None outside a git checkout) with whether
    tracked files differed from it. Taken when the run ends: a resumed run may have started under another."""
    import platform

    import timm
    import torchvision

    device = torch.device(device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "hardware": hw,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16_kernels": cpu_has_bf16_kernels(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "git_commit": commit, "git_dirty": bool(changes) if changes is not None else None}
