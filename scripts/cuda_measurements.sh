#!/usr/bin/env bash
# Every CUDA figure of docs/performance.md, on a machine with one GPU:
#   OUT=cuda_out bash scripts/cuda_measurements.sh            # layers and steps, at most 9.5 minutes
#   OUT=cuda_out PART=1 bash scripts/cuda_measurements.sh     # layers only (at most 4.5 minutes)
#   OUT=cuda_out PART=2 bash scripts/cuda_measurements.sh     # training steps (at most 5 minutes)
#   OUT=cuda_out PART=all-half bash ...                       # also the fp16 / bf16 steps (+2 min)
#   OUT=cuda_out PART=changed bash ...                        # what changed since the last run (4 min)
# Each step has its own time limit, so a slow step cannot take the others' results with it;
# the limits are what the H200 run of 2026-11-27 needed (that run's shorter limits cut the
# half-precision layer tables, the compiled layers, convnext_atto and most compiled steps).
# DEV=cpu QUICK=1 runs the same steps on the CPU with few repetitions: a check of the
# script itself before spending GPU time (fp16 steps are skipped there).
set -u
OUT=${OUT:-cuda_out}
DEV=${DEV:-cuda}
source "$(dirname "$0")/measure_steps.sh"
Q=${QUICK:+1}
reps() { if [ -n "$Q" ]; then echo 2; else echo "$1"; fi; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  nproc; } > "$OUT/machine.txt" 2>&1
PART=${PART:-all}
if [ "$PART" = changed ]; then
# only what changed since the last device run (2026-11-27 19:00 UTC; about 4 minutes):
# IterNorm's Triton Newton kernels, the fixed-sigma layers with half-precision input,
# DivisiveNorm1d's saved memory and pooled box sums
[ "$DEV" = cuda ] && step probe 30 $PY scripts/cuda_probe.py
step changed_norms_fp32 40 $PY scripts/bench_norms.py --device $DEV --reps $(reps 30) \
  --only 'IterNorm,DivisiveNorm1d,Star' --json "$OUT/changed_norms_fp32.json" --markdown
step changed_norms_bf16 40 $PY scripts/bench_norms.py --device $DEV --reps $(reps 30) --dtype bf16 \
  --only 'IterNorm,DivisiveNorm1d,Star' --json "$OUT/changed_norms_bf16.json" --markdown
step changed_step 150 $PY scripts/bench_train_step.py --device $DEV --batch 64 --size 128 --reps $(reps 15) \
  --models resnet18 --presets iternorm --json "$OUT/changed_step.json"
cat "$OUT/steps.txt"
exit 0
fi
# Ordered by what the targets need first, each step under its own limit (sum: 9.5 minutes),
# so that one call of the device tool brings back the most with PACK set.
[ "$DEV" = cuda ] && step probe 30 $PY scripts/cuda_probe.py
if [ "$PART" != 2 ]; then
# layers: eager fp32, then compiled (the L1BatchNorm2d target), later the half-precision tables
step norms_fp32 70 $PY scripts/bench_norms.py --device $DEV --reps $(reps 30) --json "$OUT/norms_fp32.json" --markdown
step norms_compiled 100 $PY scripts/bench_norms.py --device $DEV --reps $(reps 30) --compile \
  --only L1BatchNorm2d,TopKBatchNorm2d,BatchNormStar2d --json "$OUT/norms_compiled.json" --markdown
fi
# training steps of the converted timm models, batch 64 at 128x128
S="--batch 64 --size 128"
[ -n "$Q" ] && S="--batch 8 --size 64"
if [ "$PART" != 1 ]; then
step step_compiled 150 $PY scripts/bench_train_step.py --device $DEV $S --dtype fp32 --compiled-only --reps $(reps 15) \
  --models resnet18 --presets 'bn*' bwn topkbn l1bn meanonly --json "$OUT/step_compiled.json"
step step_fp32 130 $PY scripts/bench_train_step.py --device $DEV $S --dtype fp32 --no-compile --reps $(reps 10) \
  --json "$OUT/step_fp32.json"
fi
if [ "$PART" != 2 ]; then
step norms_bf16 45 $PY scripts/bench_norms.py --device $DEV --reps $(reps 20) --dtype bf16 --json "$OUT/norms_bf16.json" --markdown
[ "$DEV" = cuda ] && step norms_fp16 45 $PY scripts/bench_norms.py --device $DEV --reps $(reps 20) --dtype fp16 \
  --json "$OUT/norms_fp16.json" --markdown
fi
if [ "$PART" = all-half ]; then
step step_bf16 60 $PY scripts/bench_train_step.py --device $DEV $S --dtype bf16 --no-compile --reps $(reps 15) \
  --models resnet50 vit_tiny_patch16_224 convnext_atto --presets l1bn topkbn 'bn*' bwn l1 'ln*' --json "$OUT/step_bf16.json"
[ "$DEV" = cuda ] && step step_fp16 60 $PY scripts/bench_train_step.py --device $DEV $S --dtype fp16 --no-compile \
  --reps $(reps 15) --models resnet50 vit_tiny_patch16_224 convnext_atto --presets l1bn topkbn 'bn*' bwn l1 'ln*' \
  --json "$OUT/step_fp16.json"
fi
cat "$OUT/steps.txt"
