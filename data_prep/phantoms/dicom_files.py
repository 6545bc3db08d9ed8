"""DICOM writing for the phantom PACS, starting from pydicom's bundled real files.

Image series start from ``CT_small.dcm`` (GE HiSpeed CT/i) and ``MR_small.dcm`` (Toshiba);
the structured report from ``reportsi.dcm`` and the RT structure set from
``rtstruct.dcm``. Geometry, UIDs, identities, descriptions and acquisition tags are
overridden; the templates' private tags (whose geometry would contradict ours) and every
person name are removed.
"""

from __future__ import annotations

import copy
import functools
import hashlib

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

_SCRUB_KEYWORDS = ("OtherPatientIDsSequence", "AdditionalPatientHistory", "OperatorsName",
                   "NameOfPhysiciansReadingStudy", "ReferringPhysicianName", "StationName",
                   "DeviceSerialNumber", "ImageComments", "InstanceCreatorUID",
                   "SmallestImagePixelValue", "LargestImagePixelValue")


@functools.lru_cache(maxsize=None)
def _template(name: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file(name), force=True)
    ds.remove_private_tags()
    for kw in _SCRUB_KEYWORDS:
        if kw in ds:
            delattr(ds, kw)
    for elem in list(ds.iterall()):
        if elem.VR == "PN":
            elem.value = ""
    if "DataSetTrailingPadding" in ds:
        del ds.DataSetTrailingPadding
    return ds


def template(name: str) -> pydicom.Dataset:
    return copy.deepcopy(_template(name))


def uid(*parts) -> str:
    """A deterministic 2.25 UID from the given parts (seeded, never a real one)."""
    # A UUID-derived UID (PS3.5 B.2) from a hash of the parts; pydicom's generate_uid
    # ignores its entropy sources when asked for a 2.25 UID, so it cannot be used here.
    digest = hashlib.sha256("|".join(["radnet-phantom"] + [str(p) for p in parts]).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big") >> 1)


def set_file_meta(ds: pydicom.Dataset, sop_class: str, sop_instance: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "RADNET_PHANTOM"
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance


def ds_number(x: float) -> str:
    """A DS string (≤ 16 characters)."""
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s[:16]


def pixel_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
