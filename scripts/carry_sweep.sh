#!/usr/bin/env bash
# Carry a sweep's unfinished runs to another checkout through git. git ignores checkpoints, and the sweeps keep
# only their records (summary.json, analysis.json, metrics) in git, so a run still training when its machine goes
# would start again; a run that takes longer than one machine's stay would never end. This stages the checkpoint of
# every unfinished run, and unstages the checkpoints carried earlier whose runs have finished since. Stop the sweep
# first (on SIGTERM each process writes its run's checkpoint and exits), run this from the repository, commit:
#
#     pkill -TERM -f "experiments.sweep --sweep"; while pgrep -f "experiments.sweep --sweep" >/dev/null; do sleep 2; done
#     bash scripts/carry_sweep.sh [experiments/results/sweep_fashion] && git commit -m "..."
#
# Re-running the sweep command on the new checkout resumes the carried runs from their checkpoints.
set -euo pipefail
out="${1:-experiments/results/sweep_fashion}"
[ -d "$out" ] || { echo "carry_sweep: no sweep folder '$out'" >&2; exit 2; }

shopt -s nullglob
for ckpt in "$out"/*/seed*/checkpoint.pt; do
    run="$(dirname "$ckpt")"
    [ -f "$run/summary.json" ] && continue
    # a training process holds the run's flock (experiments.runs.hold_out_dir): its checkpoint is not final
    if ! flock -n "$run/.lock" true; then
        echo "carry_sweep: '$run' is still training; stop its sweep first (SIGTERM writes its checkpoint)" >&2
        exit 1
    fi
    git add -f "$ckpt"
    git add "$run/config.yaml" "$run/metrics.jsonl" $([ -f "$run/metrics.csv" ] && echo "$run/metrics.csv")
    echo "carry_sweep: staged $run ($(wc -l < "$run/metrics.jsonl") epochs logged)"
done
# checkpoints carried earlier whose runs have finished since (or whose folders are gone)
git ls-files "$out" | { grep '/checkpoint\.pt$' || true; } | while read -r ckpt; do
    if [ ! -f "$ckpt" ] || [ -f "$(dirname "$ckpt")/summary.json" ]; then
        git rm -q --cached "$ckpt"
        echo "carry_sweep: unstaged $ckpt (its run has finished)"
    fi
done
