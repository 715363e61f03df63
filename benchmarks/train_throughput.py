"""Training throughput of Mixer-family timm models, side by side in one process: images/s, MFU, peak memory.

    .venv/bin/python benchmarks/train_throughput.py [--modes eager compile] [--write-docs]     # GPU defaults
    .venv/bin/python benchmarks/train_throughput.py --models imixer_s16_224:'{"h_ratio": 2}' vmixer_s16_224
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py --device cpu --models vmixer_t4_28 \\
        imixer_t4_28 --batch 64 --precision fp32 bf16 --steps 2 --rounds 2                  # CPU, side by side

One training step = forward + cross-entropy loss (random labels) + backward + AdamW step + zero_grad (grads set to
None), train mode, on synthetic images and labels created once on the device. Models are timm names registered by
this project (``import mixers``: ``imixer_s16_224``, ``vmixer_s16_224``, ...; ``import derive``: ``derived_*``), each
optionally followed by ``:`` and a JSON object of keyword arguments for ``timm.create_model`` (e.g.
``imixer_s16_224:{"h_ratio":2,"n_iter":2}``). Every (model, mode) pair gets its own model instance (same seed) and
optimizer; ``compile`` wraps the model in ``torch.compile`` (loss, backward and optimizer stay eager).

Timing: ``--warmup`` untimed steps of each variant (at least 1; compiled ones at least 2, the first compiles),
then ``--rounds`` rounds in which every variant runs ``--steps`` steps in turn (A, B, A, B, ...), so that drift
hits all alike; on a GPU ``torch.cuda.synchronize()`` brackets each timed run. Reported per variant: the median
over rounds of the time per step (and the best), images/s = batch / median time, model FLOPs per step counted by
``torch.utils.flop_counter.FlopCounterMode`` on one eager forward + backward per model (matmuls and convolutions
only: elementwise work, normalisations and the optimizer are not counted), achieved TFLOP/s = FLOPs / median time,
MFU = achieved / peak dense TFLOP/s of the GPU (bf16 only, from the device name or ``--peak-tflops``; not on CPU),
peak memory (GPU) = the step's peak allocation above what was resident before it (all variants' weights and
optimizer states) plus the variant's own weights and optimizer state and the batch. Ratios: images/s of each model
over the first model's in the same mode, and eager time / compiled time per model.
Run it on an otherwise idle machine: two processes sharing the device distort every number.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import derive  # noqa: E402, F401  (registers the derived_* names with timm)
import mixers  # noqa: E402  (registers imixer_s16_224 & co. with timm)
from benchmarks.derived_vs_handwritten import cpu_name, machine, write_docs  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
DEFAULT_MODELS = ["imixer_s16_224", "vmixer_s16_224"]
# peak dense (no sparsity) bf16 tensor-core TFLOP/s, by a substring of torch.cuda.get_device_name(); first match wins
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.4),
    ("A100", 312.0),
]
DASH = "–"


@dataclass
class Variant:
    spec: str  # as given on the command line
    name: str
    kwargs: dict
    mode: str
    precision: str
    model: nn.Module  # the module (eager); ``step`` may call its compiled wrapper
    opt: torch.optim.Optimizer
    step: Callable[[], torch.Tensor]
    static_bytes: int = 0  # the variant's own weights + optimizer state
    first_step_s: float = 0.0
    times: list[float] = field(default_factory=list)  # seconds per step, one per round
    peaks: list[int] = field(default_factory=list)  # bytes above the resident set, one per round (GPU)
    loss: float = float("nan")


# ---------------------------------------------------------------------------------------------- set-up
def parse_model(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:{json object}`` -> (name, kwargs)."""
    name, sep, rest = spec.partition(":")
    kwargs = json.loads(rest) if sep else {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{spec!r}: the part after ':' must be a JSON object of keyword arguments")
    if not timm.is_model(name):
        raise ValueError(f"{name!r} is not a timm model name (this project registers e.g. "
                         f"{', '.join(mixers.MODEL_NAMES[:3])}, ... and derived_<name> for each)")
    return name, kwargs


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(in_chans, img_size, num_classes) the model was built for."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return cfg.in_chans, cfg.img_size, cfg.num_classes
    chans, size, _ = model.pretrained_cfg["input_size"]
    return chans, size, model.num_classes


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available")
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_name()}"


