"""Seeds x models (x any grid of config values) in one command, resumable, ending in mean +- std tables.

    python -m experiments.sweep --sweep experiments/configs/sweep_fashion.yaml [--table-only | --status]
                                [--only NAME] [--seeds K ...]

A sweep file names a base config, seeds, and runs: each run is a mapping of (dotted) config overrides, and may carry
a ``grid`` of keys to lists of values whose product expands it (``imixer`` with
``grid: {model_kwargs.n_iter: [1, 2, 4]}`` gives imixer[n_iter=1], ...). Every (run, seed) trains into
``<out_dir>/<run>/seed<k>``; a finished one (summary.json present) is skipped, a killed one resumes from its
checkpoint, so re-running the command after an interruption continues the sweep. A run is analysed the moment it
finishes (``experiments.analyze.run_record``: its ``analysis.json``), while its checkpoint is surely there: sweep
folders are kept without checkpoints, and a run's weights lost before its analysis are lost for good
(``scripts/carry_sweep.sh`` stages the checkpoints of unfinished runs, to resume them on another checkout). A
finished or killed run whose config differs from the sweep file's is an error, not silently reused. The tables
(markdown, like the iMixer paper's Tables 1-4) go to ``<out_dir>/results.md`` and stdout. A ``compare`` list of run
names adds, for each, a table of every other run's last test top-1 minus that run's, paired by seed: a seed fixes
the order and the augmentations of the training images for every run (``experiments.data.build_loaders``), so each
difference compares two models trained on the same data stream, with its 95 % CI and the TOST test of equivalence
within ``equivalence_margin`` points (default 0.5): "no difference" is claimed only where TOST says so. A ``pairs``
list of ``[run, reference]`` adds one table of just those differences, the contrasts a claim rests on (an ablation
arm against its own baseline at the same setting), and one of the same pairs seed by seed (``reports.seed_pairs``:
top-1, and the last block's token uniformity where the runs' analysis.json records it). Tables name each run's
machine (``machine``). "Best" is the maximum test top-1 over the epochs, "last" the final epoch's; the comparisons
use the last. ``--status`` lists how far every (run, seed) has got and the hours of training left at the speeds its
runs have shown so far, naming the machines those ran on against this one.

Several processes may run the same sweep at once and share its runs: each (run, seed) is claimed with an exclusive
``flock`` on ``<run dir>/.lock`` (released by the OS when its process exits, killed or not), and a claimed run is
skipped by the others. On a small CPU, N processes of OMP_NUM_THREADS=cores/N train more images per second in
total than one process using all cores (docs/benchmarks.md)::

    for i in 1 2; do OMP_NUM_THREADS=1 python -m experiments.sweep --sweep S.yaml & done; wait
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from derive import yamlio

from .analyze import IMAGES, run_record
from .build import check_model
from .config import (
    OPERATIONAL_KEYS,
    ConfigError,
    add_import_argument,
    config_diff,
    import_modules,
    load_config,
    read_yaml_mapping,
)
from .datafiles import CorruptDatasetError, DatasetNotFoundError
from .reports import EQUIVALENCE_MARGIN, machine, tables
from .runs import (
    CheckpointError,
    RunFileError,
    cpu_has_bf16_kernels,
    environment,
    hold_out_dir,
    median_images_per_s,
    read_jsonl,
    read_summary,
)
from .train import train

__all__ = ["check_spec", "expand", "load_sweep", "run_sweep", "status"]

SWEEP_KEYS = ("base", "out_dir", "seeds", "overrides", "runs", "compare", "pairs", "equivalence_margin")
SWEEP_OWNED = ("seed", "out_dir")  # config keys the sweep sets for each (run, seed)
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def load_sweep(path: str) -> dict:
    p = Path(path)
    spec = read_yaml_mapping(path, "sweep file")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"sweep file {str(p)!r}: unknown key {key!r} ({', '.join(SWEEP_KEYS)})")
    if not spec.get("runs"):
        raise ConfigError(f"sweep file {str(p)!r} lists no runs")
    try:
        check_spec(spec)
    except ConfigError as e:
        raise ConfigError(f"sweep file {str(p)!r}: {e}") from e
    return spec


def check_spec(spec: dict) -> None:
    """Each sweep key has the shape ``expand`` and ``run_sweep`` read; the error names the key."""
    def is_list(v, typ):
        return isinstance(v, list) and all(isinstance(x, typ) and not isinstance(x, bool) for x in v)

    seeds = spec.get("seeds", [0])
    if not is_list(seeds, int) or not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"key 'seeds' must be a non-empty list of distinct integers, got {spec['seeds']!r}")
    if not is_list(spec.get("overrides", []), str):
        raise ConfigError(f"key 'overrides' must be a list of key=value strings, got {spec['overrides']!r}")
    owned = [o for o in spec.get("overrides", []) if o.split("=", 1)[0].strip() in SWEEP_OWNED]
    if owned:
        raise ConfigError(f"key 'overrides': {owned} set what the sweep sets itself (seed from 'seeds', out_dir "
                          "from 'out_dir' and the run's name)")
    for key in ("base", "out_dir"):
        if not isinstance(spec.get(key, ""), str):
            raise ConfigError(f"key {key!r} must be a path, got {spec[key]!r}")
    if not isinstance(spec.get("runs"), dict):
        raise ConfigError(f"key 'runs' must map run names to config keys, got {spec.get('runs')!r}")
    for name, body in spec["runs"].items():
        if not (isinstance(name, str) and RUN_NAME.fullmatch(name)):
            raise ConfigError(f"run {name!r}: a run's name is its folder's: letters, digits, '_', '-' and '.', not "
                              "starting with '.'")
        if not isinstance(body, dict | None):
            raise ConfigError(f"run {name!r} must be a mapping of config keys, got {body!r}")
        grid = (body or {}).get("grid") or {}
        if not isinstance(grid, dict):
            raise ConfigError(f"run {name!r}: 'grid' must map config keys to lists of values, got {grid!r}")
        owned = [k for k in [*(body or {}), *grid] if k in SWEEP_OWNED]
        if owned:
            raise ConfigError(f"run {name!r}: {owned} are set by the sweep itself (seed from 'seeds', out_dir from "
                              "'out_dir' and the run's name)")
        for key, values in grid.items():
            if not (isinstance(values, list) and values):
                raise ConfigError(f"run {name!r}: grid key {key!r} must be a non-empty list of values, got {values!r}")
            dumped = [_dump(name, key, v) for v in values]
            if len(set(dumped)) < len(dumped):  # the second would be the first run again, silently dropped
                raise ConfigError(f"run {name!r}: grid key {key!r} lists a value twice: {values!r}")
        for key, value in (body or {}).items():
            if key != "grid":
                _dump(name, key, value)
    margin = spec.get("equivalence_margin", EQUIVALENCE_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
        raise ConfigError(f"key 'equivalence_margin' must be a number of points > 0, got {margin!r}")
    if not is_list(spec.get("compare", []), str):
        raise ConfigError(f"key 'compare' must be a list of run names, got {spec['compare']!r}")
    pairs = spec.get("pairs", [])
    if not (isinstance(pairs, list) and all(is_list(pair, str) and len(pair) == 2 for pair in pairs)):
        raise ConfigError(f"key 'pairs' must be a list of [run, reference] pairs of run names, got {pairs!r}")
    names = list(expand(spec))
    folders: dict[str, str] = {}
    for label in names:  # "imixer[n_iter=2]" trains in imixer_n_iter2/: a run named so would share its folder
        folder = _run_dir(Path(), label, 0).parent.name
        if folder in folders:
            raise ConfigError(f"runs {folders[folder]!r} and {label!r} would train into one folder, {folder!r}: "
                              "rename one of them")
        folders[folder] = label
    unknown = [c for c in spec.get("compare", []) if c not in names]
    if unknown:
        raise ConfigError(f"key 'compare': {unknown} not among the runs {names}")
    for pair in pairs:
        if unknown := [c for c in pair if c not in names]:
            raise ConfigError(f"key 'pairs': {pair} names {unknown}, not among the runs {names}")
        if pair[0] == pair[1]:
            raise ConfigError(f"key 'pairs': {pair} pairs a run with itself")


def _dump(run: str, key: str, value) -> str:
    """``value`` as JSON text (how an override carries it); ConfigError naming the run and key where YAML gave
    something JSON cannot hold (a ``!!binary`` or ``!!set``)."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        raise ConfigError(f"run {run!r}: config key {key!r} has a value that is not plain data (numbers, strings, "
                          f"lists, mappings): {value!r}") from None


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("grid",):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def expand(spec: dict) -> dict[str, list[str]]:
    """Run name -> the list of key=value overrides it applies on top of the base config."""
    runs = {}
    for name, body in spec["runs"].items():
        body = dict(body or {})
        grid = body.pop("grid", {}) or {}
        base = _flatten(body)
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            label = name + ("[" + ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values)) + "]"
                            if keys else "")
            runs[label] = base + [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)]
    return runs


