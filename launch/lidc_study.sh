#!/usr/bin/env bash
# The slice-selection report's study (sectors × in-plane size), pretrained vs scratch, in one
# command: trains every run, then prints the table (also written to OUT/table.txt).
#
#   launch/lidc_study.sh DATASET PRETRAIN_WORKDIR OUT [config args]
#
# DATASET: python -m data_prep.lidc --lidc_root=LIDC --out=DATASET
# PRETRAIN_WORKDIR: a pretraining run (radnet.main task=pretrain) whose encoder is transferred.
# Runs (the report's): sector_num 1, 5, 13 at 128 × 128 and sector_num 5 at 64 × 64, each with
# the pretrained encoder (freeze=$FREEZE, default none) and from scratch. GRID=full adds
# sector_num 1 and 13 at 64 × 64. Extra config args go to every run, e.g. "demo" or
# "steps=2000". Runs that already wrote results.json are skipped and a killed run resumes
# from its latest checkpoint (the trainer's resume), so a killed study goes on where it was.
# Env: PYTHON (default python3), FREEZE, GRID (report|full), DRY_RUN=1 (print the commands).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,14p' "$0" >&2; exit 2
fi
DATASET=$1 PRETRAINED=$2 OUT=$3 EXTRA=${4:-}
PYTHON=${PYTHON:-python3}
FREEZE=${FREEZE:-none}
case "${GRID:-report}" in
  report) CELLS=("5 128" "1 128" "13 128" "5 64") ;;
  full) CELLS=("5 128" "1 128" "13 128" "5 64" "1 64" "13 64") ;;
  *) echo "GRID is report or full, not '${GRID}'" >&2; exit 2 ;;
esac
BASE="dataset=$DATASET,pretrained=$PRETRAINED${EXTRA:+,$EXTRA}"
run() { if [[ -n "${DRY_RUN:-}" ]]; then echo "$*"; else "$@"; fi; }
mkdir -p "$OUT"
for cell in "${CELLS[@]}"; do
  read -r sectors size <<<"$cell"
  for freeze in "$FREEZE" scratch; do
    name="s${sectors}_${size}_${freeze}"
    if [[ -s "$OUT/$name/results.json" ]]; then echo "skip $name (done)"; continue; fi
    run "$PYTHON" -m radnet.main \
      --config="configs/slicegroups.py:$BASE,sector_num=$sectors,in_plane=$size,freeze=$freeze" \
      --workdir="$OUT/$name"
  done
done
if [[ -n "${DRY_RUN:-}" ]]; then
  echo "$PYTHON -m radnet.train.slicegroups --root=$OUT"
else
  "$PYTHON" -m radnet.train.slicegroups --root="$OUT" | tee "$OUT/table.txt"
fi
