"""Compares an archive index (data_prep.index output) with the phantom PACS's truth.csv.

    python -m data_prep.phantoms.check --truth=DIR/truth.csv --index=OUT [--show=coverage,view]

Prints one JSON line: per label column the number of truth rows the index agrees with,
the slice spacing agreement (within 0.01 mm), and the pairing check: every truth row's
``first_file`` must lie in an index series of its own (no two truth series merged into
one index series), and every index series must hold some truth row's first file (no
series invented by splitting one). ``--show`` lists the disagreements of those columns.
"""

from __future__ import annotations

import collections
import csv
import json
import os
from typing import Sequence

from absl import app, flags

LABEL_COLUMNS = ("sequence", "view", "contrast", "coverage", "status", "reasons")


def _rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare(truth_csv: str, index_dir: str) -> tuple[dict, list[str]]:
    """(summary, disagreement lines) of an index output against truth.csv."""
    truth = _rows(truth_csv)
    files = {r["path"]: r for r in _rows(os.path.join(index_dir, "files.csv"))}
    series = {r["series_key"]: r for r in _rows(os.path.join(index_dir, "series.csv"))}
    agree = collections.Counter()
    lines: list[str] = []
    keys = collections.Counter()
    missing = 0
    spacing_ok = spacing_n = 0
    for t in truth:
        f = files.get(t["first_file"])
        if f is None:
            missing += 1
            lines.append(f"{t['series_id']} first_file not in files.csv")
            continue
        s = series.get(f["series_key"]) if f["series_key"] else None
        if s is not None:
            keys[f["series_key"]] += 1
        got = s or {"sequence": "", "view": "", "contrast": "", "coverage": "",
                    "status": f["status"], "reasons": f["reason"], "provenance": ""}
        for col in LABEL_COLUMNS:
            if got[col] == t[col]:
                agree[col] += 1
            else:
                lines.append(f"{t['series_id']} {col}: truth={t[col]!r} index={got[col]!r} | "
                             f"{got.get('provenance', '')[:240]}")
        if t["slice_spacing_mm"] and s is not None:
            spacing_n += 1
            try:
                spacing_ok += abs(float(s["slice_spacing_mm"]) - float(t["slice_spacing_mm"])) <= 0.01
            except ValueError:
                lines.append(f"{t['series_id']} slice_spacing_mm: index={s['slice_spacing_mm']!r}")
    merged = sorted(k for k, v in keys.items() if v > 1)
    unmatched = sorted(k for k in series if k not in keys)
    for k in unmatched:
        lines.append(f"index series {k[:12]} holds no truth first_file "
                     f"({series[k]['n_files']} files, {series[k]['reasons']})")
    n = len(truth)
    summary = {col: round(agree[col] / n, 4) if n else 0.0 for col in LABEL_COLUMNS}
    summary.update(truth_rows=n, index_series=len(series), missing_first_files=missing,
                   merged_series=len(merged), unmatched_index_series=len(unmatched),
                   slice_spacing=round(spacing_ok / spacing_n, 4) if spacing_n else None)
    return summary, lines


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a program, so importing compare() defines no flag."""
    flags.DEFINE_string("truth", None, "truth.csv of a phantom archive.")
    flags.DEFINE_string("index", None, "Output folder of data_prep.index (files.csv, series.csv).")
    flags.DEFINE_list("show", [], "Columns whose disagreements to list (or 'all').")


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.truth or not FLAGS.index:
        raise app.UsageError("--truth and --index are required")
    summary, lines = compare(FLAGS.truth, FLAGS.index)
    show = set(FLAGS.show)
    for line in lines:
        col = line.split(" ", 2)[1].rstrip(":")
        if "all" in show or col in show or not line.startswith("p"):
            print(line)
    print(json.dumps(summary))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
