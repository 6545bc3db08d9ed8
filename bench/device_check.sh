#!/usr/bin/env bash
# Every benchmark that matters on an accelerator, in one go, within ~8 minutes.
#
#   bench/device_check.sh                       # on a GPU/TPU machine, from the repo root
#   PEAK_TFLOPS=989 DATASET=/data/ds bench/device_check.sh
#   DRY_RUN=1 bench/device_check.sh             # CPU: tiny shapes, checks the script runs
#
# 1. ResNet50 + heads train step at the paper's 48×192×192, bfloat16, for growing batch
#    sizes until one does not fit (out of memory) or the time budget is spent: step time,
#    volumes/s, XLA's FLOPs per step and MFU = achieved FLOP/s / PEAK_TFLOPS per device.
# 2. For each of those runs, the real input pipeline (Grain + TensorStore over DATASET,
#    or a random dataset of the paper's shape when DATASET is unset): loader_ratio =
#    step time fed by the loader / step time on a batch already on the device (≤ 1.05:
#    the loader keeps up).
# 3. Predict throughput: the inference forward pass (what the predict task runs),
#    volumes/s and its MFU, in the same runs (--predict).
# Output: JSON lines on stdout and in $OUT (default runs/device_check/), one file per run.
# PEAK_TFLOPS: dense bf16 peak of one device; guessed from the device name when unset
# (H100/H200 SXM 989, A100 312, L4 121, TPU v4 275, v5e 197, v5p 459, v6e 918).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/device_check}
BUDGET_S=${BUDGET_S:-450}            # stop starting new runs after this (8 min in all)
BATCHES=${BATCHES:-"1 2 4 8 16"}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
start=$(date +%s)

if [ "${DRY_RUN:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SHAPE=16,64,64; BATCHES=${DRY_BATCHES:-"1 2"}; STEPS=2
  CONFIG="configs/pretrain.py:depth=18"; EXTRA=(--config.model.width=8)
else
  SHAPE=48,192,192
  CONFIG="configs/pretrain.py"; EXTRA=()
fi

if [ -z "${PEAK_TFLOPS:-}" ]; then
  PEAK_TFLOPS=$($PY - <<'EOF'
import jax
kind = jax.devices()[0].device_kind.lower()
table = [("h200", 989), ("h100", 989), ("a100", 312), ("l4", 121), ("v6", 918), ("v5p", 459),
         ("v5 lite", 197), ("v5e", 197), ("v4", 275)]
print(next((str(v) for k, v in table if k in kind), "0"))
EOF
)
fi
echo "{\"bench\": \"device_check\", \"peak_tflops\": ${PEAK_TFLOPS:-0}, \"shape\": \"$SHAPE\", \"dataset\": \"${DATASET:-random}\"}"

dataset_flag=()
[ -n "${DATASET:-}" ] && dataset_flag=(--dataset="$DATASET")
for b in $BATCHES; do
  now=$(date +%s)
  left=$(( BUDGET_S - (now - start) ))
  if [ "$left" -lt 60 ]; then
    echo "{\"bench\": \"device_check\", \"stopped\": \"time budget\", \"batch\": $b}"; break
  fi
  log="$OUT/train_step_b$b.jsonl"
  timeout "$left" $PY bench/train_step.py --config="$CONFIG" \
      --config.model.dtype=bfloat16 --config.train.batch_size="$b" \
      --volume_shape="$SHAPE" --num_volumes=$(( b * (STEPS + 5) * 2 )) \
      --steps="$STEPS" --warmup=2 --peak_tflops="$PEAK_TFLOPS" --predict \
      "${EXTRA[@]}" "${dataset_flag[@]}" > "$log" 2> "$OUT/train_step_b$b.err"
  rc=$?
  cat "$log"
  if [ $rc -ne 0 ]; then
    if grep -qiE "RESOURCE_EXHAUSTED|out of memory|OOM" "$OUT/train_step_b$b.err"; then
      echo "{\"bench\": \"device_check\", \"batch\": $b, \"stopped\": \"out of memory\"}"
    else
      echo "{\"bench\": \"device_check\", \"batch\": $b, \"rc\": $rc, \"stderr_tail\": \"see $OUT/train_step_b$b.err\"}"
      tail -5 "$OUT/train_step_b$b.err" >&2
    fi
    break
  fi
done
echo "{\"bench\": \"device_check\", \"total_s\": $(( $(date +%s) - start ))}"
