#!/usr/bin/env bash
# Every CPU figure of docs/performance.md in one pass, on an otherwise idle machine:
#   OUT=cpu_out bash scripts/cpu_measurements.sh
# One thread and processor time (--threads 1 --clock cpu): the work done, which other
# processes disturb least. Each step has its own time limit and its own output file.
set -u
OUT=${OUT:-cpu_out}
source "$(dirname "$0")/measure_steps.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
{ uname -m; nproc; uptime
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } > "$OUT/machine.txt" 2>&1
LAYER_AREAS=L1LayerNorm,TopKLayerNorm,L1GroupNorm,TopKGroupNorm,L1InstanceNorm2d,TopKInstanceNorm2d,L1BatchNorm2d,TopKBatchNorm2d,DivisiveNorm1d
step norms_eager ${NORMS_S:-900} $PY scripts/bench_norms.py --device cpu --threads 1 --reps 20 \
  --json "$OUT/norms_cpu_eager.json" --markdown
step norms_compiled ${NORMS_COMPILED_S:-1500} $PY scripts/bench_norms.py --device cpu --threads 1 --reps 20 \
  --compile --only "$LAYER_AREAS" --json "$OUT/norms_cpu_compiled.json" --markdown
$PY scripts/bench_norms.py --from-json "$OUT/norms_cpu_eager.json" "$OUT/norms_cpu_compiled.json" \
  --markdown --plot "$OUT/norms_cpu.png" > "$OUT/norms_table.md"
step step_r18 ${STEP_S:-900} $PY scripts/bench_train_step.py --models resnet18 --no-compile --reps 6 \
  --threads 1 --clock cpu --json "$OUT/step_cpu_resnet18.json"
step step_r50 ${STEP_S:-900} $PY scripts/bench_train_step.py --models resnet50 --no-compile --reps 4 \
  --presets l1bn topkbn 'bn*' 'dn*' meanonly iternorm bwn --threads 1 --clock cpu --json "$OUT/step_cpu_resnet50.json"
step step_small ${STEP_S:-900} $PY scripts/bench_train_step.py --models vit_tiny_patch16_224 convnext_atto \
  efficientnet_b0 --no-compile --reps 6 --threads 1 --clock cpu --json "$OUT/step_cpu_small_models.json"
step step_compiled ${COMPILED_S:-1800} $PY scripts/bench_train_step.py --models resnet18 --compiled-only \
  --reps 8 --batch 16 --presets l1bn topkbn 'bn*' 'dn*' meanonly iternorm bwn --threads 1 --clock cpu \
  --json "$OUT/step_cpu_resnet18_compiled.json"
$PY scripts/bench_train_step.py --from-json "$OUT/step_cpu_resnet18.json" "$OUT/step_cpu_resnet50.json" \
  "$OUT/step_cpu_resnet18_compiled.json" "$OUT/step_cpu_small_models.json" --plot "$OUT/train_step_cpu.png" > /dev/null
cat "$OUT/steps.txt"
