"""A PyTorch reference of radnet's default ``radnet`` variant, loading radnet weights files.

    from radnet.interop import torch_reference          # needs torch (never a radnet dependency)
    model = torch_reference.load("radnet.safetensors")  # eval mode, weights checked by name
    out = model(x)            # x [B, 1, D, H, W] float in [0, 1] (uint8 volume / 255)

For a ``resnet`` file ``out`` is ``(embedding [B, C], {"stem": …, "block4": …})`` with
feature maps ``[B, C, d, h, w]``; for a ``radnet`` file (encoder + 3D-RADNet heads) it is
the dict of float32 logits per head (``slice_spacing`` ``[B]``, mm), the same numbers as
``radnet.pretrained.load(path).apply`` (docs/interop.md states the tolerance). Files of the
``medicalnet`` variant go to MONAI instead (``python -m radnet.interop.convert --to=monai``).

The module's names are the weights file's (``encoder.block1.unit1.conv1.weight`` ↔
``params.encoder.block1.unit1.conv1.kernel``), so loading is a rename and a transpose.
What it reproduces of radnet/models/resnet3d.py: TensorFlow SAME padding (asymmetric for
the stride-2 stem: one more row after than before on even sizes, which PyTorch's
``padding=`` cannot express, hence an explicit ``F.pad``), the slice-folded stem as the
plain 3D conv it equals, batch norm in eval mode (eps 1e-5), ``max_pool`` 2 'valid'.

Importing this module needs no torch: the classes are built on first use, and without
torch that use is an ImportError saying what to install.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from radnet import labels
from radnet.interop import names as names_lib
from radnet.interop import weightsfile

# As radnet.models.heads.HISTOGRAM_FLOOR / HISTOGRAM_HALF_RANGE (no Flax here; a test
# holds the two equal).
HISTOGRAM_FLOOR = 1e-3
HISTOGRAM_HALF_RANGE = -math.log(HISTOGRAM_FLOOR) / 2.0

# depth → (unit kind, units per stage); as radnet.models.resnet3d.DEPTHS (no Flax here).
DEPTHS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
          152: ("bottleneck", (3, 8, 36, 3)), 200: ("bottleneck", (3, 24, 36, 3))}
EPS = 1e-5
_PUBLIC = ("SameConv3d", "ResNet3D", "RadNetHeads", "RadNet")


@functools.cache
def _classes() -> dict[str, Any]:
    try:
        import torch  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415
        from torch import nn  # noqa: PLC0415
    except ImportError:
        raise ImportError("radnet.interop.torch_reference needs PyTorch: pip install torch "
                          "(radnet itself never depends on it)") from None

    class SameConv3d(nn.Conv3d):
        """Conv3d with TensorFlow SAME padding (``ceil(n / stride)`` outputs; an odd total
        pad puts the extra row after), no bias."""

        def __init__(self, cin, cout, kernel, stride=1):
            kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
            stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
            super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=False)

        def forward(self, x):
            pads = []
            for n, k, s in zip(x.shape[2:], self.kernel_size, self.stride):
                total = max((math.ceil(n / s) - 1) * s + k - n, 0)
                pads.append((total // 2, total - total // 2))
            # F.pad takes the last axis first: (W before, W after, H …, D …)
            x = F.pad(x, [p for pair in reversed(pads) for p in pair])
            return super().forward(x)

    def norm(channels):
        return nn.BatchNorm3d(channels, eps=EPS)

    class BasicUnit(nn.Module):
        """Pre-activation: x + conv2(relu(norm2(conv1(relu(norm1(x))))))."""

        def __init__(self, cin, features):
            super().__init__()
            self.norm1, self.conv1 = norm(cin), SameConv3d(cin, features, 3)
            self.norm2, self.conv2 = norm(features), SameConv3d(features, features, 3)
            self.shortcut_conv = SameConv3d(cin, features, 1) if cin != features else None

        def forward(self, x):
            pre = F.relu(self.norm1(x))
            shortcut = self.shortcut_conv(pre) if self.shortcut_conv is not None else x
            y = self.conv1(pre)
            return shortcut + self.conv2(F.relu(self.norm2(y)))

    class BottleneckUnit(nn.Module):
        """Pre-activation 1×1×1 → 3×3×3 → 1×1×1 (×4 channels)."""

        def __init__(self, cin, features):
            super().__init__()
            out = 4 * features
            self.norm1, self.conv1 = norm(cin), SameConv3d(cin, features, 1)
            self.norm2, self.conv2 = norm(features), SameConv3d(features, features, 3)
            self.norm3, self.conv3 = norm(features), SameConv3d(features, out, 1)
            self.shortcut_conv = SameConv3d(cin, out, 1) if cin != out else None

        def forward(self, x):
            pre = F.relu(self.norm1(x))
            shortcut = self.shortcut_conv(pre) if self.shortcut_conv is not None else x
            y = self.conv1(pre)
            y = self.conv2(F.relu(self.norm2(y)))
            return shortcut + self.conv3(F.relu(self.norm3(y)))

    class Stem(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.conv, self.norm = SameConv3d(1, width, (3, 7, 7), (1, 2, 2)), norm(width)

        def forward(self, x):
            return F.relu(self.norm(self.conv(x)))

    class ResNet3D(nn.Module):
        """radnet's ``ResNet3D(variant="radnet", norm="batch")``; ``x [B, 1, D, H, W]`` →
        ``(embedding [B, C], {stage: [B, C, d, h, w]})``."""

        def __init__(self, depth=50, width=64):
            super().__init__()
            kind, units = DEPTHS[depth]
            unit_cls, expansion = (BasicUnit, 1) if kind == "basic" else (BottleneckUnit, 4)
            self.stem = Stem(width)
            cin = width
            for i, n in enumerate(units):
                features = width * 2 ** i
                stage = nn.Module()
                for u in range(n):
                    stage.add_module(f"unit{u + 1}", unit_cls(cin, features))
                    cin = features * expansion
                if i == 3:
                    stage.post_norm = norm(cin)
                setattr(self, f"block{i + 1}", stage)
            self.num_units = units

        def forward(self, x):
            features = {"stem": self.stem(x)}
            h = F.max_pool3d(features["stem"], 2, 2)
            for i, n in enumerate(self.num_units):
                if i > 0:
                    h = F.max_pool3d(h, 2, 2)
                stage = getattr(self, f"block{i + 1}")
                for u in range(n):
                    h = getattr(stage, f"unit{u + 1}")(h)
                if i == 3:
                    h = F.relu(stage.post_norm(h))
                features[f"block{i + 1}"] = h
            return h.float().mean(dim=(2, 3, 4)), features

    class RadNetHeads(nn.Module):
        """embedding → dense(hidden) → ReLU → one dense per head (radnet/labels.py order)."""

        def __init__(self, channels, hidden, intensity_bins=0):
            super().__init__()
            self.hidden = nn.Linear(channels + intensity_bins, hidden)
            for head, size in labels.HEAD_SIZES.items():
                setattr(self, head, nn.Linear(hidden, size))

        def forward(self, embedding, extra=None):
            if extra is not None:
                embedding = torch.cat([embedding, extra], dim=-1)
            h = F.relu(self.hidden(embedding))
            out = {head: getattr(self, head)(h) for head in labels.HEAD_SIZES}
            for head in labels.REGRESSION_HEADS:
                out[head] = out[head][..., 0]
            return out

    class RadNet(nn.Module):
        """3D-RADNet: ``encoder`` + ``heads``; ``x [B, 1, D, H, W]`` → logits per head."""

        def __init__(self, depth=50, width=64, hidden=1000, intensity_bins=0):
            super().__init__()
            self.encoder = ResNet3D(depth, width)
            channels = 8 * width * (1 if DEPTHS[depth][0] == "basic" else 4)
            self.heads = RadNetHeads(channels, hidden, intensity_bins)
            self.intensity_bins = intensity_bins

        def forward(self, x):
            extra = intensity_histogram(x, self.intensity_bins) if self.intensity_bins else None
            return self.heads(self.encoder(x)[0], extra)

    def intensity_histogram(x, bins):
        """radnet.models.heads.intensity_histogram for ``x [B, 1, D, H, W]``."""
        centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
        v = x.detach().float().flatten(1)
        share = torch.stack([(1.0 - (v - c).abs() * bins).clamp(min=0.0).mean(dim=1)
                             for c in centres], dim=1)
        return torch.log(share + HISTOGRAM_FLOOR) / HISTOGRAM_HALF_RANGE + 1.0

    return {"torch": torch, "SameConv3d": SameConv3d, "ResNet3D": ResNet3D,
            "RadNetHeads": RadNetHeads, "RadNet": RadNet}


def __getattr__(name):   # PEP 562: the torch classes, built on first use
    if name in _PUBLIC:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias",
               ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def torch_state_dict(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """radnet weights-file arrays → the state dict of this module (renamed, transposed)."""
    state = {}
    for name, value in tensors.items():
        collection, *path, leaf = name.split(weightsfile.SEP)
        key = ".".join([*path, _TORCH_LEAF[(collection, leaf)]])
        state[key] = names_lib.to_torch(name, value)
        if leaf == "mean":
            state[".".join([*path, "num_batches_tracked"])] = np.zeros((), np.int64)
    return state


def load(path: str):
    """A radnet weights file of the ``radnet`` variant → the PyTorch module in eval mode,
    every array loaded by name (``load_state_dict(strict=True)``)."""
    tensors, card = weightsfile.read(path)
    model_cfg, model_name = card["model"], card["model_name"]
    variant, norm = model_cfg.get("variant", "radnet"), model_cfg.get("norm", "batch")
    if variant != "radnet" or norm != "batch":
        raise ValueError(f"{path}: variant {variant!r}, norm {norm!r}; the reference module is "
                         "the radnet variant with batch norm (medicalnet files: python -m "
                         "radnet.interop.convert --to=monai)")
    classes = _classes()
    torch = classes["torch"]
    depth, width = int(model_cfg["depth"]), int(model_cfg["width"])
    if model_name == "radnet":
        module = classes["RadNet"](depth, width, int(model_cfg["hidden"]),
                                   int(model_cfg.get("intensity_bins", 0)))
    elif model_name == "resnet":
        module = classes["ResNet3D"](depth, width)
    else:
        raise ValueError(f"{path}: a {model_name!r} model; the reference module covers "
                         "'resnet' and 'radnet'")
    state = {k: torch.from_numpy(np.array(v)) for k, v in torch_state_dict(tensors).items()}
    module.load_state_dict(state, strict=True)
    return module.eval()
