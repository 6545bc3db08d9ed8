"""Header records → series: slices grouped by SeriesInstanceUID, orientation, image size
and (when they are separate scans) acquisition; each series' geometry checked along the
normal and its labels mined with radnet.rules.

The one grouping and series-key code: data_prep.index writes series.csv with it, and the
``predict`` task (radnet.archive) groups an unlabelled archive with it, so the two give
every series the same keyed ``series_key`` under the same salt."""

from __future__ import annotations

import collections
import csv
import statistics
from typing import Iterable

from radnet import labels, rules
from radnet.dicom import geometry
from radnet.dicom import headers as dicom_headers

# The columns of the index's series.csv (data_prep.index.outputs writes them).
SERIES_COLUMNS = ("series_key", "patient_key", "study_key", "modality", "n_files", "n_slices",
                  "sequence", "view", "contrast", "coverage", "slice_spacing_mm",
                  "effective_spacing_mm", "status", "reasons", "split", "provenance",
                  "rows", "columns", "pixel_spacing_mm", "orientation", "extent_mm")


class Slice:
    """One frame of one file, with the geometry the index groups and stacks by."""

    __slots__ = ("path", "frame", "position_mm", "orientation", "pixel_spacing_mm",
                 "temporal_index", "acquisition", "sop_key", "readable")

    def __init__(self, path, frame, geometry_record, acquisition, sop_key, readable):
        def values(key, count):
            v = geometry_record.get(key)
            return v if v and len(v) == count else None

        self.path, self.frame = path, frame
        self.position_mm = values("position_mm", 3)
        self.orientation = values("orientation", 6)
        self.pixel_spacing_mm = values("pixel_spacing_mm", 2)  # between rows, between columns
        self.temporal_index = geometry_record.get("temporal_index")
        self.acquisition, self.sop_key, self.readable = acquisition, sop_key, readable


def _positions_along_normal(slices: list[Slice], orientation) -> list[float] | None:
    """Every slice's position along the normal of ``orientation``; None if any is unknown."""
    if any(s.position_mm is None for s in slices):
        return None
    try:
        return geometry.positions_along_normal([s.position_mm for s in slices], orientation)
    except ValueError:
        return None


def _split_acquisitions(slices: list[Slice], orientation, cfg) -> list[list[Slice]]:
    """Split a group by AcquisitionNumber only when its acquisitions are separate scans.

    Acquisitions sharing positions are a time series (kept together, excluded
    later); disjoint acquisitions forming one even stack are one volume
    (step-and-shoot CT, concatenations); disjoint acquisitions that do not fit
    together are separate scans and are split.
    """
    by_acquisition: dict[str, list[Slice]] = collections.defaultdict(list)
    for s in slices:
        by_acquisition[s.acquisition].append(s)
    if len(by_acquisition) < 2:
        return [slices]
    positions = _positions_along_normal(slices, orientation)
    if positions is None:
        return [slices]
    bin_of = {id(s): round(p / max(cfg.same_position_mm, 1e-6)) for s, p in zip(slices, positions)}
    bins = [{bin_of[id(s)] for s in group} for group in by_acquisition.values()]
    for i in range(len(bins)):
        for j in range(i + 1, len(bins)):
            if bins[i] & bins[j]:
                return [slices]

    def consistent(group):
        pairs = [(s, p) for s, p in zip(slices, positions) if s.readable and s in group]
        stack = rules.stack_rule([p for _, p in pairs], [s.sop_key for s, _ in pairs],
                                 [s.temporal_index for s, _ in pairs],
                                 [s.acquisition for s, _ in pairs], None, cfg)
        return "inconsistent_geometry" not in stack.reasons, stack.n_slices

    if consistent(set(slices))[0]:
        return [slices]
    # Only acquisitions that are each a stack of their own (>= 3 even positions)
    # are separate scans; otherwise the holes are missing slices of one scan.
    parts = [by_acquisition[a] for a in sorted(by_acquisition)]
    if all(ok and n >= 3 for ok, n in (consistent(set(g)) for g in parts)):
        return parts
    return [slices]


def _mode(values: Iterable, default=""):
    counts = collections.Counter(v for v in values if v not in (None, "", [], ()))
    return counts.most_common(1)[0][0] if counts else default


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _first(values):
    return values[0] if values else None


def _facts(records: list[dict]) -> dict:
    """Series-level header facts from the records of its files."""
    def text(key):
        return _mode(r.get(key, "") for r in records)
    te_values = sorted({round(v, 3) for r in records for v in (r.get("te") or [])})
    return {
        "modality": text("modality"),
        "series_description": text("series_description"),
        "study_description": text("study_description"),
        "protocol_name": text("protocol_name"),
        "body_part": text("body_part"),
        "image_type": sorted({v for r in records for v in r.get("image_type", [])}),
        "frame_type": sorted({v for r in records for v in r.get("frame_type", [])}),
        "ss": list(_mode(tuple(r.get("ss") or ()) for r in records) or ()),
        "tr": _median(_first(r.get("tr")) for r in records),
        "te": te_values,
        "ti": _median(_first(r.get("ti")) for r in records),
        "bvalues": sorted({b for r in records for b in r.get("bvalues", [])}),
        "agent": text("agent"),
        "agent_seq": any(r.get("agent_seq") for r in records),
        "agent_administered": text("agent_administered"),
        "n_temporal": max((r.get("n_temporal") or 0 for r in records), default=0),
        "collection": text("collection"),
    }


