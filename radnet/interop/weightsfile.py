"""The radnet weights file: one safetensors file of flat-named arrays and a JSON model card.

Names are ``<collection>.<module path>.<array>`` with dots, e.g.
``params.encoder.block1.unit1.conv1.kernel`` or ``batch_stats.encoder.stem.norm.mean``: the
Flax variable tree of the model flattened (``flax.traverse_util.flatten_dict(sep=".")``).
Arrays keep radnet's layout (convolution kernels ``[kD, kH, kW, C_in, C_out]``, dense kernels
``[C_in, C_out]``) and dtype (float32). The safetensors metadata holds one entry,
``radnet_model_card``: JSON with the fields listed in docs/interop.md.

numpy and safetensors only: PyTorch environments read these files without JAX.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT = "radnet-weights/1"
CARD_KEY = "radnet_model_card"
SEP = "."


class NotAWeightsFile(ValueError):
    """A file that is not a safetensors file, or one without a radnet model card."""


def save(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
         metadata: Mapping[str, str]) -> None:
    """A safetensors file at ``path``, atomically, readable as the umask allows (safetensors
    itself creates its files 0600, which hides shared weights from colleagues)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(dict(arrays), tmp, metadata=dict(metadata))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write(path: str | os.PathLike, tensors: Mapping[str, Any], card: Mapping[str, Any]) -> None:
    """``tensors`` (flat name → array) and ``card`` (JSON-able) → ``path``, atomically."""
    card = {"format": FORMAT, **card}
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in tensors.items()}
    save(path, arrays, {CARD_KEY: json.dumps(card, sort_keys=True)})


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Any safetensors file → (name → numpy array, its metadata)."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise NotAWeightsFile(f"{path} is not a readable safetensors file ({e})") from None
    return tensors, metadata


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A radnet weights file → (flat name → array, model card)."""
    path = os.fspath(path)
    tensors, metadata = read_safetensors(path)
    if CARD_KEY not in metadata:
        raise NotAWeightsFile(
            f"{path} is a safetensors file without a radnet model card (metadata keys "
            f"{sorted(metadata)}); make radnet weights with python -m radnet.export or, for "
            "MONAI/MedicalNet weights, python -m radnet.interop.convert")
    card = json.loads(metadata[CARD_KEY])
    if card.get("format") != FORMAT:
        raise NotAWeightsFile(f"{path}: model card format {card.get('format')!r}; this radnet "
                              f"reads {FORMAT!r}")
    return tensors, card
