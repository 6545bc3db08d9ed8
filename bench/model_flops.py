"""Parameters and forward GFLOPs per volume of the radnet models, from XLA's cost analysis.

    python bench/model_flops.py                       # radnet classifier, every depth
    python bench/model_flops.py --models=radnet,vnet --variants=radnet,medicalnet

Prints one JSON line per (model, variant, depth). The forward pass is only
lowered (``jax.jit(...).lower(...).cost_analysis()``), never compiled or run,
so the full 48×192×192 size is cheap even on a laptop CPU. FLOPs count a
multiply-add as 2; they are divided by the batch size to give a per-volume
figure.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The architecture's FLOPs: the plain convolutions, not the CPU rewrites of
# radnet/models/conv.py (im2col skips taps that only meet padding, so XLA counts fewer).
os.environ.setdefault("RADNET_CONV", "plain")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from radnet import models  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["radnet"], "model names (radnet, resnet, vnet)")
_VARIANTS = flags.DEFINE_list("variants", ["radnet", "medicalnet"], "encoder variants")
_DEPTHS = flags.DEFINE_list("depths", ["10", "18", "34", "50", "101"], "ResNet depths")
_SHAPE = flags.DEFINE_list("volume", ["48", "192", "192"], "D,H,W of one volume (voxels)")
_BATCH = flags.DEFINE_integer("batch", 1, "volumes per forward pass")
_WIDTH = flags.DEFINE_integer("width", 64, "base width")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype")
_TRAIN = flags.DEFINE_bool("train", False, "forward in training mode (batch statistics)")


def measure(name: str, variant: str, depth: int) -> dict:
    kwargs = dict(depth=depth, variant=variant, width=_WIDTH.value, dtype=_DTYPE.value)
    if name == "vnet":
        kwargs["num_classes"] = 2
    model = models.get(name)(**kwargs)
    spatial = tuple(int(n) for n in _SHAPE.value)
    x = jax.ShapeDtypeStruct((_BATCH.value, *spatial, 1), jnp.float32)
    variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False),
                               jax.random.key(0, impl="rbg"), x)
    params = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables["params"]))

    def forward(variables, x):
        if _TRAIN.value:
            return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
        return model.apply(variables, x, train=False)

    start = time.perf_counter()
    cost = jax.jit(forward).lower(variables, x).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
        cost = cost[0]
    return {
        "bench": "model_flops", "model": name, "variant": variant, "depth": depth,
        "width": _WIDTH.value, "dtype": _DTYPE.value, "volume_dhw": list(spatial),
        "params": params, "params_millions": round(params / 1e6, 3),
        "forward_gflops_per_volume": round(cost["flops"] / _BATCH.value / 1e9, 2),
        "lower_seconds": round(time.perf_counter() - start, 2),
        "backend": jax.default_backend(),
    }


def main(argv):
    del argv
    for name in _MODELS.value:
        for variant in _VARIANTS.value:
            for depth in _DEPTHS.value:
                try:
                    row = measure(name, variant, int(depth))
                except ValueError as err:  # e.g. a VNet volume that is not a multiple of the stride
                    row = {"bench": "model_flops", "model": name, "variant": variant,
                           "depth": int(depth), "error": str(err)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
