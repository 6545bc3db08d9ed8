"""The QC catch measurement of docs/predict.md: header lies planted in a copy of an archive.

    python bench/qc_corruption.py corrupt --index=runs/demo/index --dicom_root=runs/demo/pacs/dicom \\
        --out=/tmp/qc/archive --split=test --seed=0        # copies the split, plants 10 lies
    python -m radnet.main --config=configs/predict.py --config.checkpoint=runs/demo/pretrain \\
        --config.dicom_root=/tmp/qc/archive --config.salt_file=runs/demo/salt --workdir=/tmp/qc/out
    python bench/qc_corruption.py score --out=/tmp/qc/archive --predictions=/tmp/qc/out/predictions.csv

`corrupt` copies every file of the index's series in ``--split`` (the index's files.csv) and
rewrites the headers of ``--contrast`` + ``--sequence`` + ``--view`` included series, drawn
with ``--seed``, so that the header-mined label is wrong while the pixels stay true:

- contrast: a contrast-enhanced series (CT or MR) made silent about contrast — every
  ContrastBolus* attribute removed and the contrast words (radnet.rules.CONTRAST_WORDS) cut
  from SeriesDescription and ProtocolName, so the rules fall to ``no_contrast``;
- sequence: a T1-SE series given a T2-SE series' TR/TE and "T2" for "T1" in its descriptions,
  or the other way round;
- view: an axial series relabelled coronal — ImageOrientationPatient and ImagePositionPatient
  rotated together (x, y, z) → (x, z, −y), so the geometry stays consistent and only the
  patient frame lies.

It writes OUT/corrupted.json (series key → head, truth, lie). `score` joins it with a predict
run's predictions.csv and prints one JSON line: how many lies took (the header column shows
the lie), how many qc flagged on the corrupted head, and the share of untouched predicted
series that qc flagged.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import sys

import pydicom

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from radnet import rules  # noqa: E402

_CONTRAST_TAG_GROUP = 0x0018
_CONTRAST_TAGS = (0x0010, 0x0012, 0x1040, 0x1041, 0x1042, 0x1043, 0x1044, 0x1046, 0x1047,
                  0x1048, 0x1049, 0x1050)  # (0018,xxxx) Contrast/Bolus module attributes
_TEXT_TAGS = ("SeriesDescription", "ProtocolName")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cut_contrast_words(text: str) -> str:
    """``text`` (upper-cased) without any of the rules' contrast words."""
    words = rules.CONTRAST_WORDS + rules.CONTRAST_BOTH_WORDS
    out = f" {text.upper()} "
    for word in sorted(words, key=len, reverse=True):
        out = rules._pattern(word).sub(" ", out)
    return re.sub(r"\s+", " ", out).strip()


def _lie_contrast(ds):
    for element in _CONTRAST_TAGS:
        tag = (_CONTRAST_TAG_GROUP << 16) | element
        if tag in ds:
            del ds[tag]
    for name in _TEXT_TAGS:
        if name in ds:
            setattr(ds, name, _cut_contrast_words(str(getattr(ds, name))))


def _swap_t1_t2(text: str, to: str) -> str:
    src = "T1" if to == "T2" else "T2"
    return re.sub(rf"(?<![A-Z0-9]){src}(?![0-9])", to, text.upper())


def _lie_sequence(ds, to: str, tr_te: tuple[float, float]):
    ds.RepetitionTime, ds.EchoTime = tr_te
    for name in _TEXT_TAGS:
        if name in ds:
            setattr(ds, name, _swap_t1_t2(str(getattr(ds, name)), to))


def _rotate(v):
    x, y, z = (float(c) for c in v)
    return [x, z, -y]


def _lie_view(ds):
    iop = [float(c) for c in ds.ImageOrientationPatient]
    ds.ImageOrientationPatient = [round(c, 6) for c in _rotate(iop[:3]) + _rotate(iop[3:])]
    ds.ImagePositionPatient = [round(c, 4) for c in _rotate(ds.ImagePositionPatient)]


