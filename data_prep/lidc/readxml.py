"""The LIDC-IDRI reading XML (``LidcReadMessage``), parsed with the standard library.

Element structure (the LIDC documentation; the optional namespace ``http://www.nih.gov`` is
ignored by matching local names)::

    LidcReadMessage
      ResponseHeader/ SeriesInstanceUid, StudyInstanceUID
      readingSession*                       one radiologist's blinded+unblinded reading
        unblindedReadNodule*                a nodule (≥ 3 mm: outline + characteristics;
          noduleID                                    < 3 mm: one point, no characteristics)
          characteristics/ malignancy (1–5), subtlety, …
          roi*/ imageZposition, imageSOP_UID, inclusion (TRUE|FALSE), edgeMap*/ xCoord, yCoord
        nonNodule*/ nonNoduleID, imageZposition, imageSOP_UID, locus/ xCoord, yCoord

Coordinates are pixel columns (x) and rows (y) of the referenced image; z is the image's
z position in mm. Each parsed annotation keeps its reading session's index (the reader).
Files that are not a CT reading (the chest X-ray ``IdriReadMessage``, a broken file) raise
``XmlError`` with a short reason for the status table.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import numpy as np

SMALL, NODULE, NON_NODULE = "small_nodule", "nodule", "non_nodule"


class XmlError(ValueError):
    """A file that yields no CT reading; ``reason`` goes to the status table."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Roi:
    z_mm: float
    sop_uid: str
    inclusion: bool
    points_xy: np.ndarray           # [N, 2] pixel (column, row), in file order


@dataclasses.dataclass
class Annotation:
    """One reader's mark: a nodule with outlines, a small nodule (one point) or a non-nodule."""

    reader: int                     # index of the readingSession in the file (0-based)
    kind: str                       # NODULE | SMALL | NON_NODULE
    annotation_id: str              # noduleID / nonNoduleID as written (may be free text)
    malignancy: int | None          # 1–5 for a characterised nodule
    rois: list[Roi]
    status: str = "parsed"
    reason: str = ""


@dataclasses.dataclass
class ReadMessage:
    series_uid: str
    study_uid: str
    num_readers: int
    annotations: list[Annotation]


def _local(tag) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(elem, name: str):
    return [c for c in elem if _local(c.tag) == name]


def _child(elem, name: str):
    found = _children(elem, name)
    return found[0] if found else None


def _text(elem, name: str) -> str:
    c = _child(elem, name) if elem is not None else None
    return (c.text or "").strip() if c is not None else ""


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _points(parent, tag: str) -> np.ndarray:
    pts = []
    for p in _children(parent, tag):
        x, y = _float(_text(p, "xCoord")), _float(_text(p, "yCoord"))
        if x is not None and y is not None:
            pts.append((x, y))
    return np.asarray(pts, np.float64).reshape(-1, 2)


def _roi(elem) -> Roi | None:
    z = _float(_text(elem, "imageZposition"))
    if z is None:
        return None
    inclusion = _text(elem, "inclusion").upper() != "FALSE"
    return Roi(z, _text(elem, "imageSOP_UID"), inclusion, _points(elem, "edgeMap"))


def _nodule(elem, reader: int) -> Annotation:
    nid = _text(elem, "noduleID")
    chars = _child(elem, "characteristics")
    malignancy = None
    if chars is not None:
        m = _float(_text(chars, "malignancy"))
        malignancy = int(m) if m is not None and 1 <= m <= 5 and m == int(m) else None
    raw = _children(elem, "roi")
    rois = [r for r in (_roi(e) for e in raw) if r is not None]
    n_points = sum(len(r.points_xy) for r in rois)
    kind = SMALL if (n_points == 1 and malignancy is None) else NODULE
    ann = Annotation(reader, kind, nid, malignancy, rois)
    if len(rois) < len(raw):
        ann.status, ann.reason = "excluded", "roi_without_z_position"
    elif not rois or n_points == 0:
        ann.status, ann.reason = "excluded", "no_outline"
    elif kind == NODULE and malignancy is None:
        # An outlined nodule without a malignancy rating still marks a nodule; its rating
        # is simply missing from the median.
        ann.reason = "no_malignancy_rating"
    return ann


def _non_nodule(elem, reader: int) -> Annotation:
    z = _float(_text(elem, "imageZposition"))
    locus = _child(elem, "locus")
    pts = _points(elem, "locus") if locus is not None else np.zeros((0, 2))
    ann = Annotation(reader, NON_NODULE, _text(elem, "nonNoduleID"), None,
                     [Roi(z, _text(elem, "imageSOP_UID"), True, pts)] if z is not None else [])
    if z is None or len(pts) != 1:
        ann.status, ann.reason = "excluded", "non_nodule_without_locus"
    return ann


