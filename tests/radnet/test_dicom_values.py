"""radnet.dicom.values: the raw element fast path against plain pydicom, on every file
pydicom ships (its test files and its character-set files).

For every element of every data set (top level and sequence items, recursively) whose
raw bytes the fast path decodes, the value must be what pydicom's own conversion gives
(``ds[tag].value``) in the form the callers use it: DS and IS come back as text (the
callers take ``float`` of it), multi-valued text as the list of its values. Where the
fast path is unsure it declines (``SLOW``) and the callers fall back to pydicom. A file
pydicom cannot read is skipped, with its reason counted; so is an element pydicom itself
cannot convert.
"""

from __future__ import annotations

import collections
import math
import os
import warnings

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from radnet.dicom import headers, values

# The attributes the index (headers.SPECIFIC_TAGS) and the volume builder read.
_BUILDER_KEYWORDS = ("PixelPaddingValue", "PixelPaddingRangeLimit", "BitsAllocated",
                     "BitsStored", "PixelRepresentation", "SamplesPerPixel", "Rows", "Columns",
                     "NumberOfFrames", "PhotometricInterpretation", "RescaleSlope",
                     "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient",
                     "TransferSyntaxUID")


def _as_list(value) -> list:
    """A decoded value as the list of its values (what a caller iterates over)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    if isinstance(value, str):
        return value.split("\\") if value else []
    return [value]


def _number(value):
    """A DS/IS value as a float; an invalid one (pydicom keeps its text) as its text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value).strip()


def _equal(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float)
                      and math.isnan(a) and math.isnan(b))


def _same(vr: str, fast, reference) -> bool:
    fast_values, ref_values = _as_list(fast), _as_list(reference)
    if len(fast_values) != len(ref_values):
        return False
    if vr in ("DS", "IS"):  # text from the fast path, numbers from pydicom
        return all(_equal(_number(f) if str(f).strip() else "",
                          _number(r) if r is not None and str(r).strip() else "")
                   for f, r in zip(fast_values, ref_values))
    return all(_equal(f, r) for f, r in zip(fast_values, ref_values))


def _compare(raw_ds, ref_ds, stats, mismatches, where):
    """Every raw element of ``raw_ds`` through the fast path against ``ref_ds``'s value."""
    for tag in list(raw_ds._dict):  # noqa: SLF001 -- the store the fast path reads
        elem = raw_ds._dict[tag]  # noqa: SLF001
        if not isinstance(elem, RawDataElement):
            continue
        try:
            reference = ref_ds[tag]
            ref_value = reference.value
        except Exception as err:  # noqa: BLE001 -- pydicom cannot convert it: not comparable
            stats[f"skipped element: pydicom raised {type(err).__name__}"] += 1
            continue
        if reference.VR == "SQ":
            for k, (raw_item, ref_item) in enumerate(zip(raw_ds[tag].value, ref_value)):
                _compare(raw_item, ref_item, stats, mismatches, f"{where} {tag}[{k}]")
            continue
        fast = values.raw_value(raw_ds, elem, int(tag))
        if fast is values.SLOW:
            stats["declined"] += 1
            continue
        stats["compared"] += 1
        stats[f"compared {reference.VR}"] += 1
        if reference.keyword:
            stats["keyword " + reference.keyword] += 1
        if not _same(reference.VR, fast, ref_value):
            mismatches.append(f"{where} {tag} {reference.keyword} {reference.VR}: "
                              f"fast {fast!r} != pydicom {ref_value!r}")


@pytest.fixture(scope="module")
def equivalence():
    stats: collections.Counter = collections.Counter()
    mismatches: list[str] = []
    # get_testdata_files() also lists the folders of its DICOMDIR trees: files only.
    files = sorted(p for p in set(get_testdata_files()) | set(get_charset_files())
                   if os.path.isfile(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the invalid values it ships
        for path in files:
            name = os.path.basename(path)
            try:
                raw_ds, ref_ds = pydicom.dcmread(path), pydicom.dcmread(path)
            except InvalidDicomError:
                # No preamble: read as the header reader does (force), if pydicom can.
                try:
                    raw_ds = pydicom.dcmread(path, force=True)
                    ref_ds = pydicom.dcmread(path, force=True)
                    if not raw_ds._dict:  # noqa: SLF001 -- force parsed nothing: not DICOM
                        raise InvalidDicomError("no elements")
                except Exception as err:  # noqa: BLE001 -- counted, by reason
                    stats[f"skipped file: {type(err).__name__}"] += 1
                    continue
                stats["files read with force"] += 1
            except Exception as err:  # noqa: BLE001 -- counted, by reason
                stats[f"skipped file: {type(err).__name__}"] += 1
                continue
            stats["files"] += 1
            meta = getattr(raw_ds, "file_meta", None)
            if meta is not None:
                _compare(meta, ref_ds.file_meta, stats, mismatches, f"{name} meta")
            _compare(raw_ds, ref_ds, stats, mismatches, name)
    return stats, mismatches, len(files)


def test_fast_path_equals_pydicom_on_every_bundled_file(equivalence):
    stats, mismatches, n_files = equivalence
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped file")}
    print(f"{n_files} files: {stats['files']} read ({stats['files read with force']} with "
          f"force), skipped {skipped}; "
          f"{stats['compared']} elements compared, {stats['declined']} declined")
    assert stats["files"] + sum(skipped.values()) == n_files  # every file accounted for
    assert stats["files"] > 150 and stats["compared"] > 5000
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:40])


def test_every_supported_vr_and_the_read_keywords_are_exercised(equivalence):
    stats, _, _ = equivalence
    for vr in ("DS", "IS", "CS", "UI", "DA", "TM", "AS", "LO", "SH", "US", "SS", "UL", "FL",
               "FD"):
        assert stats[f"compared {vr}"] > 0, vr
    read = [pydicom.datadict.keyword_for_tag(t) for t in headers.SPECIFIC_TAGS]
    read += list(_BUILDER_KEYWORDS)
    missing = [k for k in read if k and stats["keyword " + k] == 0
               and pydicom.datadict.dictionary_VR(k) != "SQ"]
    # Some read attributes are in no bundled file as raw bytes (EchoPulseSequence lives in
    # enhanced MR; file meta elements and person names are always converted by pydicom);
    # every common one must be compared.
    for keyword in ("Modality", "SeriesInstanceUID", "ImageType", "Rows", "Columns",
                    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "SliceThickness", "RepetitionTime", "EchoTime", "SeriesDescription",
                    "BitsAllocated", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
                    "PhotometricInterpretation", "StudyDescription", "AcquisitionNumber"):
        assert keyword not in missing, keyword


def test_a_wrong_decoding_is_caught():
    """The comparison itself can fail: a value that differs from pydicom's is reported."""
    assert not _same("DS", "1.5", pydicom.valuerep.DSfloat("1.25"))
    assert not _same("CS", "ORIGINAL\\PRIMARY", MultiValue(str, ["ORIGINAL", "SECONDARY"]))
    assert not _same("US", 3, 4)
    assert _same("DS", ["1.5", "2"], MultiValue(pydicom.valuerep.DSfloat, ["1.5", "2.0"]))
