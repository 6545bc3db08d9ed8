"""The pretraining dataset: one zarr v3 hierarchy written and read with TensorStore.

Layout of DATASET (a local path, or any TensorStore kvstore URL such as gs://b/p)::

    zarr.json                 group; attributes: volume_shape, codec, label vocabulary
    volume/                   uint8  [N, D, H, W]  one chunk per volume
    sequence/ view/ contrast/ int8   [N]           class index, -1 unknown
    coverage/                 int8   [N, 9]        0/1, -1 unknown
    effective_spacing_mm/     float32 [N]          NaN unknown
    split/                    int8   [N]           0 train, 1 val, 2 test, -1 not usable
    manifest.csv              row i ↔ index i (written by data_prep.build_volumes)

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
}
ARRAY_NAMES = ("volume",) + tuple(LABEL_ARRAYS)

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


def array_spec(path: str, name: str, shape, dtype: str, chunk, codecs, fill) -> dict:
    """A zarr v3 array spec under ``path`` (shared by the pretraining and LiTS datasets)."""
    metadata = {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": codecs,
        "fill_value": fill,
    }
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
    kv = ts.KvStore.open(kvstore_spec(path.rstrip("/") + "/")).result()
    kv.write("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                      "attributes": group_attrs}, indent=1).encode()).result()
    context = context or ts.Context()
    existing = {"delete_existing": True} if overwrite else {"open": True}
    arrays = {
        "volume": ts.open(
            array_spec(path, "volume", (num_volumes, *volume_shape), "uint8",
                        (1, *volume_shape), CODECS[codec], 0),
            create=True, **existing, context=context).result()
    }
    for name, (dtype, trailing, fill) in LABEL_ARRAYS.items():
        chunk = (min(label_chunk, num_volumes), *trailing)
        arrays[name] = ts.open(
            array_spec(path, name, (num_volumes, *trailing), dtype, chunk,
                        [{"name": "bytes", "configuration": {"endian": "little"}}]
                        if np.dtype(dtype).itemsize > 1 else [{"name": "bytes"}], fill),
            create=True, **existing, context=context).result()
    return arrays


def read_attributes(path: str) -> dict:
    kv = ts.KvStore.open(kvstore_spec(path.rstrip("/") + "/")).result()
    raw = kv.read("zarr.json").result()
    if raw.state != "value":
        raise FileNotFoundError(f"{path} is not a radnet dataset (no zarr.json)")
    return json.loads(raw.value)["attributes"]


def open_arrays(path: str, names=ARRAY_NAMES, read_only: bool = True,
                context: ts.Context | None = None) -> dict[str, ts.TensorStore]:
    """Opens the arrays of an existing dataset by name."""
    read_attributes(path)  # a clear error when the path holds no dataset
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
