"""Flax Linen models of radnet, picked by name from the config.

    model = radnet.models.get(config.model_name)(**config.model)
    variables = model.init(rng, x, train=False)        # x: [B, D, H, W, C]
    out = model.apply(variables, x, train=True, mutable=["batch_stats"])

Names: ``resnet`` (encoder alone), ``radnet`` (encoder + 3D-RADNet heads),
``vnet`` (encoder + VNet decoder), ``detector`` (lesion detector), ``slicegroups``
(slab classifier with a sector-aware head). See docs/models.md.
"""

from __future__ import annotations

from radnet.models.detection import LesionDetector
from radnet.models.heads import RadNet, RadNetHeads
from radnet.models.resnet3d import DEPTHS, STAGES, VARIANTS, ResNet3D, stage_strides
from radnet.models.slicegroups import SliceGroupNet
from radnet.models.vnet import VNet, check_input_shape, total_stride

MODELS = {
    "resnet": ResNet3D,
    "radnet": RadNet,
    "vnet": VNet,
    "detector": LesionDetector,
    "slicegroups": SliceGroupNet,
}


def get(name: str):
    """Model name → Linen module class (call it with the config's model fields)."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None


__all__ = ["get", "MODELS", "ResNet3D", "RadNet", "RadNetHeads", "VNet", "DEPTHS", "STAGES",
           "VARIANTS", "stage_strides", "total_stride", "check_input_shape"]
