#!/usr/bin/env bash
# The paper's Table 2 (freeze rows) or Table 3 (training fractions) in one command.
#
#   launch/liver_tables.sh table2 DATASET PRETRAIN_WORKDIR OUT [config args]
#   launch/liver_tables.sh table3 DATASET PRETRAIN_WORKDIR OUT [config args]
#
# DATASET: python -m data_prep.lits --lits_dir=LiTS --out=DATASET, or
#          python -m data_prep.nifti --dataset_dir=Task03_Liver --fold_foreground=liver --out=DATASET
# PRETRAIN_WORKDIR: a pretraining run (radnet.main task=pretrain).
# Extra config args are appended to every run, e.g. "steps=2000" or "demo".
# The liver proposal is computed once (OUT/proposals.csv) and shared by every run;
# runs that already wrote summary.json are skipped, so a killed grid resumes. The table
# is printed and saved as OUT/table2.md and OUT/table2.csv (table3.*), with 95% bootstrap
# CIs over cases next to every mean and n.
# Env: PYTHON (default python3), FREEZE (table3's freeze row, default all).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,16p' "$0" >&2; exit 2
fi
TABLE=$1 DATASET=$2 PRETRAINED=$3 OUT=$4 EXTRA=${5:-}
PYTHON=${PYTHON:-python3}
FREEZE=${FREEZE:-all}
case "$TABLE" in
  table2) RUNS=(all block3 block2 block1 none scratch) ;;
  table3) RUNS=(1.0 0.8 0.6 0.4 0.2) ;;
  table2-demo) RUNS=(all scratch) ;;      # make demo: the first and last rows only
  *) echo "first argument: table2 or table3, not '$TABLE'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
BASE="dataset=$DATASET,pretrained=$PRETRAINED${EXTRA:+,$EXTRA}"
if [[ ! -s "$OUT/proposals.csv" ]]; then
  "$PYTHON" -m radnet.proposal --config="configs/liver.py:$BASE" --out="$OUT/proposals.csv.tmp"
  mv "$OUT/proposals.csv.tmp" "$OUT/proposals.csv"
fi
for run in "${RUNS[@]}"; do
  if [[ $TABLE == table2* ]]; then arg="freeze=$run"; name="freeze_$run"
  else arg="freeze=$FREEZE,fraction=$run"; name="fraction_$run"; fi
  if [[ -s "$OUT/$name/summary.json" ]]; then echo "skip $name (done)"; continue; fi
  rm -rf "$OUT/$name"
  "$PYTHON" -m radnet.main --config="configs/liver.py:$BASE,$arg,proposals=$OUT/proposals.csv" \
    --workdir="$OUT/$name"
done
"$PYTHON" -m radnet.train.segment --table="$(echo "${TABLE#table}" | cut -c1)" --root="$OUT"
