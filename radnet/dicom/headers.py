"""Reads the header of one DICOM file into a small, JSON-able, PHI-free record.

This is the per-file work of ``data_prep.index``, run in worker processes. It
reads headers only (``stop_before_pixels``, a fixed ``specific_tags`` list, so
values of other elements are skipped with a seek), then checks that the pixel
data the header promises is really in the file, so a truncated file is caught
here and not when the volume builder decodes it.

Identity never leaves this module in clear: patient, study, series and instance
identifiers are turned into keyed BLAKE2 digests (``keyed_hash``) before the
record is returned, so neither the cache nor any output holds a raw UID, name,
ID or birth date. Free text (descriptions, protocol, body part, contrast agent) is
kept only as the rule words it holds (``radnet.rules.rule_words``), and error details
name no path.

Classic single-frame images give one frame; enhanced multi-frame images give one
frame per item of the per-frame functional groups (position, orientation, pixel
spacing, temporal index), with shared functional groups as the fallback.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import time
import warnings
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from radnet import rules
from radnet.dicom import values as dicom_values

# Bump when the record layout or its meaning changes: cached records made by an
# older reader are then parsed again.
READER_VERSION = 6

_KEYWORDS = (
    # identity (hashed, never stored in clear)
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
    # what the object is
    "Modality", "ImageType", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
    "NumberOfFrames", "PhotometricInterpretation",
    # descriptions
    "SeriesDescription", "StudyDescription", "ProtocolName", "BodyPartExamined",
    # MR physics
    "ScanningSequence", "SequenceVariant", "SequenceName", "RepetitionTime", "EchoTime",
    "InversionTime", "EchoPulseSequence", "EchoPlanarPulseSequence", "InversionRecovery",
    "DiffusionBValue", "MRAcquisitionType",
    # contrast
    "ContrastBolusAgent", "ContrastBolusAgentSequence",
    # geometry and time
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness",
    "AcquisitionNumber", "TemporalPositionIdentifier", "NumberOfTemporalPositions",
    # enhanced multi-frame
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)
# TCIA exports carry the collection name in a private block "CTP" (0013,xx10).
_CTP_CREATOR = 0x00130010
_CTP_PROJECT = 0x00131010
SPECIFIC_TAGS = [tag_for_keyword(k) for k in _KEYWORDS] + [_CTP_CREATOR, _CTP_PROJECT]

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
_SEQ_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SEQ_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"


def keyed_hash(secret: bytes, domain: str, value: str, digest_size: int = 16) -> str:
    """BLAKE2b keyed with the site secret: stable on one site, meaningless elsewhere."""
    h = hashlib.blake2b(key=secret[:64], digest_size=digest_size, person=domain.encode()[:16])
    h.update(value.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


_get = dicom_values.value


def _text(ds, keyword: str) -> str:
    value = _get(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _strings(ds, keyword: str) -> list[str]:
    value = _get(ds, keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\") if v.strip()]
    try:
        return [str(v).strip().upper() for v in value if str(v).strip()]
    except TypeError:
        return [str(value).strip().upper()]


_floats = dicom_values.numbers


def _int(ds, keyword: str) -> int | None:
    value = _floats(ds, keyword)
    if not value:
        return None
    return int(round(value[0]))


def _item(ds, keyword: str):
    """First item of a sequence element, or None."""
    seq = _get(ds, keyword)
    if not seq:
        return None
    try:
        return seq[0]
    except (IndexError, TypeError):
        return None


def _in_groups(groups, seq_kw: str, kw: str):
    """First item of the macro ``seq_kw`` in a functional-group item (holding ``kw``)."""
    if groups is None:
        return None
    item = _item(groups, seq_kw)
    if item is None:
        return None
    return item


def _identity(ds, secret: bytes) -> dict[str, str]:
    series_uid = _text(ds, "SeriesInstanceUID")
    study_uid = _text(ds, "StudyInstanceUID")
    patient_id = _text(ds, "PatientID")
    issuer = _text(ds, "IssuerOfPatientID")
    if patient_id:
        patient_src = f"id:{issuer}|{patient_id}"
    else:
        # No ID: name + birth date is the next best patient identity; without
        # either, the study stands for its own patient (cannot leak across
        # splits within the study).
        name, birth = _text(ds, "PatientName"), _text(ds, "PatientBirthDate")
        patient_src = f"name:{name}|{birth}" if (name or birth) else f"study:{study_uid}"
    sop_uid = _text(ds, "SOPInstanceUID")
    return {
        "uid_key": keyed_hash(secret, "series", series_uid) if series_uid else "",
        "study_key": keyed_hash(secret, "study", study_uid) if study_uid else "",
        "patient_key": keyed_hash(secret, "patient", patient_src),
        "sop_key": keyed_hash(secret, "sop", sop_uid, digest_size=8) if sop_uid else "",
    }


def _collection(ds) -> str:
    try:
        creator = ds.get(_CTP_CREATOR)
        if creator is not None and str(creator.value).strip().upper() == "CTP":
            project = ds.get(_CTP_PROJECT)
            if project is not None:
                value = project.value
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                return str(value).strip()
    except Exception:  # noqa: BLE001 -- an odd private block is not worth failing a file
        return ""
    return ""


def _is_image_sop(sop_class: str, media_class: str, ds) -> tuple[bool, str]:
    """(is an image, name of the SOP class). Images are the '* Image Storage' classes."""
    uid = sop_class or media_class
    name = UID(uid).name if uid else ""
    if uid == "1.2.840.10008.1.3.10":  # Media Storage Directory (DICOMDIR)
        return False, name
    if uid and name != uid:  # a known class: its name says whether it is an image
        return "Image Storage" in name, name
    # Unknown or absent SOP class: an object with a pixel matrix counts as an image.
    return (_get(ds, "Rows") is not None and _get(ds, "Columns") is not None), name or uid


def _check_pixel_data(fp, ds, file_size: int, n_frames: int) -> str:
    """'' if the Pixel Data the header promises is in the file, else why not.

    Called with ``fp`` where ``stop_before_pixels`` left it: at the start of the
    pixel element. Reads at most 12 bytes (+8 at the end for encapsulated data).
    """
    meta = getattr(ds, "file_meta", None)
    syntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    if syntax == _DEFLATED:
        # Deflated: pydicom inflated the data set into memory, so the file
        # offset says nothing; the volume builder's decode is the check.
        return ""
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return "no Pixel Data element"
    is_implicit, is_little = ds.original_encoding
    if is_little is None:
        is_little = True
    endian = "<" if is_little else ">"
    group, elem = struct.unpack(endian + "HH", head[:4])
    if (group << 16 | elem) not in _PIXEL_TAGS:
        return "no Pixel Data element"
    vr = head[4:6]
    if not is_implicit and vr.isalpha():
        if len(head) < 12:
            return "truncated in the Pixel Data element header"
        length = struct.unpack(endian + "I", head[8:12])[0]
        value_start = start + 12
    else:
        length = struct.unpack(endian + "I", head[4:8])[0]
        value_start = start + 8
    if length == 0xFFFFFFFF:
        # Encapsulated (compressed) frames: a complete file ends with the
        # sequence delimiter, possibly followed by trailing padding.
        tail_len = min(file_size - value_start, 65536)
        fp.seek(file_size - tail_len)
        tail = fp.read(tail_len)
        delimiter = _SEQ_DELIMITER_LE if is_little else _SEQ_DELIMITER_BE
        if tail.endswith(delimiter) or delimiter in tail:
            return ""
        return "encapsulated Pixel Data has no sequence delimiter (truncated)"
    if value_start + length > file_size:
        return (f"truncated: Pixel Data declares {length} bytes, "
                f"file holds {max(file_size - value_start, 0)}")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits, spp = _int(ds, "BitsAllocated"), _int(ds, "SamplesPerPixel") or 1
    if rows and cols and bits:
        expected = (rows * cols * spp * n_frames * bits + 7) // 8
        if _text(ds, "PhotometricInterpretation").upper() == "YBR_FULL_422":
            expected = expected * 2 // 3  # chroma subsampled 2:1 horizontally
        if length < expected:
            return (f"Pixel Data holds {length} bytes, Rows×Columns×frames×bits "
                    f"needs {expected}")
    return ""


def _frames(ds) -> list[dict[str, Any]]:
    """Per-frame geometry: position_mm [3] (ImagePositionPatient), orientation [6]
    (ImageOrientationPatient), pixel_spacing_mm [2] (between rows, between columns),
    temporal_index."""
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    if not per_frame:
        return [{
            "position_mm": _floats(ds, "ImagePositionPatient"),
            "orientation": _floats(ds, "ImageOrientationPatient"),
            "pixel_spacing_mm": _floats(ds, "PixelSpacing"),
            "temporal_index": _int(ds, "TemporalPositionIdentifier"),
        }]

    def lookup(frame, seq_kw, kw, conv):
        for groups in (frame, shared):
            item = _in_groups(groups, seq_kw, kw)
            if item is not None:
                value = conv(item, kw)
                if value is not None:
                    return value
        return None

    frames = []
    for frame in per_frame:
        frames.append({
            "position_mm": lookup(frame, "PlanePositionSequence", "ImagePositionPatient",
                                  _floats),
            "orientation": lookup(frame, "PlaneOrientationSequence", "ImageOrientationPatient",
                                  _floats),
            "pixel_spacing_mm": lookup(frame, "PixelMeasuresSequence", "PixelSpacing", _floats),
            "temporal_index": lookup(frame, "FrameContentSequence", "TemporalPositionIndex", _int),
        })
    return frames


def _enhanced_mr(ds) -> dict[str, Any]:
    """MR physics of an enhanced MR object, from its functional groups.

    Enhanced MR has no ScanningSequence; EchoPulseSequence (SPIN/GRADIENT/BOTH),
    InversionRecovery and EchoPlanarPulseSequence say the same thing, and TR / TE
    / TI live in the timing, echo and modifier macros (frame 1, else shared).
    """
    out: dict[str, Any] = {}
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    first = per_frame[0] if per_frame else None

    def find(seq_kw, kw, conv):
        for groups in (first, shared):
            item = _in_groups(groups, seq_kw, kw)
            if item is not None:
                value = conv(item, kw)
                if value:
                    return value
        return None

    ss = []
    echo = _text(ds, "EchoPulseSequence").upper()
    if echo == "SPIN":
        ss.append("SE")
    elif echo in ("GRADIENT", "BOTH"):
        ss.append("GR")
    ir = (find("MRModifierSequence", "InversionRecovery", _strings) or
          _strings(ds, "InversionRecovery"))
    if ir and ir[0] == "YES":
        ss.append("IR")
    if _text(ds, "EchoPlanarPulseSequence").upper() == "YES":
        ss.append("EP")
    out["ss"] = ss
    out["tr"] = find("MRTimingAndRelatedParametersSequence", "RepetitionTime", _floats)
    out["te"] = find("MREchoSequence", "EffectiveEchoTime", _floats)
    out["ti"] = find("MRModifierSequence", "InversionTimes", _floats)
    frame_type = (find("MRImageFrameTypeSequence", "FrameType", _strings) or
                  find("CTImageFrameTypeSequence", "FrameType", _strings))
    out["frame_type"] = frame_type or []
    bvalues = set()
    for frame in per_frame or []:
        item = _in_groups(frame, "MRDiffusionSequence", "DiffusionBValue")
        if item is not None:
            b = _floats(item, "DiffusionBValue")
            if b:
                bvalues.add(b[0])
    out["bvalues"] = sorted(bvalues)
    agent = find("ContrastBolusUsageSequence", "ContrastBolusAgentAdministered", _strings)
    out["agent_administered"] = agent[0] if agent else ""
    return out


# Bytes read ahead and parsed in memory; classic headers take 1-20 KiB, and a
# header longer than this (large enhanced multi-frame objects) is parsed from
# the file.
PREFIX_BYTES = 64 * 1024
_DEFLATED = "1.2.840.10008.1.2.1.99"


class HeaderBudgetExceeded(Exception):
    """Reading one header took more bytes or seconds than its budget allows."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # "too_large" (bytes) or "timeout" (seconds)