def peak_tflops(args, device: torch.device) -> float | None:
    """The dense peak that MFU is taken against: ``--peak-tflops``, else the GPU's bf16 peak (for bf16 rows only)."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def make_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, device: torch.device,
              precision: str) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def count_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Model FLOPs of one eager forward + backward (FlopCounterMode: matmuls and convolutions; autocast does not
    change the count, so it is taken once per model, without it)."""
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def build(args, device: torch.device) -> tuple[list[Variant], dict[str, int], torch.Tensor, tuple[int, int, int]]:
    """One model instance + optimizer per (model, mode, precision); FLOPs per step per model; the batch and
    (in_chans, img_size, num_classes)."""
    common = {k: v for k, v in (("img_size", args.img_size), ("in_chans", args.in_chans),
                                ("num_classes", args.num_classes)) if v is not None}
    specs = [(spec, *parse_model(spec)) for spec in args.models]
    variants, flops, x, y, shape = [], {}, None, None, None
    for mode in args.modes:
        for spec, name, kw in specs:
            kwargs = {**common, **kw}
            torch.manual_seed(args.seed)
            model = timm.create_model(name, **kwargs).to(device).train()
            s = input_shape(model)
            if shape is None:
                shape = s
                gen = torch.Generator().manual_seed(args.seed)
                chans, size, classes = s
                x = torch.randn(args.batch, chans, size, size, generator=gen).to(device)
                y = torch.randint(0, classes, (args.batch,), generator=gen).to(device)
            elif s != shape:
                raise ValueError(f"{spec} is built for (in_chans, img_size, num_classes) = {s}, the first model for "
                                 f"{shape}; give --img-size / --in-chans / --num-classes (or per-model kwargs)")
            if spec not in flops:
                flops[spec] = count_flops(model, x, y)
            for i, precision in enumerate(args.precision):
                if i:  # one more instance with the same initial weights
                    model = copy.deepcopy(variants[-1].model)
                opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
                fwd = torch.compile(model) if mode == "compile" else model
                variants.append(Variant(spec, name, kwargs, mode, precision, model, opt,
                                        make_step(fwd, opt, x, y, device, precision)))
    return variants, flops, x, shape


# ---------------------------------------------------------------------------------------------- measuring
def timed(v: Variant, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps; records the step's peak allocation above the resident set (GPU)."""
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = v.step()
    sync(device)
    elapsed = time.perf_counter() - start
    if cuda:
        v.peaks.append(torch.cuda.max_memory_allocated(device) - resident)
    v.loss = float(loss)
    return elapsed / steps


def measure(variants: list[Variant], args, device: torch.device) -> None:
    for v in variants:  # warm-up, each variant in turn; the first step of a compiled variant compiles it
        sync(device)
        start = time.perf_counter()
        v.step()
        sync(device)
        v.first_step_s = time.perf_counter() - start
        for _ in range(max(args.warmup, 2 if v.mode == "compile" else 1) - 1):
            v.step()
        sync(device)
        v.static_bytes = tensor_bytes(v.model.parameters()) + tensor_bytes(
            t for state in v.opt.state.values() for t in state.values())
        print(f"  {v.spec} [{v.mode}, {v.precision}]: first step {v.first_step_s:.2f} s", flush=True)
    for r in range(args.rounds):
        for v in variants:
            v.times.append(timed(v, args.steps, device))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v.name} [{v.mode}, {v.precision}] {1e3 * v.times[-1]:.1f} ms" for v in variants), flush=True)


