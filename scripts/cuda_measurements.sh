#!/usr/bin/env bash
# Every CUDA figure of docs/performance.md in one pass, on a machine with one GPU:
#   OUT=cuda_out bash scripts/cuda_measurements.sh
# Each step has its own time limit, so a slow step cannot take the others' results
# with it. Also runs the timm zoo coverage on the machine's CPU cores (it needs no GPU).
set -u
OUT=${OUT:-cuda_out}
source "$(dirname "$0")/measure_steps.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
  nproc; } > "$OUT/machine.txt" 2>&1
NP=$(( $(nproc) - 1 ))
step zoo_l1 ${ZOO_S:-100} $PY scripts/zoo_coverage.py --spec l1 --skip-trace --forward --workers $NP --out "$OUT/zoo_l1"
step zoo_bwn ${ZOO_S:-100} $PY scripts/zoo_coverage.py --spec '{"preset": "bwn", "kwargs": {"fallback": "l1"}}' \
  --skip-trace --workers $NP --out "$OUT/zoo_bwn_l1"
step norms_cuda 60 $PY scripts/bench_norms.py --device cuda --json "$OUT/norms_cuda.json" --markdown
step step_fp32 110 $PY scripts/bench_train_step.py --device cuda --dtype fp32 --no-compile --reps 20 \
  --presets l1bn topkbn 'bn*' 'dn*' bwn l1 topk 'ln*' iternorm --json "$OUT/step_fp32.json"
step step_bf16 50 $PY scripts/bench_train_step.py --device cuda --dtype bf16 --no-compile --reps 20 \
  --models resnet50 vit_tiny_patch16_224 --presets l1bn topkbn 'bn*' bwn l1 'ln*' --json "$OUT/step_bf16.json"
step step_fp16 50 $PY scripts/bench_train_step.py --device cuda --dtype fp16 --no-compile --reps 20 \
  --models resnet50 vit_tiny_patch16_224 --presets l1bn topkbn 'bn*' bwn l1 'ln*' --json "$OUT/step_fp16.json"
step step_compiled 120 $PY scripts/bench_train_step.py --device cuda --dtype fp32 --compiled-only --reps 20 \
  --models resnet18 --presets l1bn topkbn 'bn*' bwn --json "$OUT/step_compiled.json"
cat "$OUT/steps.txt"
