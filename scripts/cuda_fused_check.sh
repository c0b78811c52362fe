#!/usr/bin/env bash
# The CUDA figures of the opt-in fused training forward (normswap.norms.fused) in one
# short pass:
#   OUT=cuda_out bash scripts/cuda_fused_check.sh
# (the op-by-op figures are cuda_measurements.sh's). The layer step prints each layer's
# warm-up time (its compilation) as it goes, so a run cut short still says how long the
# first compiles took. DEV=cpu QUICK=1 checks the script itself without a GPU.
set -u
if [ "${DEV:-cuda}" = cpu ]; then export NORMSWAP_FUSED=cpu; else export NORMSWAP_FUSED=1; fi
OUT=${OUT:-cuda_out}
DEV=${DEV:-cuda}
source "$(dirname "$0")/measure_steps.sh"
Q=${QUICK:+1}
reps() { if [ -n "$Q" ]; then echo 2; else echo "$1"; fi; }
S="--batch 64 --size 128"
[ -n "$Q" ] && S="--batch 8 --size 64"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt" 2>&1
step fused_norms 150 $PY scripts/bench_norms.py --device $DEV --reps $(reps 30) --json "$OUT/fused_norms.json" --markdown \
  --only 'L1BatchNorm2d,TopKBatchNorm2d,BatchNormStar2d,MeanOnly,IterNorm,DivisiveNorm,L1LayerNorm(C),L1GroupNorm'
step fused_step 90 $PY scripts/bench_train_step.py --device $DEV $S --dtype fp32 --no-compile --reps $(reps 15) \
  --models resnet50 --presets l1bn 'bn*' bwn --json "$OUT/fused_step.json"
step compiled_l1bn 45 $PY scripts/bench_norms.py --device $DEV --reps $(reps 30) --compile --only L1BatchNorm2d \
  --json "$OUT/compiled_l1bn.json" --markdown
step compiled_step 55 $PY scripts/bench_train_step.py --device $DEV $S --dtype fp32 --compiled-only --reps $(reps 15) \
  --models resnet18 --presets 'bn*' --json "$OUT/compiled_step.json"
cat "$OUT/steps.txt"
