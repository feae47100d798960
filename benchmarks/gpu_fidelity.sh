#!/usr/bin/env bash
# The fidelity runs of README "ED-ViT: class-wise pruning at the defaults", in one pass on a CUDA machine: the
# original's recipe (default, no augmentation, twice the epochs), the default builds for
# N = 2, 3, 5, 10 from the default-recipe original, the N=10 ablation, and the medium preset
# at N=10 for latency. Every build is a plain `edvit build` with --checkpoint and --device.
#
#   DEVICE=cuda OUT=/tmp/fidelity benchmarks/gpu_fidelity.sh
#
# Runs the jobs side by side and stops at DEADLINE seconds, packing what finished into $OUT.
# SMOKE=1 runs the same steps on digits for a few seconds each (checks the script on a CPU).
#
# Measured on one H200 (2026-11-29): four trainings side by side ran ~50 steps/s each (8.6 s
# per Fashion-MNIST epoch): these models are too small to keep a GPU busy, so per-step Python
# and launch overhead set the pace. Phase A took 345 s and the builds of phase B did not
# finish in a 490 s deadline; give this script about 25 minutes of device time.
set -u
OUT=${OUT:?set OUT to a folder}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-500}
PY=${PY:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
    DATASET=digits; DATA=(); EPOCHS=1; MEDIUM_EPOCHS=1; SHORT=(--sub-steps 20 --recover-epochs 1)
    LONG=(--sub-steps 40); MEDIUM=test; MEDIUM_N=3
else
    DATASET=fashion-mnist; DATA=(--data-dir "${DATA_DIR:-.devdata/fashion-mnist}"); EPOCHS=40
    MEDIUM_EPOCHS=40; SHORT=(); LONG=(--sub-steps 6000); MEDIUM=medium; MEDIUM_N=10
fi
R=$OUT/runs
mkdir -p "$R"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[fidelity $(elapsed)s] $*"; }
common=(--dataset "$DATASET" "${DATA[@]}" --device "$DEVICE" --threads 1)

# Phase A: the original's recipe.
recipe() { # name, flags...
    local name=$1; shift
    $PY benchmarks/original_recipe.py "${common[@]}" --out "$R/$name.pt" --json "$R/$name.json" "$@" > "$R/$name.log" 2>&1
}
recipe orig-small --epochs $EPOCHS &
recipe orig-small-noaug --epochs $EPOCHS --augment-shift 0 --augment-flip no &
recipe orig-small-2x --epochs $((2 * EPOCHS)) &
recipe orig-medium --size $MEDIUM --epochs $MEDIUM_EPOCHS &
say "phase A started"

wait_for() { # file: wait until it exists or the deadline passes
    while [ ! -s "$1" ]; do
        [ "$(elapsed)" -ge "$DEADLINE" ] && return 1
        sleep 2
    done
}

build() { # name, checkpoint, flags...
    local name=$1 checkpoint=$2; shift 2
    $PY -m edvit.cli build "${common[@]}" --checkpoint "$checkpoint" --out "$R/$name" --force "$@" \
        > "$R/$name.log" 2>&1
    say "$name finished (rc $?)"
}

# Phase B: the default builds and the N=10 ablation, from the default-recipe original.
(
    wait_for "$R/orig-small.json" || exit 0
    say "orig-small: $(cat "$R/orig-small.json")"
    params=$($PY -c "import torch,sys; print(sum(v.numel() for v in torch.load(sys.argv[1]).values()))" "$R/orig-small.pt")
    ck=$R/orig-small.pt
    build fm-3 "$ck" --num-devices 3 "${SHORT[@]}" &
    build fm-2 "$ck" --num-devices 2 "${SHORT[@]}" &
    build fm-5 "$ck" --num-devices 5 "${SHORT[@]}" &
    build fm-10 "$ck" --num-devices 10 "${SHORT[@]}" &
    build fm-10-b20 "$ck" --num-devices 10 --param-budget $((params * 10 / 205)) "${SHORT[@]}" &
    build fm-10-b20-long "$ck" --num-devices 10 --param-budget $((params * 10 / 205)) "${LONG[@]}" &
    build fm-10-b34-long "$ck" --num-devices 10 --param-budget $((params * 10 / 345)) "${LONG[@]}" &
    wait
) &
# Phase C: the medium preset at N=10, for latency where compute dominates.
(
    wait_for "$R/orig-medium.json" || exit 0
    say "orig-medium: $(cat "$R/orig-medium.json")"
    build medium-10 "$R/orig-medium.pt" --size $MEDIUM --num-devices $MEDIUM_N "${SHORT[@]}"
) &

while [ "$(elapsed)" -lt "$DEADLINE" ] && [ -n "$(jobs -rp)" ]; do sleep 5; done
say "packing (still running: $(jobs -rp | wc -l) jobs)"
nvidia-smi --query-gpu=name,memory.used --format=csv > "$R/gpu.txt" 2>&1
cd "$R" || exit 1
# At most 8 files come back, 16 MiB each: the small runs in two packs, medium without weights.
tar czf "$OUT/originals.tgz" orig-small*.pt orig-small*.json orig-medium.json ./*.log gpu.txt 2>/dev/null
tar czf "$OUT/defaults.tgz" --exclude=original.pt fm-2 fm-3 fm-5 fm-10 2>/dev/null
tar czf "$OUT/ablation.tgz" --exclude=original.pt fm-10-b* 2>/dev/null
tar czf "$OUT/medium.tgz" --exclude='*.pt' --exclude='*.onnx' medium-10 2>/dev/null
ls -la "$OUT"
say "done"