def _fmt(x: float | None, digits: int = 6) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}g}"


def load_collections(path: str | None) -> dict[str, list[str]]:
    """collections.csv: ``collection,regions`` (or ``body_locations``): ;-joined coverage names."""
    if not path:
        return {}
    table = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = (row.get("collection") or "").strip()
            cell = row.get("regions") or row.get("body_locations") or ""
            regions = [r.strip() for r in cell.split(";") if r.strip()]
            for r in regions:
                labels.to_index("coverage", r)  # a typo is an error naming the vocabulary
            if name:
                table[name.upper()] = regions
    return table


def build_series(records: dict[str, dict], secret: bytes, cfg,
                 collections_table: dict[str, list[str]]):
    """(series rows, file → (series_key, reason), review rows) from the header records."""
    file_key: dict[str, str] = {}
    by_uid: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for rel in sorted(records):
        r = records[rel]
        if r.get("uid_key"):
            by_uid[(r.get("study_key", ""), r["uid_key"])].append(rel)
    series_rows: list[dict] = []
    review_rows: list[dict] = []
    for (study_key, uid_key), rels in by_uid.items():
        # A UID is unique by the standard, but careless anonymisers reuse one
        # across studies: the study keeps such series apart.
        base = f"{study_key}|{uid_key}"
        recs = [records[p] for p in rels]
        if all(r["status"] == "not_image" for r in recs):
            key = dicom_headers.keyed_hash(secret, "series", base)
            for p in rels:
                file_key[p] = key
            series_rows.append(_bare_row(key, recs, rels, "not_image"))
            continue
        image_rels = [p for p in rels if records[p]["status"] != "not_image"]
        for p in rels:
            if records[p]["status"] == "not_image":  # an odd object inside an image series
                file_key[p] = ""
        if all(records[p].get("frames") is None for p in image_rels):
            key = dicom_headers.keyed_hash(secret, "series", base)
            for p in image_rels:
                file_key[p] = key
            series_rows.append(_bare_row(key, [records[p] for p in image_rels], image_rels,
                                         "unreadable"))
            continue
        # Slices: one per frame; orientation and size split the UID.
        slices: list[Slice] = []
        for p in image_rels:
            r = records[p]
            for i, f in enumerate(r.get("frames") or []):
                slices.append(Slice(p, i, f, r.get("acquisition", ""), r.get("sop_key", ""),
                                    r["status"] == "ok"))
        groups = []
        for og in geometry.orientation_groups(slices, lambda s: s.orientation,
                                              cfg.orientation_group_deg):
            by_size = collections.defaultdict(list)
            for s in og:
                r = records[s.path]
                by_size[(r.get("rows"), r.get("columns"))].append(s)
            for size in sorted(by_size, key=str):
                sg = by_size[size]
                orientation = sg[0].orientation
                for ag in (_split_acquisitions(sg, orientation, cfg) if orientation else [sg]):
                    groups.append((size, orientation, ag))
        for size, orientation, group in groups:
            if len(groups) == 1:
                key = dicom_headers.keyed_hash(secret, "series", base)
            else:
                acquisitions = ",".join(sorted({s.acquisition for s in group}))
                cosines = ";".join(f"{v:.2f}" for v in orientation) if orientation else "-"
                desc = f"{base}|{cosines}|{size}|{acquisitions if len(groups) > 1 else ''}"
                key = dicom_headers.keyed_hash(secret, "series", desc)
            row, review = _series_row(key, study_key, group, size, orientation, records, cfg,
                                      collections_table)
            for s in group:
                file_key[s.path] = key
            series_rows.append(row)
            review_rows.extend(review)
    return series_rows, file_key, review_rows


def _bare_row(key: str, recs: list[dict], rels: list[str], reason: str) -> dict:
    row = {c: "" for c in SERIES_COLUMNS}
    row.update(series_key=key, patient_key=_mode(r.get("patient_key") for r in recs),
               study_key=_mode(r.get("study_key") for r in recs),
               modality=_mode(r.get("modality") for r in recs), n_files=len(set(rels)),
               n_slices=0, status="excluded", reasons=reason,
               provenance=f"{reason}<-{_mode(r.get('detail') for r in recs)}")
    row["_collection"] = _mode(r.get("collection") for r in recs)
    row["_top"] = rels[0].split("/")[0] if "/" in rels[0] else ""
    return row


