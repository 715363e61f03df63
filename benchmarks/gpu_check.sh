#!/usr/bin/env bash
# The GPU check: one command for a lent H100/H200, under 8 minutes, writing one section of docs/benchmarks.md
# (and a copy, with the run's raw files, under $OUT when the device tool sets it).
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh             # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run                # tiny sizes on CPU: the test suite runs it so it cannot rot
#
# Stages, each under its own time limit so that one slow stage cannot eat the others' (what finished is written):
#   1. simulation of the Mixer-S-size network, float32 (benchmarks/simulate_vs_hamux.py --scale on the GPU);
#   2. training throughput, bf16, eager and compiled, with model-FLOPs utilisation, of Mixer-S/16, iMixer-S/16,
#      the parallelized Mixer S/16 and the ViT-S/16 with and without MHA at 224 (benchmarks/train_throughput.py;
#      eager and compiled are two stages, so that slow compilations cannot take the eager table with them);
#   3. a 2-epoch Fashion-MNIST run of the derived iMixer (experiments.train, bf16, compiled). It needs the data:
#      carry data/fashion (the four raw .gz files; the device tool copies ignored paths named in `carry`), or
#      set FASHION_ROOT. Without it the stage is skipped and says so.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="${PYTHONPATH:-.}"
OUT="${OUT:-$(mktemp -d)}"
DOC="${GPU_CHECK_DOC:-docs/benchmarks.md}"
SECTION="$OUT/gpu_check.md"
mkdir -p "$OUT"

if [ $DRY = 1 ]; then
    DEVICE=cpu; LIMIT_SIM=120; LIMIT_EAGER=300; LIMIT_COMPILE=300; LIMIT_FASHION=300
    GPU="CPU dry run"
    SIM=(--scale --rounds 1 --device cpu --tiny)
    TRAIN=(--device cpu --models vmixer_t4_28 imixer_t4_28 --img-size 28 --in-chans 1 --num-classes 10
           --batch 4 --precision bf16 --warmup 1 --steps 1 --rounds 1)
    MODES=(eager)
    FASHION=(epochs=1 data.train_subset=256 data.test_subset=128 batch_size=64 amp=off compile=false
             "model_kwargs={embed_dim: 32, num_blocks: 2, h_ratio: 2, n_iter: 2}")
else
    DEVICE=cuda; LIMIT_SIM=60; LIMIT_EAGER=60; LIMIT_COMPILE=210; LIMIT_FASHION=120
    GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
    SIM=(--scale --rounds 3 --device cuda)
    VIT='{"img_size":224,"in_chans":3,"num_classes":1000,"patch_size":16,"embed_dim":384,"num_heads":6}'
    TRAIN=(--device cuda --models vmixer_s16_224 imixer_s16_224 paramixer_s16_224 "hvit_s4_32:$VIT"
           "mhavit_s4_32:$VIT" --batch 128 --precision bf16 --warmup 3 --steps 10 --rounds 3)
    MODES=(eager compile)
    FASHION=(epochs=2 amp=bf16 compile=true)
fi

{
    echo "## GPU check: $GPU ($(date -u +%F))"
    echo
    echo "Command: \`PYTHONPATH=. bash benchmarks/gpu_check.sh$([ $DRY = 1 ] && echo ' --dry-run')\`; torch $("$PY" -c 'import torch; print(torch.__version__)')."
    echo
} > "$SECTION"

stage() {  # stage NAME LIMIT COMMAND...: run it, keep its output, note a timeout or failure in the section
    local name=$1 limit=$2; shift 2
    echo "[gpu_check] $name" >&2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc = 124 ]; then echo "- $name: stopped at its limit of $limit s" >> "$SECTION";
    elif [ $rc != 0 ]; then echo "- $name: failed (exit $rc; last lines below)" >> "$SECTION"; tail -5 "$OUT/$name.log" | sed 's/^/    /' >> "$SECTION"; fi
    return 0
}

stage simulation $LIMIT_SIM "$PY" benchmarks/simulate_vs_hamux.py "${SIM[@]}"
sed -n '/^## Simulation at scale/,$p' "$OUT/simulation.log" | sed 's/^## /### /' >> "$SECTION"

# eager and compiled in stages of their own: five compilations may outlast their limit, and the eager table stays
for mode in "${MODES[@]}"; do
    limit=LIMIT_${mode^^}
    stage "training_$mode" "${!limit}" "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --modes "$mode" \
        --write-docs "$OUT/training_$mode.md"
    # the table alone (train_throughput writes it between markers, under a file heading when the file is new)
    [ -f "$OUT/training_$mode.md" ] && sed -n '/^<!-- begin/,/^<!-- end/p' "$OUT/training_$mode.md" \
        | grep -v '^<!--' | sed "s/^## \(.*\)/### \1, $mode/" >> "$SECTION"
done

ROOT_ARG=()
if [ -n "${FASHION_ROOT:-}" ]; then ROOT_ARG=("data.root=$FASHION_ROOT");
elif [ -d data/fashion ]; then ROOT_ARG=("data.root=data/fashion"); fi
if [ $DRY = 1 ] || [ ${#ROOT_ARG[@]} -gt 0 ]; then
    stage fashion $LIMIT_FASHION "$PY" -m experiments.train --config experiments/configs/fashion_small.yaml \
        "${FASHION[@]}" "${ROOT_ARG[@]}" device=$DEVICE progress=false out_dir="$OUT/fashion_imixer"
    if [ -f "$OUT/fashion_imixer/summary.json" ]; then
        "$PY" - "$OUT/fashion_imixer/summary.json" >> "$SECTION" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"\n### Fashion-MNIST, derived iMixer, {s['epochs']} epochs ({s['precision']})\n")
print(f"- last test top-1 {s['last_top1']:.2f} %, {s['images_per_s']:.0f} images/s (median epoch), "
      f"{s['wall_s']:.0f} s wall, on {s['env']['hardware']}\n")
EOF
    fi
else
    echo "- fashion: skipped, no Fashion-MNIST here (carry data/fashion or set FASHION_ROOT)" >> "$SECTION"
fi

{ echo; cat "$SECTION"; } >> "$DOC"
echo "[gpu_check] wrote $DOC and $SECTION" >&2