def _check_finished(spec: dict, out: Path, runs: dict, seeds: list[int]) -> None:
    """A finished (run, seed) is only reused if it trained the config the sweep file asks for now: an edited sweep
    file must not mix old results into its tables under the new settings."""
    stale = []
    for name, overrides in runs.items():
        for seed in seeds:
            run_dir = _run_dir(out, name, seed)
            if not (run_dir / "summary.json").exists() or not (run_dir / "config.yaml").exists():
                continue
            cfg = load_config(spec.get("base"), list(spec.get("overrides", [])) + overrides + [f"seed={seed}"])
            diff = config_diff(yamlio.safe_load((run_dir / "config.yaml").read_text()) or {}, cfg,
                               ignore=OPERATIONAL_KEYS)
            if diff:
                stale.append(f"{run_dir}: " + "; ".join(diff))
    if stale:
        raise ConfigError("finished runs trained another config than the sweep file now asks for (move them away "
                          "or restore the sweep file):\n  " + "\n  ".join(stale))


def _summaries(out: Path, runs: dict, seeds: list[int]) -> dict[str, list[dict]]:
    found = {}
    for name in runs:
        rows = []
        for seed in seeds:
            d = _run_dir(out, name, seed)
            if (d / "summary.json").exists():
                row = {**read_summary(d), "seed": seed}
                if (d / "metrics.jsonl").exists():  # the same median for summaries written when it was the mean
                    row["images_per_s"] = median_images_per_s(read_jsonl(d / "metrics.jsonl"))
                if (d / "analysis.json").exists():  # token uniformity by depth, for `seed_pairs` (ViT runs)
                    rank = read_summary(d, "analysis.json").get("rank_collapse")
                    if rank:
                        row["rank_collapse"] = rank
                rows.append(row)
        found[name] = rows
    return found


