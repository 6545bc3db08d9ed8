"""The index's tables: their columns, the patient-level split, reviewed overrides, the
CSV files and the summary (the exclusion funnel and label counts)."""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import os
import statistics
from typing import Any

from radnet import labels

FILES_COLUMNS = ("path", "series_key", "status", "reason")
from radnet.dicom.series import SERIES_COLUMNS  # noqa: E402,F401  (one definition, in the library)
REVIEW_COLUMNS = ("series_key", "column", "issue", "series_description", "study_description",
                  "current_value", "provenance")
OVERRIDABLE = ("sequence", "view", "contrast", "coverage", "status", "reasons", "split")


def assign_splits(series_rows: list[dict], cfg) -> None:
    """Patient-level split from the patient key; held-out collections go to test."""
    fr = cfg.split
    total = fr.train + fr.val + fr.test
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions sum to {total}, not 1: {dict(fr)}")
    heldout = {c.strip().upper() for c in (cfg.heldout_collections or "").split(",") if c.strip()}
    heldout_patients = {r["patient_key"] for r in series_rows
                        if heldout and (r.get("_collection", "").upper() in heldout
                                        or r.get("_top", "").upper() in heldout)}
    for r in series_rows:
        pk = r["patient_key"]
        if pk in heldout_patients:
            r["split"] = "test"
            continue
        u = int(pk[:13], 16) / 16 ** 13 if pk else 0.0
        r["split"] = "train" if u < fr.train else ("val" if u < fr.train + fr.val else "test")


def apply_overrides(series_rows: list[dict], path: str | None) -> int:
    """overrides.csv (series_key,column,value), applied last, noted in provenance."""
    if not path:
        return 0
    by_key = {r["series_key"]: r for r in series_rows}
    n = 0
    with open(path, newline="", encoding="utf-8") as f:
        for line, o in enumerate(csv.DictReader(f), start=2):
            key, column, value = (o.get("series_key") or "").strip(), \
                (o.get("column") or "").strip(), (o.get("value") or "").strip()
            where = f"{path}:{line}"
            if key not in by_key:
                raise ValueError(f"{where}: unknown series_key {key!r}")
            if column not in OVERRIDABLE:
                raise ValueError(f"{where}: column {column!r} cannot be overridden; "
                                 f"choose one of {OVERRIDABLE}")
            row = by_key[key]
            if column in ("sequence", "view", "contrast"):
                labels.to_index(column, value)
            elif column == "coverage":
                labels.coverage_to_multihot(value)
            elif column == "split":
                labels.split_index(value)
            elif column == "reasons":
                reasons = [r for r in value.split(";") if r]
                for r in reasons:
                    if r not in labels.EXCLUSION_REASONS:
                        raise ValueError(f"{where}: {r!r} is not an exclusion reason")
                value = ";".join(r for r in labels.EXCLUSION_REASONS if r in reasons)
                row["status"] = "excluded" if value else "included"
            elif column == "status":
                if value == "included":
                    row["reasons"] = ""
                elif value == "excluded":
                    if not row["reasons"]:
                        raise ValueError(f"{where}: status=excluded needs a reason; "
                                         "override the reasons column instead")
                else:
                    raise ValueError(f"{where}: status must be included or excluded")
            row[column] = value
            row["provenance"] += f" | override {column}={value}"
            n += 1
    return n


# Paths are file names as the file system gives them: a name that is not UTF-8 is kept
# with os.fsdecode's surrogate escapes, which this error handler writes back as the
# original bytes (read the file with the same handler to get the same str back).
CSV_ENCODING, CSV_ERRORS = "utf-8", "surrogateescape"


def open_csv(path: str):
    """An index CSV for csv.DictReader: every path as walk() gave it (docs/index.md)."""
    return open(path, newline="", encoding=CSV_ENCODING, errors=CSV_ERRORS)


def write_csv(path: str, columns, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding=CSV_ENCODING, errors=CSV_ERRORS) as f:
        plain = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore",
                               lineterminator="\n")
        # QUOTE_MINIMAL quotes a field holding "\n" (the line terminator) but not one
        # holding "\r", which a reader then rejects ("new-line character seen in unquoted
        # field"): such rows are written fully quoted, the others stay as they were.
        quoted = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore",
                                lineterminator="\n", quoting=csv.QUOTE_ALL)
        plain.writeheader()
        for r in rows:
            if any("\r" in str(v) for v in r.values()):
                quoted.writerow(r)
            else:
                plain.writerow(r)
    os.replace(tmp, path)


