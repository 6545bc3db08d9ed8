#!/usr/bin/env bash
# make demo, liver part: phantom liver CTs in the Decathlon layout (Task03_Liver) →
# data_prep.nifti (liver and tumour folded into liver, the paper's setting) → proposal with
# the demo's pretrained 3D-RADNet → VNet with the frozen pretrained encoder vs from
# scratch, both briefly trained on CPU → their test Dice with a 95% bootstrap CI
# (Table 2's first and last rows, on phantoms; saved as table2.md / table2.csv).
#
# Inputs: runs/demo/pretrain (the demo's pretraining). The phantom cases are written to
# runs/demo/pacs/Task03_Liver when missing (data_prep.phantoms.lits --layout=msd).
# Output: runs/demo/liver/{dataset, proposals.csv, freeze_all, freeze_scratch, table2.*}.
# Env: PYTHON (the venv's python), DEMO_ROOT (default runs/demo), LIVER_STEPS (override),
#      LIVER_CASES (default 8), LIVER_SEED (default 0).
# Split 4 train / 1 val / 3 test (--split=0.5,0.125,0.375): three test cases give the
# Dice an interval (a wide one; the paper's 20 test cases would narrow it).
set -euo pipefail
PYTHON=${PYTHON:-python3}
ROOT=${DEMO_ROOT:-runs/demo}
MSD=$ROOT/pacs/Task03_Liver PRE=$ROOT/pretrain OUT=$ROOT/liver
for need in "$PRE/config.json" "$PRE/checkpoints"; do
  [[ -e $need ]] || { echo "radnet: error: demo_liver: $need is missing (run the earlier demo steps)" >&2; exit 2; }
done
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
start=$(date +%s)
if [[ ! -s $MSD/dataset.json ]]; then
  "$PYTHON" -m data_prep.phantoms.lits --out="$MSD" --cases="${LIVER_CASES:-8}" \
    --seed="${LIVER_SEED:-0}" --layout=msd
fi
# The liver volumes take the pretraining volumes' in-plane size, so the encoder sees
# anatomy at the scale it learned.
IN_PLANE=$("$PYTHON" - "$PRE/config.json" <<'PY'
import json, sys
shape = json.load(open(sys.argv[1]))["input"]["volume_shape"]
print(shape[-1] if shape else 192)
PY
)
rm -rf "$OUT"
"$PYTHON" -m data_prep.nifti --dataset_dir="$MSD" --out="$OUT/dataset" --fold_foreground=liver \
  --in_plane="$IN_PLANE" --split=0.5,0.125,0.375 --workers=1 --noprogress
EXTRA="demo${LIVER_STEPS:+,steps=$LIVER_STEPS}"
PYTHON=$PYTHON launch/liver_tables.sh table2-demo "$OUT/dataset" "$PRE" "$OUT" "$EXTRA"
"$PYTHON" - "$OUT" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
s = {n: json.load(open(f"{out}/freeze_{n}/summary.json")) for n in ("all", "scratch")}
def dice(run, split):
    d = s[run][split]["over_classes"]["dice"]
    ci = f" [95% CI {d['ci95'][0]:.3f}-{d['ci95'][1]:.3f}]" if d["ci95"] else " [no CI: n=1]"
    return f"{d['mean']:.3f}{ci}"
n = s["all"]["test"]["n"]
print(f"liver demo (test cases, n={n}, Dice on the source grid): frozen encoder {dice('all', 'test')}, "
      f"from scratch {dice('scratch', 'test')}; {time.time() - start:.0f} s; "
      f"tables {out}/table2.md, overlays {out}/freeze_all/overlays/")
PY
