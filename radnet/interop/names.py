"""MONAI / MedicalNet ``ResNet`` ↔ radnet ``ResNet3D(variant="medicalnet")``: names and layouts.

The table (docs/interop.md has it with examples)::

    MONAI state-dict key                        radnet weights-file name
    conv1.weight          [O, I, kD, kH, kW]    params.stem.conv.kernel      [kD, kH, kW, I, O]
    bn1.weight / .bias                          params.stem.norm.scale / .bias
    bn1.running_mean / .running_var             batch_stats.stem.norm.mean / .var
    layer{s}.{i}.conv{k}.weight                 params.block{s}.unit{i+1}.conv{k}.kernel
    layer{s}.{i}.bn{k}.*                        block{s}.unit{i+1}.norm{k}.*  (as bn1)
    layer{s}.{i}.downsample.0.weight / .bias    params.block{s}.unit{i+1}.shortcut_conv.kernel / .bias
    layer{s}.{i}.downsample.1.*                 block{s}.unit{i+1}.shortcut_norm.*
    *.num_batches_tracked                       (none: PyTorch's step counter of batch norm)

A radnet name may carry a prefix (``params.encoder.…`` in a ``radnet`` model's file); the
maps below take and give names without it. numpy only, so PyTorch environments use it too.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

# torch Conv3d weight [O, I, kD, kH, kW] ↔ Flax kernel [kD, kH, kW, I, O]
TORCH_TO_FLAX_KERNEL = (2, 3, 4, 1, 0)
FLAX_TO_TORCH_KERNEL = (4, 3, 0, 1, 2)
BUFFER = "num_batches_tracked"

_MONAI_KEY = re.compile(
    r"(?:(?P<top>conv1|bn1)|layer(?P<stage>[1-4])\.(?P<unit>\d+)\."
    r"(?P<module>conv[1-3]|bn[1-3]|downsample\.0|downsample\.1))\."
    r"(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)")
_RADNET_NAME = re.compile(
    r"(?P<collection>params|batch_stats)\.(?:(?P<stem>stem\.(?:conv|norm))|"
    r"block(?P<stage>[1-4])\.unit(?P<unit>\d+)\."
    r"(?P<module>conv[1-3]|norm[1-3]|shortcut_conv|shortcut_norm))\."
    r"(?P<leaf>kernel|bias|scale|mean|var)")

# (is conv, MONAI leaf) → (collection, radnet leaf)
_CONV_LEAVES = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
_NORM_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _radnet_module(m: re.Match) -> str:
    if m["top"]:
        return {"conv1": "stem.conv", "bn1": "stem.norm"}[m["top"]]
    module = m["module"]
    module = {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_norm"}.get(
        module, module.replace("bn", "norm"))
    return f"block{m['stage']}.unit{int(m['unit']) + 1}.{module}"


def monai_to_radnet_name(key: str) -> str | None:
    """``layer2.0.downsample.0.weight`` → ``params.block2.unit1.shortcut_conv.kernel``;
    None for keys outside the encoder or without a radnet counterpart (num_batches_tracked,
    fc.*, conv_seg.*)."""
    m = _MONAI_KEY.fullmatch(key)
    if m is None or m["leaf"] == BUFFER:
        return None
    module = _radnet_module(m)
    is_conv = module.endswith(("conv", "conv1", "conv2", "conv3"))
    leaves = _CONV_LEAVES if is_conv else _NORM_LEAVES
    if m["leaf"] not in leaves:
        return None
    collection, leaf = leaves[m["leaf"]]
    return f"{collection}.{module}.{leaf}"


def radnet_to_monai_name(name: str) -> str | None:
    """``params.block2.unit1.shortcut_conv.kernel`` → ``layer2.0.downsample.0.weight``; None
    for names MONAI's ResNet has no place for (the radnet variant's ``post_norm``, heads)."""
    m = _RADNET_NAME.fullmatch(name)
    if m is None:
        return None
    if m["stem"]:
        module = {"stem.conv": "conv1", "stem.norm": "bn1"}[m["stem"]]
    else:
        sub = {"shortcut_conv": "downsample.0", "shortcut_norm": "downsample.1"}.get(
            m["module"], m["module"].replace("norm", "bn"))
        module = f"layer{m['stage']}.{int(m['unit']) - 1}.{sub}"
    is_conv = module.endswith(("conv1", "conv2", "conv3", "downsample.0"))
    leaves = _CONV_LEAVES if is_conv else _NORM_LEAVES
    for torch_leaf, (collection, leaf) in leaves.items():
        if (collection, leaf) == (m["collection"], m["leaf"]):
            return f"{module}.{torch_leaf}"
    return None


def to_flax(key: str, value: np.ndarray) -> np.ndarray:
    """A MONAI tensor in radnet's layout (conv weights transposed; others as they are)."""
    value = np.asarray(value)
    if key.endswith("weight") and value.ndim == 5:
        return np.ascontiguousarray(np.transpose(value, TORCH_TO_FLAX_KERNEL))
    return value


