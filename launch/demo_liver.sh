#!/usr/bin/env bash
# make demo, liver part: phantom LiTS cases → data_prep.lits → proposal with the demo's
# pretrained 3D-RADNet → VNet with the frozen pretrained encoder vs from scratch, both
# briefly trained on CPU → their Dice (Table 2's first and last rows, on phantoms).
#
# Inputs: runs/demo/pacs/lits (data_prep.phantoms --lits_cases), runs/demo/pretrain.
# Output: runs/demo/liver/{dataset, proposals.csv, freeze_all, freeze_scratch}.
# Env: PYTHON (the venv's python), DEMO_ROOT (default runs/demo), LIVER_STEPS (override).
set -euo pipefail
PYTHON=${PYTHON:-python3}
ROOT=${DEMO_ROOT:-runs/demo}
LITS=$ROOT/pacs/lits PRE=$ROOT/pretrain OUT=$ROOT/liver
for need in "$LITS" "$PRE/config.json" "$PRE/checkpoints"; do
  [[ -e $need ]] || { echo "demo_liver: $need is missing (run the earlier demo steps)" >&2; exit 2; }
done
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
start=$(date +%s)
# The liver volumes take the pretraining volumes' in-plane size, so the encoder sees
# anatomy at the scale it learned.
IN_PLANE=$("$PYTHON" - "$PRE/config.json" <<'PY'
import json, sys
shape = json.load(open(sys.argv[1]))["input"]["volume_shape"]
print(shape[-1] if shape else 192)
PY
)
rm -rf "$OUT"
"$PYTHON" -m data_prep.lits --lits_dir="$LITS" --out="$OUT/dataset" --in_plane="$IN_PLANE" \
  --workers=1
EXTRA="demo${LIVER_STEPS:+,steps=$LIVER_STEPS}"
PYTHON=$PYTHON launch/liver_tables.sh table2-demo "$OUT/dataset" "$PRE" "$OUT" "$EXTRA"
"$PYTHON" - "$OUT" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
r = {n: json.load(open(f"{out}/freeze_{n}/results.json")) for n in ("all", "scratch")}
split = "test"
print(f"liver demo ({split} cases, n={r['all'][split]['n']}): "
      f"frozen encoder Dice {r['all'][split]['mean_dice']:.3f}, "
      f"from scratch Dice {r['scratch'][split]['mean_dice']:.3f} "
      f"(val: {r['all']['val']['mean_dice']:.3f} vs {r['scratch']['val']['mean_dice']:.3f}); "
      f"{time.time() - start:.0f} s")
PY
