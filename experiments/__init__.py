"""Training and analysing the derived models: command-line entry points and the modules behind them.

Entry points (``python -m experiments.<name> --help``):

- `main`: the main job (simulate the iMixer's network, derive its block, a short training run).
- `train`: any registered model from a YAML config and ``key=value`` overrides; resumable, DDP.
- `sweep`: seeds x models x grids from a sweep file, resumable by several processes; mean ± std and paired tables.
- `analyze`: fixed points, energy, weight symmetry and rank collapse of finished runs.
- `verify_specs`: ``derive.verify`` on every network spec of a folder.
- `rank_collapse_init`: rank collapse of freshly initialised ViTs.

Modules: `config` (``TrainConfig``), `build` (a run's model, weight-decay groups and device, checked before it
starts), `data` (transforms, subsets, loaders), `datafiles` (datasets read from disk, checked), `runs` (a run's
folder: lock, atomic writes, checkpoint and resuming, logs, environment), `analysis` (fixed points, energy, curves,
rank collapse), `symmetry` (the weight-symmetry index), `reports` (cross-run reports: a sweep's tables, paired
differences with TOST, symmetry trajectories, certificates), `figures` (plot and table helpers).
"""
