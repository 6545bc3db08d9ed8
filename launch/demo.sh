#!/usr/bin/env bash
# make demo: phantom PACS → index → volumes → pretrain → evaluate → liver transfer.
#
#   PYTHON=.venv/bin/python bash launch/demo.sh      # what `make demo` runs
#
# Everything lands in runs/demo/ (override with DEMO_DIR). Each stage is resumable, so an
# interrupted demo started again continues where it stopped. Budget: ≤ 15 minutes on 2 cores
# (README: about 8-15 min and 3 GB of disk). Libraries log at WARNING (radnet/cli.py); add
# DEMO_VERBOSE=1 for every line they have.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
DEMO="${DEMO_DIR:-runs/demo}"
WORKERS="${DEMO_WORKERS:-2}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

VERBOSE=()
[[ "${DEMO_VERBOSE:-0}" == "1" ]] && VERBOSE=(--verbosity=1)

cd "$(dirname "$0")/.."
command -v "$PYTHON" > /dev/null || {
  echo "radnet: error: no Python at PYTHON=$PYTHON (launch/demo.sh; make demo sets it up)" >&2; exit 2; }
mkdir -p "$DEMO"
START=$SECONDS
stage() { echo "== [$((SECONDS - START))s] $*"; }

stage "1/6 phantom PACS (DICOM with ground truth) → $DEMO/pacs"
if [[ ! -f "$DEMO/pacs/truth.csv" ]]; then
  "$PYTHON" -m data_prep.phantoms --out="$DEMO/pacs" --patients=120 --seed=0 --lits_cases=6 \
    --workers="$WORKERS" "${VERBOSE[@]}"
else
  echo "already there"
fi

stage "2/6 index the headers → $DEMO/index"
# The keyed hashes, and with them the patient split, depend on the salt. A real site keeps a
# random secret (data_prep/index/salt.py creates one); the DEMO ONLY uses a fixed, public
# salt so that every fresh demo on any machine gets the same split and the same figures.
printf '%s\n' "radnet-demo-salt-public-not-a-secret-do-not-use-on-real-data" > "$DEMO/salt"
# A larger test share than the default 10%: the demo's test split is its report card.
"$PYTHON" -m data_prep.index --dicom_root="$DEMO/pacs/dicom" --out="$DEMO/index" \
  --workers="$WORKERS" --salt_file="$DEMO/salt" "${VERBOSE[@]}" \
  --config.split.train=0.7 --config.split.val=0.1 --config.split.test=0.2

stage "3/6 build 48×32×32 volumes → $DEMO/dataset"
"$PYTHON" -m data_prep.build_volumes --index="$DEMO/index" --dicom_root="$DEMO/pacs/dicom" \
  --out="$DEMO/dataset" --config=configs/build_volumes.py:size=32 --workers="$WORKERS" \
  --overwrite "${VERBOSE[@]}"

stage "4/6 pretrain 3D-RADNet (small, CPU) → $DEMO/pretrain"
# The console shows radnet's own lines (a step line every 150 steps); also in $DEMO/pretrain.log.
set +e
"$PYTHON" -m radnet.main --config="configs/pretrain.py:demo,dataset=$DEMO/dataset" \
  --config.train.log_every_steps=150 --config.eval.every_steps=250 --workdir="$DEMO/pretrain" \
  "${VERBOSE[@]}" 2>&1 \
  | tee "$DEMO/pretrain.log"
status=${PIPESTATUS[0]}
set -e
if [[ $status -ne 0 ]]; then
  echo "pretraining failed (exit $status); see $DEMO/pretrain.log" >&2
  exit "$status"
fi

stage "5/6 evaluate on the held-out test split → $DEMO/pretrain/report.json"
"$PYTHON" -m radnet.main --config=configs/evaluate.py --config.checkpoint="$DEMO/pretrain" \
  --config.dataset="$DEMO/dataset" --workdir="$DEMO/pretrain" "${VERBOSE[@]}"

stage "6/6 liver transfer (phantom Task03_Liver, MSD layout): frozen pretrained encoder vs scratch, test Dice with 95% CI → $DEMO/liver"
PYTHON="$PYTHON" DEMO_ROOT="$DEMO" bash launch/demo_liver.sh

echo
echo "== demo done in $((SECONDS - START))s; the report: $DEMO/pretrain/report.md (liver: $DEMO/liver)"