def parse(source) -> ReadMessage:
    """A path or file object → ``ReadMessage``; ``XmlError`` when it holds no CT reading."""
    try:
        root = ET.parse(source).getroot()
    except ET.ParseError as e:
        raise XmlError("xml_parse_error", str(e)) from None
    if _local(root.tag) != "LidcReadMessage":
        raise XmlError("not_a_ct_reading", f"root element is {_local(root.tag)!r}, "
                       "not LidcReadMessage (e.g. a chest X-ray IdriReadMessage)")
    header = _child(root, "ResponseHeader")
    series_uid = _text(header, "SeriesInstanceUid") or _text(header, "SeriesInstanceUID")
    study_uid = _text(header, "StudyInstanceUID") or _text(header, "StudyInstanceUid")
    if not series_uid:
        raise XmlError("no_series_uid", "ResponseHeader has no SeriesInstanceUid")
    sessions = _children(root, "readingSession")
    if not sessions:
        raise XmlError("no_reading_session", "the file holds no readingSession")
    annotations = []
    for reader, session in enumerate(sessions):
        annotations += [_nodule(e, reader) for e in _children(session, "unblindedReadNodule")]
        annotations += [_non_nodule(e, reader) for e in _children(session, "nonNodule")]
    return ReadMessage(series_uid, study_uid, len(sessions), annotations)


# ----------------------------------------------------------------------------- writing

def write(path: str, series_uid: str, study_uid: str, sessions: list[list[dict]],
          namespace: bool = True) -> None:
    """Writes a LidcReadMessage (used by the phantom generator and the tests).

    ``sessions``: per reader, a list of marks: ``{"kind": NODULE, "id", "malignancy",
    "rois": [(z_mm, sop_uid, inclusion, [(x, y), ...]), ...]}``, ``{"kind": SMALL, "id",
    "roi": (z_mm, sop_uid, (x, y))}`` or ``{"kind": NON_NODULE, "id", "z_mm", "sop_uid",
    "xy": (x, y)}``.
    """
    ns = "{http://www.nih.gov}" if namespace else ""
    if namespace:
        ET.register_namespace("", "http://www.nih.gov")

    def sub(parent, name, text=None):
        e = ET.SubElement(parent, ns + name)
        if text is not None:
            e.text = str(text)
        return e

    def xy(parent, name, point):
        e = sub(parent, name)
        sub(e, "xCoord", int(round(point[0])))
        sub(e, "yCoord", int(round(point[1])))

    root = ET.Element(ns + "LidcReadMessage", {"uid": "radnet-phantom"})
    header = sub(root, "ResponseHeader")
    sub(header, "Version", "1.8.1")
    sub(header, "StudyInstanceUID", study_uid)
    sub(header, "SeriesInstanceUid", series_uid)
    for marks in sessions:
        s = sub(root, "readingSession")
        sub(s, "annotationVersion", "3.12")
        sub(s, "servicingRadiologistID", "anonymous")
        for m in marks:
            if m["kind"] == NON_NODULE:
                e = sub(s, "nonNodule")
                sub(e, "nonNoduleID", m["id"])
                sub(e, "imageZposition", f"{m['z_mm']:.3f}")
                sub(e, "imageSOP_UID", m["sop_uid"])
                xy(e, "locus", m["xy"])
                continue
            e = sub(s, "unblindedReadNodule")
            sub(e, "noduleID", m["id"])
            if m["kind"] == SMALL:
                z, sop, point = m["roi"]
                r = sub(e, "roi")
                sub(r, "imageZposition", f"{z:.3f}")
                sub(r, "imageSOP_UID", sop)
                sub(r, "inclusion", "TRUE")
                xy(r, "edgeMap", point)
                continue
            c = sub(e, "characteristics")
            for name, value in (("subtlety", 4), ("internalStructure", 1),
                                ("calcification", 6), ("sphericity", 4), ("margin", 4),
                                ("lobulation", 1), ("spiculation", 1), ("texture", 5),
                                ("malignancy", m["malignancy"])):
                sub(c, name, value)
            for z, sop, inclusion, points in m["rois"]:
                r = sub(e, "roi")
                sub(r, "imageZposition", f"{z:.3f}")
                sub(r, "imageSOP_UID", sop)
                sub(r, "inclusion", "TRUE" if inclusion else "FALSE")
                for p in points:
                    xy(r, "edgeMap", p)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