def _run_dir(out: Path, name: str, seed: int) -> Path:
    return out / name.replace("[", "_").replace("]", "").replace(",", "_").replace("=", "") / f"seed{seed}"


def status(spec: dict) -> str:
    """Markdown: each (run, seed) with the epochs it has logged, its last test top-1, and the hours left to train
    it: its remaining epochs times the run's median wall time per epoch (the evaluation included; an epoch
    stretched by a paused process or a kill moves it little), taken over the epochs of its seed logged last, since
    the machine's load changes between sessions; "?" while none of its seeds has logged one. For unfinished runs,
    how long ago their checkpoint was written: a run in training writes one every epoch (and every
    ``checkpoint_minutes``), so a recent one marks a run in progress. Ends with the sum, the machines the finished
    runs ran on against this one (their speeds need not hold on another), and a warning where the sweep asks for
    bf16 autocast on a CPU without bf16 kernels, where it trains at a fraction of float32's speed."""
    out = Path(spec.get("out_dir", "runs/sweep")).expanduser()
    seeds = list(spec.get("seeds", [0]))
    lines = ["| run | seed | epochs | last test top-1 (%) | hours left | checkpoint written |",
             "|---|---|---|---|---|---|"]
    left, unmeasured, now = 0.0, 0, time.time()
    finished_on, bf16 = collections.Counter(), False
    for name, overrides in expand(spec).items():
        cfg = load_config(spec.get("base"), list(spec.get("overrides", [])) + overrides)
        bf16 |= cfg.amp == "bf16"
        total = cfg.epochs + cfg.cooldown_epochs
        dirs = {seed: _run_dir(out, name, seed) for seed in seeds}
        logs = {seed: read_jsonl(d / "metrics.jsonl") for seed, d in dirs.items()}
        logged = [seed for seed, h in logs.items() if h]
        latest = max(logged, key=lambda seed: (dirs[seed] / "metrics.jsonl").stat().st_mtime, default=None)
        per_epoch = None if latest is None else statistics.median(
            b["wall_s"] - a.get("wall_s", 0.0) for a, b in zip([{}, *logs[latest]], logs[latest]))
        for seed, h in logs.items():
            done = total if (dirs[seed] / "summary.json").exists() else len(h)
            if (dirs[seed] / "summary.json").exists() and (env := read_summary(dirs[seed]).get("env")):
                finished_on[machine({"env": env})] += 1
            if done == total:
                hours = "–"
            elif per_epoch is None:
                hours, unmeasured = "?", unmeasured + 1
            else:
                hours = (total - done) * per_epoch / 3600
                left += hours
                hours = f"{hours:.1f}"
            top1 = f"{h[-1]['test_top1']:.2f}" if h else "–"
            ckpt, written = dirs[seed] / "checkpoint.pt", "–"
            if done < total and ckpt.exists():
                age = max(now - ckpt.stat().st_mtime, 0.0)
                written = f"{age / 60:.0f} min ago" if age < 5400 else f"{age / 3600:.1f} h ago"
            lines.append(f"| {name} | {seed} | {done} of {total} | {top1} | {hours} | {written} |")
    lines.append(f"\n{left:.1f} hours of training left" + (f", plus {unmeasured} runs of unmeasured speed"
                                                          if unmeasured else "") +
                 " (one process's hours: several processes share them)")
    gpu = torch.cuda.is_available()
    here = machine({"env": environment("cuda" if gpu else "cpu")})
    if finished_on:
        ran_on = "; ".join(f"{m} ({n} run{'s' * (n > 1)})" for m, n in finished_on.most_common())
        lines.append(f"Finished runs ran on: {ran_on}. This machine: {here}" +
                     ("." if here in finished_on else ", which none of them ran on: the hours above are their "
                                                      "speeds, not this machine's."))
    else:
        lines.append(f"This machine: {here}.")
    if bf16 and not gpu and not cpu_has_bf16_kernels():
        lines.append("warning: the sweep asks for amp=bf16, and this CPU has no oneDNN bf16 kernels: bf16 autocast "
                     "trains at 0.07-0.13x float32's speed here (docs/benchmarks.md); run the sweep on a CPU with bf16 "
                     "kernels, or change its amp for every seed (runs of one comparison should share a precision).")
    return "\n".join(lines)


