"""Train an image classifier: any registered model, derived or hand-written, on one process or many.

    python -m experiments.train --config experiments/configs/fashion_small.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 -m experiments.train --config ... [key=value ...]

Overrides are dotted config keys (``epochs=20 data.name=cifar10 model_kwargs.h_ratio=2``), values parsed as
YAML. Everything is timm's building blocks: ``create_optimizer_v2`` (AdamW), ``create_scheduler_v2`` (cosine
with warm-up, cooldown and a lower bound, stepped every update), ``Mixup`` (mixup/cutmix with label
smoothing), RandAugment and random erasing (``experiments.data``), stochastic depth (``drop_path``). The
learning rate is ``lr_base * global_batch / lr_base_size`` unless ``lr`` is given (iMixer paper, Table 5).

Nothing is lost: a checkpoint is written atomically (temporary file, fsync, then rename) after every epoch, on
SIGTERM/SIGINT (at the next step boundary) and, with ``checkpoint_minutes``, mid-epoch that often (so a SIGKILL
loses at most that much training), holding model, optimizer, scheduler, grad scaler, RNG states,
epoch and step; ``--resume`` continues from it and ends where an uninterrupted run would. With several
processes, a signal to any one of them (or a non-finite loss on any one) stops all of them at the same step, and
the checkpoint holds every process's RNG state. A checkpoint resumes only the run it came from (same config,
number of processes and LR schedule; a different ``epochs`` is refused rather than silently keeping the old
schedule). Checkpoints are read with ``torch.load(weights_only=True)``. Outputs in ``out_dir``: ``checkpoint.pt``,
``metrics.jsonl``, ``metrics.csv``, ``tb/`` (TensorBoard), ``summary.json`` (with ``env``: versions,
hardware, git commit), ``config.yaml``. A fresh start
refuses an ``out_dir`` that holds a previous run's checkpoint or summary; ``--overwrite`` deletes them first.
One process at a time trains into an ``out_dir``: the run holds ``out_dir/.lock`` (flock, POSIX).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from .build import build_model, check_model, check_run, device_and_precision, param_groups
from .config import (
    RESUME_IGNORED,
    ConfigError,
    TrainConfig,
    add_import_argument,
    config_diff,
    import_modules,
    load_config,
    plain_config,
)
from .data import build_datasets, build_loaders
from .datafiles import CorruptDatasetError, DatasetNotFoundError
from .runs import (
    CheckpointError,
    RunBusyError,
    RunFileError,
    RunWriteError,
    atomic_write,
    cpu_name,
    environment,
    hold_out_dir,
    load_checkpoint,
    log_metrics,
    median_images_per_s,
    read_jsonl,
    restore_checkpoint,
    rewrite_logs,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .symmetry import symmetry_scalars

__all__ = ["CheckpointError", "ConfigError", "RunBusyError", "RunFileError", "RunWriteError", "TrainConfig",
           "atomic_write", "build_model", "check_model", "check_run", "config_diff", "cpu_name", "environment",
           "evaluate", "hold_out_dir", "import_modules", "load_config", "main", "param_groups", "read_jsonl",
           "save_checkpoint", "train"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


class _Stop:
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@torch.no_grad()
def evaluate(model, loader, device, autocast) -> dict:
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[1] += (top[:, 0] == y).sum()
        sums[2] += (top == y[:, None]).any(1).sum()
        sums[3] += y.numel()
    if dist.is_initialized():
        dist.all_reduce(sums)
    n = sums[3].item()
    return {"test_loss": sums[0].item() / n, "test_top1": 100 * sums[1].item() / n,
            "test_top5": 100 * sums[2].item() / n}


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or continue) a training run; returns the summary (also written to out_dir/summary.json).

    The main process holds ``out_dir``'s lock for the whole run: a second process training into the same folder
    is refused (:class:`RunBusyError`), and temporary files that a killed writer left there are deleted. A fresh
    start refuses an ``out_dir`` that holds another run's checkpoint or summary, unless ``overwrite`` (which deletes
    that run's outputs). A signal that arrives after the last training step (during the last evaluation) is
    delivered again once the summary is written, so a sweep stops instead of starting a new run."""
    check_run(cfg)  # a wrong model, device or batch size fails now, before any data is read or folder made
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config key 'out_dir': {str(out)!r} is a file, not a folder")
    if resume and not overwrite and (out / "summary.json").exists() and not (out / "checkpoint.pt").exists():
        raise ConfigError(f"config key 'out_dir': {str(out)!r} holds a finished run (summary.json) and no checkpoint "
                          "to resume from; train it again with --overwrite, or choose another out_dir")
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the main process holds the lock for all
        return _train(cfg, resume, overwrite)
    created = not out.exists()
    try:
        with hold_out_dir(out) as mine:
            if not mine:
                raise RunBusyError(f"config key 'out_dir': {str(out)!r} is in use by another training process (it "
                                   f"holds {str(out / '.lock')!r}); wait for it to end or choose another out_dir")
            for orphan in out.glob("*.tmp[0-9]*"):  # left by a writer killed mid-write: nobody else writes here now
                orphan.unlink()
            return _train(cfg, resume, overwrite)
    except BaseException:
        # a run that failed before writing anything leaves no folder of its own behind (only its lock was there)
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, resume: bool, overwrite: bool) -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main_proc = rank == 0
    device, use_amp = device_and_precision(cfg, main_proc)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode needs it
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if resume and ckpt is None and main_proc:
        print(f"no checkpoint at {ckpt_path}: starting from scratch", file=sys.stderr)
    if ckpt is not None and (diff := config_diff(ckpt["config"], cfg, ignore=RESUME_IGNORED)):
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} was written for a different configuration "
                              f"({'; '.join(diff)}); resume with the same config or use another out_dir")
    previous = [name for name in ("checkpoint.pt", "summary.json") if (out / name).exists()]
    if ckpt is None and previous and not overwrite:
        raise ConfigError(f"config key 'out_dir': {str(out)!r} holds a previous run ({', '.join(previous)}); "
                          "continue it with --resume, replace it with --overwrite, or choose another out_dir")

    # data and model: the same seed on every process gives the same initial weights
    _seed_everything(cfg.seed)
    train_ds, test_ds, info = build_datasets(cfg.data, seed=cfg.seed)
    train_loader, test_loader, train_sampler = build_loaders(
        train_ds, test_ds, cfg.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed, distributed=distributed)
    model = build_model(cfg, info.num_classes, info.in_chans, info.img_size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    global_batch = cfg.batch_size * world
    lr = cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / cfg.lr_base_size
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    param_group_fn=(lambda m: param_groups(m, cfg)) if cfg.no_weight_decay else None)
    if cfg.min_lr >= lr and main_proc and ckpt is None:
        warnings.warn(f"config key 'min_lr' ({cfg.min_lr:g}) >= the learning rate ({lr:g}): the schedule never "
                      "decays (its floor is at or above its peak)", RuntimeWarning, stacklevel=2)
    if cfg.warmup_epochs >= cfg.epochs and main_proc and ckpt is None:
        warnings.warn(f"config keys 'warmup_epochs' ({cfg.warmup_epochs}) >= 'epochs' ({cfg.epochs}): the whole run "
                      "is warm-up, its learning rate rising all the way and never reaching the peak", RuntimeWarning,
                      stacklevel=2)
    steps_per_epoch = len(train_loader)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(enabled=False)  # bf16 needs no loss scaling; kept for fp16 and the checkpoint
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=info.num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    net = eval_net = model  # evaluation bypasses DDP: its shards may differ by a batch, and it needs no all-reduce
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
        eval_net = torch.compile(model) if distributed else net

    start_epoch, start_step, best, wall_before, resumed = 0, 0, None, 0.0, {}
    # the weight-symmetry index of every two-matrix MLP at initialisation (then logged after every epoch): whether
    # training breaks the symmetry, or the weights never had it (Karakida, Ota & Taki 2024)
    symmetry_init = symmetry_scalars(model) if ckpt is None else ckpt.get("symmetry_init", {})
    if ckpt is not None:
        start_epoch, start_step, best, wall_before, resumed = restore_checkpoint(
            ckpt, ckpt_path, cfg, rank, world, model, optimizer, scheduler, scaler)
    # metrics of the epochs the checkpoint has seen (a kill between logging and saving leaves one extra line)
    history = [h for h in read_jsonl(out / "metrics.jsonl") if h["epoch"] <= start_epoch] if ckpt else []
    if main_proc:
        if ckpt is None:  # a fresh start: nothing of an earlier run in out_dir survives to mix with this one's
            for name in previous:
                (out / name).unlink()
            shutil.rmtree(out / "tb", ignore_errors=True)
            atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(plain_config(cfg))))
        rewrite_logs(out, history)
    writer = None
    if main_proc:
        from torch.utils.tensorboard import SummaryWriter

        # on resume, TensorBoard drops the events of epochs logged after the checkpoint (as metrics.jsonl does)
        writer = SummaryWriter(str(out / "tb"), purge_step=start_epoch + 1 if ckpt else None)

    def state(epoch: int, step: int, ranks: list[dict] | None = None) -> dict:
        """The checkpoint. ``ranks``: every process's RNG state and partial-epoch counters, for a mid-epoch stop
        (at an epoch boundary they are re-derived from the seed); entry 0 also goes where one process reads it."""
        own = (ranks or [{}])[0]
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                   "rng": own.get("rng", rng_state()), "epoch": epoch, "step": step, "best": best,
                   "epochs": cfg.epochs, "world_size": world, "epoch_loss_sum": own.get("epoch_loss_sum", 0.0),
                   "epoch_correct": own.get("epoch_correct", 0), "epoch_counted": own.get("epoch_counted", 0),
                   "epoch_seen": own.get("epoch_seen", 0), "epoch_time_s": own.get("epoch_time_s", 0.0),
                   "wall_s": wall_before + time.perf_counter() - t_start, "symmetry_init": symmetry_init,
                   "config": plain_config(cfg, ignore=RESUME_IGNORED)}
        if ranks is not None and world > 1:
            payload["ranks"] = ranks
        return payload

    t_start = last_save = time.perf_counter()
    save_every = None if cfg.checkpoint_minutes is None else 60.0 * cfg.checkpoint_minutes

    def gather(own: dict) -> list[dict]:
        """Every process's RNG state and partial-epoch counters, in rank order (a collective under DDP)."""
        if not distributed:
            return [own]
        ranks = [None] * world
        dist.all_gather_object(ranks, own)
        return ranks

    stopped = None
    with _Stop() as stop:
        for epoch in range(start_epoch, total_epochs):
            # every epoch starts from RNG states fixed by (seed, epoch, rank): a resumed run replays it exactly
            _seed_everything(cfg.seed + 1_000_003 * (epoch + 1) + 7919 * rank)
            if train_sampler is not None:
                train_sampler.set_epoch(epoch)
            if train_loader.generator is not None:  # shuffling and worker seeds of this epoch
                train_loader.generator.manual_seed(cfg.seed + 1_000_003 * epoch + rank)
            net.train()
            skip = start_step if epoch == start_epoch else 0
            seen, loss_sum, t0 = 0, torch.zeros((), dtype=torch.float64), time.perf_counter()
            correct = counted = 0
            seen_before, time_before = 0, 0.0  # images and seconds this epoch trained before a stop
            if skip:  # the interrupted part of this epoch counts in its loss, accuracy, time and images/s
                loss_sum += resumed["epoch_loss_sum"]
                correct, counted = resumed["epoch_correct"], resumed["epoch_counted"]
                seen_before, time_before = resumed.get("epoch_seen", 0), resumed.get("epoch_time_s", 0.0)
            bar = _bar(cfg, main_proc, steps_per_epoch, epoch, total_epochs)
            for step, (x, y) in enumerate(train_loader):
                if step < skip:  # fast-forward a resumed epoch: the loader consumes its randomness as before
                    if step == skip - 1:
                        set_rng_state(resumed["rng"])
                        t0 = time.perf_counter()  # the fast-forward is not training time
                    if bar is not None:
                        bar.update()
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mixup is not None:
                    x, y = mixup(x, y)
                with autocast():
                    logits = net(x)
                    loss = criterion(logits, y)
                    if hasattr(model, "penalty"):
                        loss = loss + model.penalty()
                # every process takes the same branch: a non-finite loss or a signal on any one of them stops all
                # at this step (alone, it would leave the others waiting in the gradient all-reduce)
                # a mid-epoch checkpoint is due by the main process's clock (and is not the epoch's last step)
                due = (save_every is not None and main_proc and step + 1 < steps_per_epoch
                       and time.perf_counter() - last_save >= save_every)
                flags = torch.stack([~torch.isfinite(loss.detach()),
                                     torch.tensor(stop.signum is not None, device=loss.device),
                                     torch.tensor(due, device=loss.device)]).float()
                if distributed:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                nonfinite, stopping, due = flags.tolist()
                if nonfinite:
                    raise FloatingPointError(f"loss is {loss.item()} (or non-finite on another process) at epoch "
                                             f"{epoch} step {step}; last good checkpoint: {ckpt_path} (a lower lr, "
                                             "clip_grad or amp=off may keep it finite)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step_update(epoch * steps_per_epoch + step + 1)
                seen += x.shape[0] * world
                loss_sum += loss.detach().double().cpu()
                if y.ndim == 1:  # hard labels (no mixup): running training accuracy
                    correct += (logits.detach().argmax(1) == y).sum().item()
                    counted += y.numel()
                if bar is not None:
                    rate = seen / (time.perf_counter() - t0)
                    acc = f"{100 * correct / counted:.1f}" if counted else "-"
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=acc, lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{rate:.0f}")
                    bar.update()
                if stopping or due:
                    partial = {"rng": rng_state(), "epoch_loss_sum": loss_sum.item(), "epoch_correct": correct,
                               "epoch_counted": counted, "epoch_seen": seen_before + seen,
                               "epoch_time_s": time_before + time.perf_counter() - t0}
                    if stopping:
                        stopped = (epoch, step + 1, partial)
                        break
                    saving = time.perf_counter()
                    ranks = gather(partial)
                    if main_proc:
                        save_checkpoint(ckpt_path, state(epoch, step + 1, ranks))
                    last_save = time.perf_counter()
                    t0 += last_save - saving  # writing the checkpoint is not training time
            if bar is not None:
                bar.close()
            if stopped is not None:
                break
            seen, epoch_time = seen_before + seen, time_before + time.perf_counter() - t0
            totals = torch.tensor([loss_sum.item(), correct, counted], dtype=torch.float64, device=device)
            if distributed:  # training loss and accuracy over all processes' batches
                dist.all_reduce(totals)
            loss_total, correct_total, counted_total = totals.tolist()
            metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                       "train_loss": loss_total / (steps_per_epoch * world),
                       "train_top1": 100 * correct_total / counted_total if counted_total else None,
                       **evaluate(eval_net, test_loader, device, autocast),
                       "images_per_s": seen / epoch_time if seen else None, "epoch_time_s": epoch_time,
                       "wall_s": wall_before + time.perf_counter() - t_start, **symmetry_scalars(model)}
            if best is None or metrics["test_top1"] > best["test_top1"]:
                best = {"epoch": epoch + 1, "test_top1": metrics["test_top1"], "test_top5": metrics["test_top5"]}
            history.append(metrics)
            if main_proc:
                log_metrics(out, writer, metrics)
                if bar is None and cfg.progress:
                    print(json.dumps(metrics))
                save_checkpoint(ckpt_path, state(epoch + 1, 0))
            last_save = time.perf_counter()
            scheduler.step(epoch + 1)

    if stopped is not None:
        ranks = gather(stopped[2])
        if main_proc:
            save_checkpoint(ckpt_path, state(stopped[0], stopped[1], ranks))
            by = f"signal {stop.signum}" if stop.signum is not None else "a signal to another process"
            print(f"stopped by {by} at epoch {stopped[0]} step {stopped[1]}; checkpoint "
                  f"{ckpt_path}; continue with --resume", file=sys.stderr)
        if writer is not None:
            writer.close()
        if distributed:
            dist.destroy_process_group()
        return {"stopped": True, "epoch": stopped[0], "step": stopped[1]}

    identical = _ranks_identical(model) if distributed else True
    last = history[-1] if history else {}
    summary = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "dataset": cfg.data.name, "seed": cfg.seed,
               "params": n_params, "epochs": total_epochs, "world_size": world,
               "best_top1": best["test_top1"] if best else None, "best_top5": best["test_top5"] if best else None,
               "best_epoch": best["epoch"] if best else None,
               "last_top1": last.get("test_top1"), "last_top5": last.get("test_top5"),
               "images_per_s": median_images_per_s(history),
               "wall_s": wall_before + time.perf_counter() - t_start, "ranks_identical": identical,
               "device": str(device), "precision": "bf16 autocast" if use_amp else "float32",
               "symmetry_init": symmetry_init, "env": environment(device)}
    if main_proc:  # atomic: a sweep takes summary.json as the mark of a finished run
        atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    if writer is not None:
        writer.close()
    if distributed:
        dist.destroy_process_group()
    if stop.signum is not None:  # it came after the last step: the run is complete, and the signal still counts
        signal.raise_signal(stop.signum)
    return summary


def _ranks_identical(model: nn.Module) -> bool:
    """Whether every process ends with bit-identical weights and buffers (DDP keeps them in step): each compares
    its own tensors element by element with process 0's."""
    same = True
    for t in model.state_dict().values():
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        same = same and torch.equal(t, ref)
    flag = torch.tensor(float(same), device=next(iter(model.state_dict().values())).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _bar(cfg: TrainConfig, main_proc: bool, total: int, epoch: int, epochs: int):
    if not (cfg.progress and main_proc and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with TrainConfig keys")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that holds a previous run, "
                   "deleting its checkpoint, summary and TensorBoard logs")
    add_import_argument(p)
    p.add_argument("overrides", nargs="*", help="key=value (dotted keys, YAML values)")
    args = p.parse_args(argv)
    try:
        import_modules(args.imports)
        summary = train(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        p.error(str(e))
    except (CheckpointError, DatasetNotFoundError, CorruptDatasetError, RunFileError, RunWriteError,
            FloatingPointError) as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