def to_torch(name: str, value: np.ndarray) -> np.ndarray:
    """A radnet array in PyTorch's layout (conv kernels transposed, dense kernels
    ``[in, out]`` → ``[out, in]``; others as they are)."""
    value = np.asarray(value)
    if name.endswith("kernel") and value.ndim == 5:
        return np.ascontiguousarray(np.transpose(value, FLAX_TO_TORCH_KERNEL))
    if name.endswith("kernel") and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str = "module.") -> dict:
    """DataParallel's ``module.`` prefix off every key that has it (MedicalNet checkpoints)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def monai_to_radnet(state: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
    """A MONAI ResNet state dict → (radnet flat names → arrays, keys not used).

    Unused keys are every key without a radnet counterpart: ``num_batches_tracked`` buffers,
    a classification head (``fc.*``), MedicalNet's decoder (``conv_seg.*``), and anything
    else; the caller names them (and decides whether they are an error).
    """
    converted, unused = {}, []
    for key, value in state.items():
        name = monai_to_radnet_name(key)
        if name is None:
            unused.append(key)
        else:
            converted[name] = to_flax(key, value).astype(np.float32, copy=False)
    return converted, unused


def radnet_to_monai(flat: Mapping[str, np.ndarray], with_buffers: bool = True) -> dict:
    """radnet encoder arrays (flat names without prefix) → a MONAI ResNet state dict, with a
    zero ``num_batches_tracked`` per batch norm (``with_buffers``) so that
    ``load_state_dict(strict=True)`` finds every key it expects. Raises ValueError naming
    every array MONAI has no place for."""
    state, homeless = {}, []
    for name, value in flat.items():
        key = radnet_to_monai_name(name)
        if key is None:
            homeless.append(name)
            continue
        state[key] = to_torch(name, value)
        if with_buffers and key.endswith(".running_mean"):
            state[key[: -len("running_mean")] + BUFFER] = np.zeros((), np.int64)
    if homeless:
        raise ValueError(f"{len(homeless)} radnet array(s) have no place in MONAI's ResNet: "
                         f"{', '.join(sorted(homeless))}")
    return state


def monai_resnet_args(model: Mapping) -> dict:
    """The ``monai.networks.nets.ResNet`` constructor arguments of a radnet ``medicalnet``
    encoder config (depth, width, stem_stride, shortcut_type, shortcut_bias)."""
    depth = int(model["depth"])
    block, layers = _MONAI_BLOCKS[depth]
    width = int(model.get("width", 64))
    return dict(block=block, layers=list(layers), block_inplanes=[width * 2 ** i for i in range(4)],
                spatial_dims=3, n_input_channels=1, conv1_t_size=7,
                conv1_t_stride=int(model.get("stem_stride", 2)), no_max_pool=False,
                shortcut_type=str(model.get("shortcut_type", "B")),
                bias_downsample=bool(model.get("shortcut_bias", False)), feed_forward=False)


# depth → MONAI block name and units per stage (as radnet.models.resnet3d.DEPTHS, which
# this numpy-only module cannot import without Flax).
_MONAI_BLOCKS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)),
                 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                 101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3)),
                 200: ("bottleneck", (3, 24, 36, 3))}