class _Budgeted:
    """A file that raises :class:`HeaderBudgetExceeded` once more than ``max_bytes`` have
    been read from it or ``max_seconds`` have passed since it was opened (checked at each
    read: pydicom reads element by element, so a file of zeros parsed as millions of empty
    elements is stopped, as is a file on a mount that crawls)."""

    def __init__(self, fp, max_bytes: int | None, max_seconds: float | None):
        self._fp, self._max_bytes = fp, max_bytes
        self._deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self._max_seconds = max_seconds
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._fp.read(size)
        self._read += len(data)
        if self._max_bytes is not None and self._read > self._max_bytes:
            raise HeaderBudgetExceeded("too_large", f"header longer than {self._max_bytes} bytes")
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise HeaderBudgetExceeded("timeout", f"header not read within {self._max_seconds:g} s")
        return data

    def __getattr__(self, name):  # seek, tell, name, …: the file's own
        return getattr(self._fp, name)


def _parse(src):
    """(data set, forced) from a file-like at 0; (None, True) when it is not DICOM."""
    try:
        return pydicom.dcmread(src, stop_before_pixels=True,
                               specific_tags=SPECIFIC_TAGS), False
    except InvalidDicomError:
        # No preamble/"DICM": an old or raw dataset, or not DICOM at all.
        # force=True parses anything, so accept only what really looks
        # like a DICOM object.
        src.seek(0)
        ds = pydicom.dcmread(src, stop_before_pixels=True, force=True,
                             specific_tags=SPECIFIC_TAGS)
        if not (_text(ds, "SOPClassUID") or
                (_text(ds, "Modality") and _text(ds, "SeriesInstanceUID"))):
            return None, True
        return ds, True