def _series_row(key, study_key, group: list[Slice], size, orientation, records, cfg,
                collections_table):
    paths = sorted({s.path for s in group})
    recs = [records[p] for p in paths]
    facts = _facts(recs)
    reasons: set[str] = set()
    prov: list[str] = []
    notes: list[str] = []
    readable = [s for s in group if s.readable]
    if not readable:
        reasons.add("unreadable")
    modality = facts["modality"]
    if modality not in rules.SUPPORTED_MODALITIES:
        reasons.add("unsupported_modality")

    # Geometry along the normal.
    stack = rules.Stack()
    proj = _positions_along_normal(readable, orientation) if (orientation and readable) else None
    if readable and proj is None:
        reasons.add("inconsistent_geometry")
        notes.append("missing ImagePositionPatient/ImageOrientationPatient")
    elif readable:
        stack = rules.stack_rule(proj, [s.sop_key for s in readable],
                                 [s.temporal_index for s in readable],
                                 [s.acquisition for s in readable], facts["n_temporal"], cfg)
        reasons.update(stack.reasons)
        notes.extend(stack.notes)
    spacings = [s.pixel_spacing_mm for s in readable if s.pixel_spacing_mm]
    pixel_spacing = spacings[0] if spacings else None
    if pixel_spacing and any(abs(a - b) > cfg.pixel_spacing_rel_tol * max(b, 1e-6)
                             for q in spacings for a, b in zip(q, pixel_spacing)):
        reasons.add("inconsistent_geometry")
        notes.append("PixelSpacing varies")
    n_slices = stack.n_slices if readable and proj is not None else len({(s.path, s.frame) for s in readable})
    if n_slices < cfg.min_slices:
        reasons.add("too_few_slices")
    if not facts["series_description"]:
        reasons.add("missing_description")

    seq = rules.sequence_rule(facts, cfg)
    view = rules.view_rule(orientation, cfg)
    contrast = rules.contrast_rule(facts) if modality in rules.SUPPORTED_MODALITIES else rules.Rule()
    reasons.update(seq.reasons)
    reasons.update(view.reasons)

    effective = rules.effective_spacing_mm(stack.slice_spacing_mm, n_slices, cfg.target_slices)
    if rules.spacing_too_large(effective, cfg.max_effective_spacing_mm):
        reasons.add("spacing_too_large")

    z_ext = None
    if orientation and pixel_spacing and stack.extent_mm is not None and size[0] and size[1]:
        first = readable[stack.order[0]]
        z_ext = geometry.z_extent_mm(orientation, first.position_mm, stack.extent_mm,
                                     stack.slice_spacing_mm or 0.0, size[0], size[1],
                                     pixel_spacing)
    collection = facts["collection"]
    top = paths[0].split("/")[0] if "/" in paths[0] else ""
    coll_regions = (collections_table.get(collection.upper()) if collection else None) \
        or collections_table.get(top.upper(), [])
    coverage = rules.coverage_rule(facts, z_ext, cfg, coll_regions)

    ordered = [r for r in labels.EXCLUSION_REASONS if r in reasons]
    prov = [seq.provenance, view.provenance, contrast.provenance, coverage.provenance]
    if notes:
        prov.append("geometry: " + ", ".join(notes))
    row = {
        "series_key": key,
        "patient_key": _mode(r.get("patient_key") for r in recs),
        "study_key": study_key,
        "modality": modality,
        "n_files": len(paths),
        "n_slices": n_slices,
        "sequence": seq.value,
        "view": view.value,
        "contrast": contrast.value,
        "coverage": coverage.value,
        "slice_spacing_mm": _fmt(stack.slice_spacing_mm),
        "effective_spacing_mm": _fmt(effective),
        "status": "excluded" if ordered else "included",
        "reasons": ";".join(ordered),
        "split": "",
        "provenance": " | ".join(p for p in prov if p),
        "rows": size[0] or "",
        "columns": size[1] or "",
        "pixel_spacing_mm": ";".join(_fmt(v) for v in pixel_spacing) if pixel_spacing else "",
        "orientation": ";".join(_fmt(v) for v in orientation) if orientation else "",
        "extent_mm": _fmt(stack.extent_mm),
        "_collection": collection or top,
        "_top": top,
    }
    # A person is asked only about series that the open question keeps out (or
    # would label wrongly): a localizer's unknown coverage needs no decision.
    review = []
    items = seq.review + contrast.review + coverage.review
    if set(ordered) - {"excluded_sequence"}:
        items = [i for i in items if "no rule matched" not in i]
    for item in items:
        column, _, issue = item.partition(": ")
        review.append({"series_key": key, "column": column, "issue": issue,
                       "series_description": facts["series_description"],
                       "study_description": facts["study_description"],
                       "current_value": row.get(column, ""), "provenance": row["provenance"]})
    return row, review