def rows_of(variants: list[Variant], flops: dict[str, int], batch_bytes: int, args, device: torch.device,
            peak: float | None) -> list[dict]:
    rows = []
    for v in variants:
        med, best = statistics.median(v.times), min(v.times)
        tflops = flops[v.spec] / med / 1e12
        rows.append(dict(
            model=v.spec, name=v.name, kwargs=v.kwargs, mode=v.mode, device=device.type, precision=v.precision,
            batch=args.batch, ms_per_step=1e3 * med, ms_best=1e3 * best, images_per_s=args.batch / med,
            flops_per_step=flops[v.spec], tflops=tflops,
            mfu=tflops / peak if peak and (v.precision == "bf16" or args.peak_tflops is not None) else None,
            peak_mem_bytes=max(v.peaks) + v.static_bytes + batch_bytes if v.peaks else None,
            first_step_s=v.first_step_s, loss=v.loss, times=list(v.times), vs_first=None, compile_speedup=None,
            bf16_speedup=None,
        ))
    for row in rows:
        first = next(r for r in rows if r["mode"] == row["mode"] and r["precision"] == row["precision"])
        row["vs_first"] = row["images_per_s"] / first["images_per_s"]
        twin = {k: row[k] for k in ("model", "mode", "precision")}
        if row["mode"] == "compile":
            eager = next((r for r in rows if r.items() >= {**twin, "mode": "eager"}.items()), None)
            if eager is not None:
                row["compile_speedup"] = eager["ms_per_step"] / row["ms_per_step"]
        if row["precision"] == "bf16":
            fp32 = next((r for r in rows if r.items() >= {**twin, "precision": "fp32"}.items()), None)
            if fp32 is not None:
                row["bf16_speedup"] = fp32["ms_per_step"] / row["ms_per_step"]
    return rows