def corrupt(args) -> dict:
    series = {r["series_key"]: r for r in _read_csv(os.path.join(args.index, "series.csv"))}
    files = _read_csv(os.path.join(args.index, "files.csv"))
    in_split = {k for k, r in series.items() if r["split"] == args.split}
    by_series: dict[str, list[str]] = {}
    for row in files:
        if row["series_key"] in in_split:
            by_series.setdefault(row["series_key"], []).append(row["path"])
    included = sorted(k for k in in_split if series[k]["status"] == "included" and k in by_series)
    rng = random.Random(args.seed)

    def draw(pred, n, usable=lambda key: True):
        pool = [k for k in included if pred(series[k]) and k not in chosen]
        rng.shuffle(pool)
        picked = [k for k in pool if usable(k)][:n]
        if len(picked) < n:
            raise SystemExit(f"qc_corruption: only {len(pool)} candidate series in split "
                             f"{args.split!r} for a lie; lower the count")
        return picked

    chosen: dict[str, dict] = {}
    for k in draw(lambda r: r["contrast"] == "contrast", args.contrast):
        chosen[k] = {"head": "contrast", "truth": "contrast", "lie": "no_contrast"}
    for k in draw(lambda r: r["sequence"] in ("T1-SE", "T2-SE"), args.sequence):
        truth = series[k]["sequence"]
        chosen[k] = {"head": "sequence", "truth": truth,
                     "lie": "T2-SE" if truth == "T1-SE" else "T1-SE"}
    def plain_geometry(key):  # every file with its own IOP/IPP (not an enhanced multi-frame)
        return all("ImageOrientationPatient" in ds and "ImagePositionPatient" in ds for ds in (
            pydicom.dcmread(os.path.join(args.dicom_root, rel), stop_before_pixels=True,
                            force=True) for rel in by_series[key]))

    for k in draw(lambda r: r["view"] == "axial", args.view, plain_geometry):
        chosen[k] = {"head": "view", "truth": "axial", "lie": "coronal"}

    # TR/TE of a real series of the lie's weighting, read from the archive.
    tr_te = {}
    for want in ("T1-SE", "T2-SE"):
        donor = next(k for k in included if series[k]["sequence"] == want and k not in chosen)
        ds = pydicom.dcmread(os.path.join(args.dicom_root, by_series[donor][0]),
                             stop_before_pixels=True, force=True)
        tr_te[want] = (float(ds.RepetitionTime), float(ds.EchoTime))

    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    n_files = 0
    for key in sorted(by_series):
        for rel in by_series[key]:
            src, dst = os.path.join(args.dicom_root, rel), os.path.join(args.out, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            n_files += 1
            if key not in chosen:
                shutil.copy2(src, dst)
                continue
            ds = pydicom.dcmread(src, force=True)
            lie = chosen[key]
            if lie["head"] == "contrast":
                _lie_contrast(ds)
            elif lie["head"] == "sequence":
                _lie_sequence(ds, lie["lie"][:2], tr_te[lie["lie"]])
            else:
                _lie_view(ds)
            ds.save_as(dst)
    with open(os.path.join(args.out, "corrupted.json"), "w") as f:
        json.dump(chosen, f, indent=1, sort_keys=True)
    return {"split": args.split, "seed": args.seed, "series": len(by_series), "files": n_files,
            "corrupted": len(chosen)}


def score(args) -> dict:
    with open(os.path.join(args.out, "corrupted.json")) as f:
        chosen = json.load(f)
    rows = {r["series_key"]: r for r in _read_csv(args.predictions)}
    took = caught = 0
    per_head: dict[str, list[int]] = {}
    missing = []
    for key, lie in chosen.items():
        row = rows.get(key)
        if row is None or row["status"] != "predicted":
            missing.append(key)
            continue
        head = lie["head"]
        took_here = row.get(f"header_{head}") == lie["lie"]
        caught_here = head in (row.get("qc") or "").split(";")
        took += took_here
        caught += caught_here
        counts = per_head.setdefault(head, [0, 0, 0])
        counts[0] += 1
        counts[1] += took_here
        counts[2] += caught_here
    untouched = [r for k, r in rows.items() if k not in chosen and r["status"] == "predicted"]
    flagged = sum(1 for r in untouched if r.get("qc"))
    return {"corrupted": len(chosen), "lies_took": took, "flagged": caught,
            "per_head_n_took_flagged": per_head, "not_predicted": len(missing),
            "untouched_predicted": len(untouched), "untouched_flagged": flagged,
            "untouched_flagged_pct": round(100.0 * flagged / max(1, len(untouched)), 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corrupt")
    c.add_argument("--index", required=True)
    c.add_argument("--dicom_root", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--split", default="test", choices=("train", "val", "test"))
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--contrast", type=int, default=4)
    c.add_argument("--sequence", type=int, default=4)
    c.add_argument("--view", type=int, default=2)
    s = sub.add_parser("score")
    s.add_argument("--out", required=True)
    s.add_argument("--predictions", required=True)
    args = parser.parse_args(argv)
    try:
        result = corrupt(args) if args.command == "corrupt" else score(args)
    except FileNotFoundError as e:
        # A wrong --index / --out / --predictions: one line, not a traceback.
        hint = ("--index must be a data_prep.index output folder" if args.command == "corrupt"
                else "--out must be the corrupt step's folder, --predictions a predict run's "
                     "predictions.csv")
        print(f"qc_corruption {args.command}: error: {e.filename} not found ({hint})",
              file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