def summarize(files_rows, series_rows, review_rows) -> dict:
    """The exclusion funnel (each series once, by its first reason) and label counts."""
    file_status = collections.Counter(r["status"] for r in files_rows)
    file_reason = collections.Counter(r["reason"] for r in files_rows if r["reason"])
    funnel = collections.Counter(r["reasons"].split(";")[0] for r in series_rows if r["reasons"])
    any_reason = collections.Counter(x for r in series_rows for x in r["reasons"].split(";") if x)
    per_split: dict[str, Any] = {}
    for split in labels.SPLITS:
        rows = [r for r in series_rows if r["status"] == "included" and r["split"] == split]
        eff = [float(r["effective_spacing_mm"]) for r in rows if r["effective_spacing_mm"]]
        per_split[split] = {
            "series": len(rows),
            "patients": len({r["patient_key"] for r in rows}),
            "sequence": {k: sum(r["sequence"] == k for r in rows) for k in labels.SEQUENCE},
            "view": {k: sum(r["view"] == k for r in rows) for k in labels.VIEW},
            "contrast": {k: sum(r["contrast"] == k for r in rows) for k in labels.CONTRAST},
            "coverage": {k: sum(k in r["coverage"].split(";") for r in rows)
                         for k in labels.COVERAGE},
            "coverage_unknown": sum(r["coverage"] == "" for r in rows),
            "effective_spacing_mm": {"mean": round(statistics.fmean(eff), 3) if eff else None,
                                     "median": round(statistics.median(eff), 3) if eff else None},
        }
    return {
        "files": {"total": len(files_rows), "included": file_status.get("included", 0),
                  "excluded": file_status.get("excluded", 0),
                  # worker_died / timeout: nothing wrong with the file known; a re-run retries
                  "to_retry": sum(file_reason[k] for k in labels.TRANSIENT_REASONS),
                  "by_reason": {k: file_reason[k] for k in labels.EXCLUSION_REASONS
                                if file_reason[k]}},
        "series": {"total": len(series_rows),
                   "included": sum(r["status"] == "included" for r in series_rows),
                   "excluded": sum(r["status"] == "excluded" for r in series_rows)},
        "funnel": [{"reason": k, "series": funnel[k]} for k in labels.EXCLUSION_REASONS],
        "series_with_reason": {k: any_reason[k] for k in labels.EXCLUSION_REASONS},
        "splits": per_split,
        "review_rows": len(review_rows),
    }


def format_summary(summary: dict) -> str:
    out = io.StringIO()
    s = summary["series"]
    # The counts explained: unreadable files belong to no series (the phantom archive's truth
    # counts them as rows), and not every series is an image (SR, presentation states, ...).
    unreadable = summary["files"].get("by_reason", {}).get("unreadable", 0)
    not_image = sum(i["series"] for i in summary["funnel"] if i["reason"] == "not_image")
    print(f"files: {summary['files']['total']} ({unreadable} unreadable, in no series)  "
          f"series: {s['total']} ({not_image} not images)  "
          f"included: {s['included']}  excluded: {s['excluded']}", file=out)
    print("exclusion funnel (first reason)        series", file=out)
    remaining = s["total"]
    for item in summary["funnel"]:
        remaining -= item["series"]
        print(f"  - {item['reason']:<34}{item['series']:>7}   -> {remaining}", file=out)
    print(f"{'':<12}" + "".join(f"{sp:>8}" for sp in labels.SPLITS), file=out)
    sp = summary["splits"]
    print(f"{'series':<12}" + "".join(f"{sp[k]['series']:>8}" for k in labels.SPLITS), file=out)
    print(f"{'patients':<12}" + "".join(f"{sp[k]['patients']:>8}" for k in labels.SPLITS), file=out)
    # Labels per split, one line per head (a row per class made this summary 21 lines longer).
    print("labels, series per split (" + "/".join(labels.SPLITS) + "):", file=out)
    for head in ("sequence", "view", "contrast", "coverage"):
        print(f"  {head:<9} " + "  ".join(
            f"{name} " + "/".join(str(sp[k][head][name]) for k in labels.SPLITS)
            for name in sp["train"][head]), file=out)
    print(f"review rows: {summary['review_rows']}", file=out)
    if summary["files"].get("to_retry"):
        print(f"files to retry: {summary['files']['to_retry']} (worker_died/timeout; "
              "run the same command again)", file=out)
    return out.getvalue()



def file_rows(paths: list[str], records: dict[str, dict], file_key: dict[str, str],
              series_rows: list[dict]) -> list[dict]:
    """One files.csv row per walked file: its series and that series' status and first
    reason, or why the file itself is out (nothing is lost)."""
    by_key = {r["series_key"]: r for r in series_rows}
    rows = []
    for rel in paths:
        record = records[rel]
        key = file_key.get(rel, "")
        series = by_key.get(key)
        if record["status"] == "unreadable":
            status, reason = "excluded", record.get("reason") or "unreadable"
        elif record["status"] == "not_image":
            status, reason = "excluded", "not_image"
        elif series is None:
            status, reason = "excluded", "unreadable"
        else:
            status = series["status"]
            reason = series["reasons"].split(";")[0] if series["reasons"] else ""
        rows.append({"path": rel, "series_key": key, "status": status, "reason": reason})
    return rows


def write_summary(path: str, summary: dict) -> None:
    """summary.json, replaced atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path)
