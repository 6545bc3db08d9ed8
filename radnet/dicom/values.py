"""Fast reads of single DICOM attribute values from a pydicom Dataset.

pydicom converts a raw element through hooks, validation and value classes, and
normalises every key with Tag() first; for the few numbers, codes and short texts
that the index and the volume builder read from every file, that costs more than
parsing the file. :func:`value` reads the element store directly and decodes the
common cases from the raw bytes, exactly as pydicom would return them for the
callers' purposes (numbers, codes and UIDs are ASCII by the standard; single binary
numbers; text without ISO 2022 escapes, decoded with the data set's character set,
pydicom's own shortcut). Anything else — sequences, ambiguous VRs, unusual encodings
— goes through pydicom.
"""

from __future__ import annotations

import struct

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement

_ASCII_VRS = frozenset({"DS", "IS", "CS", "UI", "DA", "TM", "AS"})
# Multi-valued text VRs whose bytes depend on (0008,0005) Specific Character Set.
_TEXT_VRS = frozenset({"LO", "SH", "UC"})
# Single binary numbers: struct format per VR.
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_ESC = 0x1B

_TAG_OF: dict[str, int | None] = {}
# Implicit-VR files carry no VR: the data dictionary gives it (an ambiguous one, such as
# "US or SS", decodes through pydicom, which resolves it from the data set).
_DICT_VR: dict[int, str | None] = {}

SLOW = object()  # "decode this one with pydicom"


def tag_of(keyword: str) -> int | None:
    """The tag of a data dictionary keyword (cached); None if unknown."""
    try:
        return _TAG_OF[keyword]
    except KeyError:
        tag = _TAG_OF[keyword] = tag_for_keyword(keyword)
        return tag


def _dict_vr(tag: int) -> str | None:
    try:
        return _DICT_VR[tag]
    except KeyError:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = None
        _DICT_VR[tag] = vr
        return vr


def raw_value(ds, elem, tag: int):
    """The value of a raw (unconverted) element, decoded as pydicom would; SLOW if unsure.

    DS and IS come back as their text (a list of texts when multi-valued).
    """
    raw = elem.value
    if not isinstance(raw, bytes):
        return SLOW
    vr = elem.VR
    if vr is None:  # implicit VR
        vr = _dict_vr(tag)
    if vr in _ASCII_VRS:
        text = raw.decode("latin-1").strip(" \x00")
        if vr in ("DS", "IS"):
            return text if "\\" not in text else text.split("\\")
        return text
    fmt = _NUMBER_FORMATS.get(vr)
    if fmt is not None:
        if not raw:
            return None
        if len(raw) != struct.calcsize(fmt):
            return SLOW
        return struct.unpack(("<" if elem.is_little_endian else ">") + fmt, raw)[0]
    if vr in _TEXT_VRS and _ESC not in raw:
        encodings = ds._character_set  # noqa: SLF001 -- the set pydicom itself decodes with
        first = encodings if isinstance(encodings, str) else encodings[0]
        try:
            text = raw.decode(first)
        except (UnicodeError, LookupError):
            return SLOW
        values = [v.rstrip("\0 ") for v in text.split("\\")]
        return values[0] if len(values) == 1 else values
    return SLOW


def element(ds, keyword: str):
    """The stored element (raw or converted) of ``keyword``, or None when absent."""
    tag = tag_of(keyword)
    if tag is None:
        return None
    try:
        # The element store itself: Dataset.get_item first normalises the key with
        # Tag(), which costs as much as the lookup.
        return ds._dict.get(tag)  # noqa: SLF001
    except Exception:  # noqa: BLE001
        return None


def has(ds, keyword: str) -> bool:
    """``keyword in ds``, without pydicom's key normalisation."""
    return element(ds, keyword) is not None


def value(ds, keyword: str):
    """Element value or None; a value that fails to convert counts as absent."""
    elem = element(ds, keyword)
    if elem is None:
        return None
    if isinstance(elem, DataElement):  # converted already (sequences, repeated reads)
        return elem.value
    decoded = raw_value(ds, elem, tag_of(keyword))
    if decoded is not SLOW:
        return decoded
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 -- malformed value: treat as missing, the run goes on
        return None


def number(ds, keyword: str, default=None, strict: bool = False):
    """A single numeric value as float (the first of several), or ``default`` when absent
    or empty. A value that is no number also gives ``default``, or with ``strict``
    raises ValueError."""
    v = value(ds, keyword)
    if v is None or v == "":
        return default
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        if not len(v):
            return default
        v = v[0]
    try:
        return float(v)
    except (TypeError, ValueError):
        if strict:
            raise ValueError(f"{keyword} is not a number: {v!r}") from None
        return default


def numbers(ds, keyword: str) -> list[float] | None:
    """All values of a numeric attribute as floats; None if absent or not numeric."""
    v = value(ds, keyword)
    if v is None or v == "":
        return None
    try:
        if isinstance(v, (str, bytes)):
            parts = v.decode() if isinstance(v, bytes) else v
            return [float(p) for p in parts.split("\\") if p.strip()]
        try:
            return [float(p) for p in v]
        except TypeError:
            return [float(v)]
    except (TypeError, ValueError):
        return None