def _stopped_at_pixels(src: io.BytesIO, ds, prefix: bytes) -> bool:
    """Whether a parse of the ``prefix`` of a longer file is the parse of the file.

    It is when the parse stopped at a Pixel Data element whose element header
    lies inside the prefix: every element before it was then read from bytes
    that are the file's own. A header cut by the prefix instead ends the parse
    at (or raises at) the end of the prefix. Deflated data sets are inflated
    from the rest of the file, so they are always parsed from the file.
    """
    if ds is None:
        return False
    meta = getattr(ds, "file_meta", None)
    if meta is not None and _text(meta, "TransferSyntaxUID") == _DEFLATED:
        return False
    pos = src.tell()
    if pos + 12 > len(prefix):
        return False
    head = prefix[pos:pos + 4]
    is_little = ds.original_encoding[1]
    group, elem = struct.unpack("<HH" if is_little is not False else ">HH", head)
    return (group << 16 | elem) in _PIXEL_TAGS


def read_header(path: str, secret: bytes, max_bytes: int | None = None,
                max_seconds: float | None = None) -> dict[str, Any]:
    """One file → a record (dict of plain values). Never raises for bad input.

    ``status`` is ``ok`` (an image with a header we can use), ``not_image``
    (a readable DICOM object without images: SR, RT, PR, DICOMDIR, …) or
    ``unreadable`` (not DICOM, truncated, malformed); ``detail`` says why. An unreadable
    record may name a ``reason`` of labels.EXCLUSION_REASONS other than ``unreadable``:
    ``too_large`` (more than ``max_bytes`` read) or ``timeout`` (more than ``max_seconds``;
    then ``transient`` is true: the next run tries again). Only regular files are opened
    (a FIFO would block the open forever).
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return {"status": "unreadable", "detail": f"not a regular file ({_file_kind(st.st_mode)})"}
        file_size = st.st_size
        with open(path, "rb") as raw_fp, warnings.catch_warnings():
            fp = raw_fp if max_bytes is None and max_seconds is None else \
                _Budgeted(raw_fp, max_bytes, max_seconds)
            warnings.simplefilter("ignore")  # invalid VR values are handled per value below
            # Parse from the file's first bytes in memory: pydicom asks the file
            # for its position several times per element, and on a real file each
            # ask is a system call (a third of the parse time). When the header
            # does not fit the prefix, parse the file itself.
            prefix = fp.read(PREFIX_BYTES)
            src = io.BytesIO(prefix)
            whole = len(prefix) >= file_size
            parsed = None
            if not whole:
                try:
                    parsed = _parse(src)
                except Exception:  # noqa: BLE001 -- the prefix may end mid-element
                    parsed = None
                if parsed is not None and parsed[0] is None:
                    # No preamble, and a forced parse of the first PREFIX_BYTES finds no
                    # SOP class nor modality + series UID (group 0008/0020 elements lead
                    # every data set): not DICOM. Parsing the rest of a large file of
                    # zeros as empty elements took minutes.
                    return {"status": "unreadable", "detail": "not a DICOM file"}
                if parsed is not None and not _stopped_at_pixels(src, parsed[0], prefix):
                    parsed = None
                if parsed is None:
                    fp.seek(0)
                    src = fp
            if parsed is None:
                parsed = _parse(src)
            ds, forced = parsed
            if ds is None:
                return {"status": "unreadable", "detail": "not a DICOM file"}
            if src is not fp and not whole:
                fp.seek(src.tell())
                src = fp  # the pixel check may look at the end of the file
            media_class = ""
            meta = getattr(ds, "file_meta", None)
            if meta is not None:
                media_class = _text(meta, "MediaStorageSOPClassUID")
                group_len = _int(meta, "FileMetaInformationGroupLength")
                # 128-byte preamble + "DICM" + the group-length element (12 bytes).
                if not forced and group_len is not None and 144 + int(group_len) > file_size:
                    return {"status": "unreadable",
                            "detail": "truncated inside the File Meta Information"}
            sop_class = _text(ds, "SOPClassUID")
            is_image, sop_name = _is_image_sop(sop_class, media_class, ds)
            n_frames = _int(ds, "NumberOfFrames") or 1
            record: dict[str, Any] = {
                "status": "ok" if is_image else "not_image",
                "detail": "" if is_image else f"not an image object ({sop_name or 'no SOP class'})",
                "sop_class": sop_name,
                "modality": _text(ds, "Modality").upper(),
                "collection": _collection(ds),
            }
            record.update(_identity(ds, secret))
            if not is_image:
                return record
            if not record["uid_key"]:
                return {"status": "unreadable", "detail": "image without SeriesInstanceUID"}
            # A file whose pixels are cut short keeps its header facts (so it is
            # counted in its series) but is itself unreadable.
            problem = _check_pixel_data(src, ds, file_size, n_frames)
            if problem:
                record.update(status="unreadable", detail=problem)
            record.update({
                # Free text only as the rule words it holds (radnet.rules.rule_words):
                # names typed into descriptions never reach the cache or an output.
                "series_description": rules.rule_words(_text(ds, "SeriesDescription")),
                "study_description": rules.rule_words(_text(ds, "StudyDescription")),
                "protocol_name": rules.rule_words(_text(ds, "ProtocolName")),
                "body_part": rules.rule_words(_text(ds, "BodyPartExamined")),
                "image_type": _strings(ds, "ImageType"),
                "rows": _int(ds, "Rows"),
                "columns": _int(ds, "Columns"),
                "n_frames": n_frames,
                "acquisition": _text(ds, "AcquisitionNumber"),
                "n_temporal": _int(ds, "NumberOfTemporalPositions"),
                "ss": _strings(ds, "ScanningSequence"),
                "sv": _strings(ds, "SequenceVariant"),
                "tr": _floats(ds, "RepetitionTime"),
                "te": _floats(ds, "EchoTime"),
                "ti": _floats(ds, "InversionTime"),
                "bvalues": [b for b in (_floats(ds, "DiffusionBValue") or [])],
                "agent": _agent(_text(ds, "ContrastBolusAgent")),
                "agent_seq": bool(_get(ds, "ContrastBolusAgentSequence")),
                "agent_administered": "",
                "frame_type": [],
                "frames": _frames(ds),
            })
            if _get(ds, "PerFrameFunctionalGroupsSequence"):
                enhanced = _enhanced_mr(ds)
                for key in ("ss", "tr", "te", "ti"):
                    if not record[key] and enhanced[key]:
                        record[key] = enhanced[key]
                record["frame_type"] = enhanced["frame_type"]
                record["bvalues"] = sorted(set(record["bvalues"]) | set(enhanced["bvalues"]))
                record["agent_administered"] = enhanced["agent_administered"]
            return record
    except HeaderBudgetExceeded as e:
        return {"status": "unreadable", "reason": e.reason, "detail": str(e),
                "transient": e.reason == "timeout"}
    except OSError as e:  # its text would name the file (an absolute path)
        return {"status": "unreadable", "detail": f"{type(e).__name__}: {e.strerror or 'I/O error'}"}
    except Exception as e:  # noqa: BLE001 -- any parse failure is a recorded reason, not a crash
        message = str(e).splitlines()[0][:160] if str(e) else ""
        message = message.replace(path, "<file>").replace(os.path.dirname(path), "<folder>")
        return {"status": "unreadable", "detail": f"{type(e).__name__}: {message}"}


def _agent(text: str) -> str:
    """ContrastBolusAgent as the contrast rule reads it: empty, one of its words for "none",
    or ``NAMED`` for any agent (its name, free text, is not kept)."""
    value = text.strip().upper()
    if value in rules.CONTRAST_NONE_WORDS:
        return value
    return "NAMED"


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"