def run_sweep(spec: dict, only: list[str] | None = None, table_only: bool = False,
              seeds: list[int] | None = None) -> str:
    """Train every (run, seed) not finished yet, seed-major; ``only``/``seeds`` restrict what is trained (the
    tables always cover all the sweep's seeds), so ``seeds=[0]`` gives a first full row of results early."""
    check_spec(spec)
    out = Path(spec.get("out_dir", "runs/sweep")).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep key 'out_dir': {str(out)!r} is a file, not a folder")
    all_seeds = list(spec.get("seeds", [0]))
    runs = expand(spec)
    unknown = [o for o in (only or []) if o not in runs]
    if unknown:
        raise ConfigError(f"--only {unknown}: not in this sweep's runs {list(runs)}")
    unknown = [s for s in (seeds or []) if s not in all_seeds]
    if unknown:
        raise ConfigError(f"--seeds {unknown}: not in this sweep's seeds {all_seeds}")
    _check_finished(spec, out, runs, all_seeds)
    if not table_only:
        for overrides in runs.values():  # validate every config and model before training anything
            check_model(load_config(spec.get("base"), list(spec.get("overrides", [])) + overrides))
        for seed in seeds or all_seeds:
            for name, overrides in runs.items():
                if only and name not in only:
                    continue
                run_dir = _run_dir(out, name, seed)
                if (run_dir / "summary.json").exists() and (run_dir / "analysis.json").exists():
                    continue
                stopped = False
                with hold_out_dir(run_dir) as mine:
                    if not mine:
                        print(f"== {name} seed {seed}: another process is training it, skipped", flush=True)
                        continue
                    if not (run_dir / "summary.json").exists():  # (another process may have finished it meanwhile)
                        cfg = load_config(spec.get("base"), list(spec.get("overrides", [])) + overrides +
                                          [f"seed={seed}", f"out_dir={json.dumps(str(run_dir))}"])
                        print(f"== {name} seed {seed} -> {run_dir}", flush=True)
                        stopped = bool(train(cfg, resume=(run_dir / "checkpoint.pt").exists()).get("stopped"))
                    if not stopped:  # also a run whose process was killed between its end and its analysis
                        _analyse(run_dir)
                if stopped:
                    print("sweep stopped; run the same command again to continue", flush=True)
                    break
            else:
                continue
            break
    summaries = _summaries(out, runs, all_seeds)
    md = tables(summaries, spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md + "\n")
    print(md)
    return md


def _analyse(run_dir: Path) -> None:
    """Write a finished run's ``analysis.json`` from its checkpoint, unless it is there already. A failure is
    reported, not raised: the run's checkpoint stays, so ``experiments.analyze`` can retry, and the sweep goes on."""
    if (run_dir / "analysis.json").exists() or not (run_dir / "checkpoint.pt").exists():
        return
    try:
        run_record(run_dir, IMAGES)
    except Exception as e:  # any analysis bug: it must not stop hours of training
        print(f"warning: {run_dir}: analysis failed ({e!r}); its checkpoint.pt is kept: run "
              f"python -m experiments.analyze --runs {run_dir} to retry", file=sys.stderr, flush=True)
        return
    print(f"== {run_dir}: analysis.json written", flush=True)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="sweep YAML file")
    p.add_argument("--only", nargs="*", help="run names to train (default: all)")
    p.add_argument("--seeds", nargs="*", type=int, help="seeds to train, a subset of the sweep's (default: all)")
    add_import_argument(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--table-only", action="store_true", help="only collect finished runs into the tables")
    mode.add_argument("--status", action="store_true", help="only show how far each run has got and the hours left")
    args = p.parse_args(argv)
    try:
        import_modules(args.imports)
        if args.status:
            md = status(load_sweep(args.sweep))
            print(md)
            return md
        return run_sweep(load_sweep(args.sweep), args.only, args.table_only, args.seeds)
    except ConfigError as e:
        p.error(str(e))
    except (CheckpointError, RunFileError, DatasetNotFoundError, CorruptDatasetError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