def run(args) -> list[dict]:
    """Measure; one dict per (model, mode, precision), in the order mode, model, precision."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    variants, flops, x, shape = build(args, device)
    batch_bytes = x.numel() * x.element_size() + args.batch * 8
    print(f"{device_name(device)}; {machine()}; batch {args.batch}, input {tuple(x.shape[1:])}", flush=True)
    measure(variants, args, device)
    for v in variants:
        if not torch.isfinite(torch.tensor(v.loss)):
            print(f"warning: {v.spec} [{v.mode}]: the loss is {v.loss} after the timed steps (try a lower --lr)")
    rows = rows_of(variants, flops, batch_bytes, args, device, peak_tflops(args, device))
    for row in rows:
        row.update(zip(("in_chans", "img_size", "num_classes"), shape))
    return rows


# ---------------------------------------------------------------------------------------------- reporting
def fmt(value, spec: str, missing: str = DASH) -> str:
    return missing if value is None else format(value, spec)


def gflop(flops: int) -> str:
    g = flops / 1e9
    return f"{g:.3g}" if g < 100 else f"{g:.0f}"


def table(rows: list[dict]) -> list[str]:
    """The docs' table. On a GPU: times, images/s, TFLOP/s, MFU and memory beside the ratios; on a CPU the ratios
    alone (absolute CPU times are not comparable across machines; the terminal prints them)."""
    first = rows[0]["model"]
    gpu = rows[0]["device"] == "cuda"
    cols = ["model", "mode", "precision"]
    cols += ["ms / step (median)", "ms / step (best)", "images / s"] if gpu else []
    cols += [f"images / s vs {first}", "compiled speed-up", "bf16 speed-up", "GFLOP / step"]
    cols += ["TFLOP/s", "MFU", "peak memory GiB"] if gpu else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
        cells = [f"`{r['model']}`", r["mode"], r["precision"]]
        cells += [f"{r['ms_per_step']:.2f}", f"{r['ms_best']:.2f}", f"{r['images_per_s']:.1f}"] if gpu else []
        cells += [f"{r['vs_first']:.3f}", fmt(r["compile_speedup"], ".2f"), fmt(r["bf16_speedup"], ".2f"),
                  gflop(r["flops_per_step"])]
        cells += [f"{r['tflops']:.2f}", fmt(r["mfu"], ".1%"), fmt(mem, ".2f")] if gpu else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(rows: list[dict], args, command: str, device: torch.device, peak: float | None) -> str:
    name = device_name(device)
    host = machine()
    if device.type == "cuda":
        host = f"{name}, CUDA {torch.version.cuda}; host {host}"
    chans, size, classes = rows[0]["in_chans"], rows[0]["img_size"], rows[0]["num_classes"]
    precision = " and ".join("bf16 autocast" if p == "bf16" else "float32 (no autocast)" for p in args.precision)
    if peak:
        source = "--peak-tflops" if args.peak_tflops is not None else "the device's dense bf16 peak"
        peak_note = f"MFU against {peak:g} TFLOP/s ({source})"
    elif device.type == "cpu":
        peak_note = "MFU not reported on CPU"
    else:
        peak_note = "MFU not reported (no known peak for this device and precision; give --peak-tflops)"
    lines = [
        f"## Training throughput ({name}, {datetime.date.today().isoformat()})",
        "",
        f"Command: `{command}`; machine: {host}; {precision}, batch {args.batch}, {chans} x {size} x {size} "
        f"images, {classes} classes, AdamW (lr {args.lr:g}); {args.warmup} warm-up steps of each variant, then "
        f"{args.rounds} interleaved rounds of {args.steps} steps each.",
        "",
        *table(rows),
        "",
        "(One step = forward + cross-entropy + backward + AdamW step + zero_grad, train mode, synthetic data. "
        + ("ms / step: median (and best) over the rounds; images / s from the median. " if device.type == "cuda"
           else "Ratios of the median times over the rounds; absolute CPU times are left out, as they do not carry "
                "to another machine. ")
        + "GFLOP / step: `FlopCounterMode` on one eager forward + backward (matmuls and convolutions)"
        + (f"; TFLOP/s = that / median time; {peak_note}" if device.type == "cuda" else "")
        + ". Compiled speed-up = eager time / `torch.compile` time of the same model"
        + ("; bf16 speed-up = float32 time / bf16 time. Peak memory: the step's peak allocation above the resident "
           "set, plus the model's own weights, optimizer state and the batch.)" if device.type == "cuda"
           else "; bf16 speed-up = float32 time / bf16 time.)"),
    ]
    return "\n".join(lines) + "\n"


def markers(name: str) -> tuple[str, str]:
    """This script's docs section for one device; a run on another device gets a section of its own."""
    return (f"<!-- begin: benchmarks/train_throughput.py, {name} (generated; rerun with --write-docs to replace) -->",
            f"<!-- end: benchmarks/train_throughput.py, {name} -->")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME[:JSON]",
                   help=f"timm names, each optionally with :{{json kwargs}} (default {' '.join(DEFAULT_MODELS)}); "
                        "ratios are taken against the first")
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"],
                   help="eager and/or torch.compile (default eager)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's own, 224 for *_224)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's own, 3 for *_224)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes (default: the model's own, 1000 for *_224)")
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", "fp32"],
                   help="bf16 = torch.autocast(bfloat16) over forward and loss; fp32 = no autocast; both: side by "
                        "side, with the bf16 speed-up (default bf16)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps of each variant first (default 5; at least 1, and 2 for compiled variants)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default: the GPU's dense bf16 peak by name; none on CPU or in fp32)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic batch (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, i.e. $OMP_NUM_THREADS if set, else all cores)")
    p.add_argument("--write-docs", nargs="?", const=str(DOCS), default=None, metavar="PATH",
                   help="write (or replace) this device's training-throughput section of docs/benchmarks.md "
                        "(or of PATH)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    for key in ("batch", "steps", "rounds"):
        if getattr(args, key) < 1:
            parser().error(f"--{key} must be >= 1")
    args.modes = list(dict.fromkeys(args.modes))
    args.precision = list(dict.fromkeys(args.precision))
    for spec in args.models:  # every model name and its keyword arguments, before any model is built
        try:
            parse_model(spec)
        except ValueError as e:  # (json's decode error is a ValueError)
            parser().error(f"--models {spec}: {e}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    device = pick_device(args.device)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    env = [f"OMP_NUM_THREADS={omp}"] if omp and args.threads is None else []
    command = shlex.join([*env, ".venv/bin/python", "benchmarks/train_throughput.py",
                          *(sys.argv[1:] if argv is None else argv)])
    section = render(rows, args, command, device, peak_tflops(args, device))
    print()
    print(section)
    if args.write_docs is not None:
        write_docs(Path(args.write_docs), section, *markers(device_name(device)))
        print(f"wrote {args.write_docs}")
    return rows


if __name__ == "__main__":
    main()
