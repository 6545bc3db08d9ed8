"""The pretraining dataset: one zarr v3 hierarchy written and read with TensorStore.

Layout of DATASET (a local path, or any TensorStore kvstore URL such as gs://b/p)::

    arrays.zarr/              the Zarr v3 group (``zarr_root``), nothing but Zarr inside, so
                              zarr-python, xarray and napari open it without complaint
      zarr.json               group; attributes: volume_shape, codec, label vocabulary
      volume/                 uint8  [N, D, H, W]  one chunk per volume      (row, slice, y, x)
      sequence/ view/ contrast/ int8 [N]           class index, -1 unknown   (row)
      coverage/               int8   [N, 9]        0/1, -1 unknown           (row, region)
      effective_spacing_mm/   float32 [N]          NaN unknown               (row)
      voxel_spacing_mm/       float32 [N, 3]       slice, y, x in mm; NaN unknown (row, axis)
      split/                  int8   [N]           0 train, 1 val, 2 test, -1 not usable
    manifest.csv              row i ↔ index i (written by data_prep.build_volumes)
    errors.csv summary.json _build/   the build's other files, beside the group

Every array carries zarr v3 ``dimension_names`` (in parentheses above) and attributes
saying its units. A dataset written before arrays.zarr existed (zarr.json at DATASET
itself) is still read.

Unwritten label entries read as their fill value (-1 / NaN), so a row that was
never completed is never mistaken for a labelled one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorstore as ts

from radnet import labels

VOLUME_SHAPE = (48, 192, 192)  # slices, rows, columns (the paper's input)

# name → (dtype, trailing shape given the volume shape, fill value)
LABEL_ARRAYS: dict[str, tuple[str, tuple[int, ...], Any]] = {
    "sequence": ("int8", (), labels.UNKNOWN),
    "view": ("int8", (), labels.UNKNOWN),
    "contrast": ("int8", (), labels.UNKNOWN),
    "coverage": ("int8", (len(labels.COVERAGE),), labels.UNKNOWN),
    "effective_spacing_mm": ("float32", (), "NaN"),
    "split": ("int8", (), labels.UNKNOWN),
    # Not a label: the physical size of a voxel of row i's volume (slice, y, x), which
    # differs per series since every series is resized to one shape; written at finalize.
    "voxel_spacing_mm": ("float32", (3,), "NaN"),
}
ARRAY_NAMES = ("volume",) + tuple(LABEL_ARRAYS)

# The Zarr group inside DATASET; the non-Zarr files of a dataset sit beside it.
ZARR_GROUP = "arrays.zarr"

# zarr v3 dimension_names of each array (xarray needs them; napari shows them).
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "volume": ("row", "slice", "y", "x"),
    "coverage": ("row", "region"),
    "voxel_spacing_mm": ("row", "axis"),
}
_CLASS_NAMES = {**labels.CLASS_HEADS, **labels.MULTILABEL_HEADS}


def dimension_names(name: str) -> list[str]:
    return list(DIMENSIONS.get(name, ("row",)))


def array_attributes(name: str) -> dict[str, Any]:
    """What a reader of one array needs to know without this code: units, classes."""
    if name == "volume":
        return {"units": "grey level 0-255 (each volume normalised on its own)",
                "voxel_spacing_mm": "per row: array voxel_spacing_mm[row] = (slice, y, x)",
                "row": "manifest.csv row of the same index"}
    if name == "voxel_spacing_mm":
        return {"units": "mm", "axes": ["slice", "y", "x"]}
    if name == "effective_spacing_mm":
        return {"units": "mm", "unknown": "NaN"}
    if name == "split":
        return {"classes": list(labels.SPLITS), "unknown": labels.UNKNOWN}
    if name in _CLASS_NAMES:
        return {"classes": list(_CLASS_NAMES[name]), "unknown": labels.UNKNOWN,
                **({"encoding": "multi-hot"} if name in labels.MULTILABEL_HEADS else {})}
    return {}

# Chunk compression of the volume array. bitshuffle+lz4 vs zstd is measured by
# bench/build_volumes.py; see docs/dataset.md for the figures behind the default.
CODECS: dict[str, list[dict[str, Any]]] = {
    "zstd": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
    "blosc-lz4": [
        {"name": "bytes"},
        {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5,
                                              "shuffle": "bitshuffle", "typesize": 1}},
    ],
    "raw": [{"name": "bytes"}],
}
DEFAULT_CODEC = "zstd"


def kvstore_spec(path: str) -> Any:
    """A local path or a kvstore URL (gs://, s3://, file://, memory://) → kvstore spec."""
    return path if "://" in path else {"driver": "file", "path": path}


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def voxel_spacing_mm(pixel_spacing_mm: str, rows, columns, effective_spacing_mm,
                     volume_shape) -> list[float]:
    """(slice, y, x) mm of a built volume: the effective slice spacing, and the series'
    PixelSpacing ("row;column" mm, as series.csv has it) scaled by the in-plane resize
    (which keeps the physical extent); NaN where a part is unknown."""
    nan = float("nan")
    try:
        row_mm, col_mm = (float(v) for v in str(pixel_spacing_mm).split(";"))
        in_plane = [row_mm * int(rows) / int(volume_shape[1]),
                    col_mm * int(columns) / int(volume_shape[2])]
    except (TypeError, ValueError):
        in_plane = [nan, nan]
    slice_mm = float(effective_spacing_mm) if effective_spacing_mm is not None else nan
    return [slice_mm, *in_plane]


def read_sidecar(path: str, name: str) -> bytes | None:
    """A non-Zarr file of the dataset (manifest.csv, errors.csv, summary.json): they sit in
    DATASET beside the group, never inside it. None when missing."""
    kv = ts.KvStore.open(kvstore_spec(path.rstrip("/") + "/")).result()
    raw = kv.read(name).result()
    return bytes(raw.value) if raw.state == "value" else None


def zarr_root(path: str) -> str:
    """Where the Zarr group of dataset ``path`` lives: ``DATASET/arrays.zarr``, or DATASET
    itself for a dataset written before (zarr.json at its top). Readers and writers of the
    arrays go through here; everything else of a dataset (manifest.csv, ...) is at ``path``."""
    kv = ts.KvStore.open(kvstore_spec(path.rstrip("/") + "/")).result()
    if (kv.read(f"{ZARR_GROUP}/zarr.json").result().state != "value"
            and kv.read("zarr.json").result().state == "value"):
        return path
    return _join(path, ZARR_GROUP)


def array_spec(path: str, name: str, shape, dtype: str, chunk, codecs, fill,
               dimension_names=None, attributes=None) -> dict:
    """A zarr v3 array spec under ``path`` (shared by the pretraining and LiTS datasets)."""
    metadata = {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": codecs,
        "fill_value": fill,
    }
    if dimension_names is not None:
        metadata["dimension_names"] = list(dimension_names)
    if attributes:
        metadata["attributes"] = dict(attributes)
    return {"driver": "zarr3", "kvstore": kvstore_spec(_join(path, name)), "metadata": metadata}


def create(path: str, num_volumes: int, volume_shape=VOLUME_SHAPE, codec: str = DEFAULT_CODEC,
           label_chunk: int = 4096, attributes: dict | None = None,
           context: ts.Context | None = None, overwrite: bool = True) -> dict[str, ts.TensorStore]:
    """Creates (or overwrites) an empty dataset for ``num_volumes`` volumes.

    ``overwrite=False`` opens the arrays instead when they already exist with the same
    metadata (a resumed or sharded build), and never deletes data.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
    if num_volumes < 1:
        raise ValueError("a dataset needs at least one volume")
    volume_shape = tuple(int(s) for s in volume_shape)
    group_attrs = {
        "volume_shape": list(volume_shape),
        "codec": codec,
        "labels": {h: list(n) for h, n in {**labels.CLASS_HEADS, **labels.MULTILABEL_HEADS}.items()},
        "splits": list(labels.SPLITS),
        **(attributes or {}),
    }
    path = _join(path, ZARR_GROUP)
    kv = ts.KvStore.open(kvstore_spec(path.rstrip("/") + "/")).result()
    kv.write("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                      "attributes": group_attrs}, indent=1).encode()).result()
    context = context or ts.Context()
    existing = {"delete_existing": True} if overwrite else {"open": True}
    arrays = {
        "volume": ts.open(
            array_spec(path, "volume", (num_volumes, *volume_shape), "uint8",
                        (1, *volume_shape), CODECS[codec], 0, dimension_names("volume"),
                        array_attributes("volume")),
            create=True, **existing, context=context).result()
    }
    for name, (dtype, trailing, fill) in LABEL_ARRAYS.items():
        chunk = (min(label_chunk, num_volumes), *trailing)
        arrays[name] = ts.open(
            array_spec(path, name, (num_volumes, *trailing), dtype, chunk,
                        [{"name": "bytes", "configuration": {"endian": "little"}}]
                        if np.dtype(dtype).itemsize > 1 else [{"name": "bytes"}], fill,
                        dimension_names(name), array_attributes(name)),
            create=True, **existing, context=context).result()
    return arrays


def read_attributes(path: str) -> dict:
    return _group_attributes(zarr_root(path), path)


def _group_attributes(root: str, path: str) -> dict:
    """The attributes of the Zarr group at ``root`` (:func:`zarr_root` of dataset ``path``)."""
    kv = ts.KvStore.open(kvstore_spec(root.rstrip("/") + "/")).result()
    raw = kv.read("zarr.json").result()
    if raw.state != "value":
        raise FileNotFoundError(f"{path} is not a radnet dataset (no {ZARR_GROUP}/zarr.json; "
                                "python -m data_prep.build_volumes makes one)")
    return json.loads(raw.value)["attributes"]


def read_attributes_of_kind(path: str, kinds, what: str, make_with: str) -> dict:
    """The group attributes of a task dataset whose ``kind`` is one of ``kinds``; else a
    FileNotFoundError naming ``what`` the folder should be and the command ``make_with``."""
    try:
        attrs = read_attributes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a {what} of radnet (no zarr.json); make one "
                                f"with {make_with}") from None
    if attrs.get("kind") not in tuple(kinds):
        raise FileNotFoundError(f"{path} is not a {what} of radnet (kind={attrs.get('kind')!r}; "
                                f"make one with {make_with})")
    return attrs


def slices_array_spec(path: str, name: str, chunk_slices: int, shape=None) -> dict:
    """A per-case uint8 array ``name`` of a task dataset (slices first), zstd, chunks of
    ``chunk_slices`` whole slices: the spec to open it (``shape`` None) or to create it."""
    if shape is None:
        return {"driver": "zarr3", "kvstore": kvstore_spec(f"{path.rstrip('/')}/{name}")}
    return array_spec(path, name, shape, "uint8", (chunk_slices, *shape[1:]), CODECS["zstd"], 0)


def open_arrays(path: str, names=ARRAY_NAMES, read_only: bool = True,
                context: ts.Context | None = None) -> dict[str, ts.TensorStore]:
    """Opens the arrays of an existing dataset by name."""
    root = zarr_root(path)
    _group_attributes(root, path)  # a clear error when the path holds no dataset
    path = root
    context = context or ts.Context()
    out = {}
    for name in names:
        spec = {"driver": "zarr3", "kvstore": kvstore_spec(_join(path, name))}
        out[name] = ts.open(spec, read=True, write=not read_only, context=context).result()
    return out


def read_labels(path: str, context: ts.Context | None = None) -> dict[str, np.ndarray]:
    """All label arrays in memory (they are small: a few bytes per volume)."""
    arrays = open_arrays(path, names=tuple(LABEL_ARRAYS), context=context)
    return {name: arr.read().result() for name, arr in arrays.items()}
