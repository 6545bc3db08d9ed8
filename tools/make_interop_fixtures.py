"""Makes the interop fixtures under tests/fixtures/interop (run by hand; docs/interop.md).

Two sides, two environments, in this order:

    # 1. radnet side (the project venv; JAX): small radnet weights files with random weights
    #    and random batch-norm statistics, for the radnet → PyTorch directions
    .venv/bin/python tools/make_interop_fixtures.py radnet

    # 2. PyTorch side (a separate venv: pip install torch monai safetensors numpy; never the
    #    project's): MONAI / MedicalNet state dicts with fixed seeds and random batch-norm
    #    statistics, an input volume, and what PyTorch computes from all of them
    PYTHONPATH=. /tmp/torchenv/bin/python tools/make_interop_fixtures.py torch

The PyTorch side reads the radnet files with radnet.interop's numpy-only modules
(weightsfile, names, torch_reference), never JAX. tests/radnet/test_interop.py then converts
and compares in JAX without torch. Sizes: narrow widths keep the fixtures under ~3 MB.

By hand, full-width MONAI models (not fixtures; the figures in docs/interop.md):

    PYTHONPATH=. /tmp/torchenv/bin/python tools/make_interop_fixtures.py torch \\
        --archs=resnet18,resnet50 --width=64 --out=/tmp/interop_by_hand
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "interop")
sys.path.insert(0, ROOT)     # this checkout's radnet, whatever the environment has installed
INPUT_SHAPE = (2, 1, 16, 32, 32)        # PyTorch layout [B, C, D, H, W]
MONAI_LAYERS = {"resnet10": ("basic", [1, 1, 1, 1]), "resnet18": ("basic", [2, 2, 2, 2]),
                "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3]),
                "resnet101": ("bottleneck", [3, 4, 23, 3])}
# name → (arch, width, MONAI ResNet arguments, seed); MONAI's defaults, MedicalNet's layout,
# and a MedicalNet-format checkpoint (resnet18: shortcut A, as MedicalNet's own).
MONAI_FIXTURES = {
    "monai_resnet10_default": ("resnet10", 6, dict(), 0),
    "monai_resnet10_medicalnet": ("resnet10", 6, dict(conv1_t_stride=2, bias_downsample=False), 1),
    "medicalnet_resnet18_checkpoint": ("resnet18", 4, dict(conv1_t_stride=2, bias_downsample=False,
                                                           shortcut_type="A"), 2),
}
# name → (model_name, encoder fields, hidden) for the radnet side
RADNET_FIXTURES = {
    "radnet_variant_radnet10": ("radnet", dict(depth=10, width=4), 8),
    "radnet_variant_resnet50": ("resnet", dict(depth=50, width=2), None),
    "medicalnet_variant_resnet50": ("resnet", dict(depth=50, width=2, variant="medicalnet",
                                                   stem_stride=1, shortcut_bias=True), None),
}


# ----------------------------------------------------------------------------- radnet side

def make_radnet(out: str) -> None:
    import jax  # noqa: PLC0415
    from flax import traverse_util  # noqa: PLC0415

    from radnet import export, models  # noqa: PLC0415
    from radnet.interop import weightsfile  # noqa: PLC0415

    rng = np.random.default_rng(7)
    for i, (name, (model_name, fields, hidden)) in enumerate(RADNET_FIXTURES.items()):
        fields = {**dict(variant="radnet", norm="batch", dtype="float32", dilated=False,
                         frozen_stages=[], bn_momentum=0.9), **fields}
        if hidden is not None:
            fields["hidden"] = hidden
        model = models.get(model_name)(**{**fields, "frozen_stages": ()})
        x = np.zeros((1, *INPUT_SHAPE[2:], 1), np.float32)
        variables = jax.jit(lambda k: model.init(k, x, train=False))(
            jax.random.key(i, impl="rbg"))
        flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(
            {c: variables[c] for c in ("params", "batch_stats")}, sep=".").items()}
        for k, v in flat.items():      # batch norm that matters: random affine and statistics
            if k.endswith(".scale"):
                flat[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
            elif k.startswith("batch_stats") and k.endswith(".mean"):
                flat[k] = rng.normal(0, 0.1, v.shape).astype(np.float32)
            elif k.startswith("batch_stats") and k.endswith(".var"):
                flat[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
            elif k.endswith(".bias"):
                flat[k] = rng.normal(0, 0.1, v.shape).astype(np.float32)
        card = {"radnet_version": "fixture", "model_name": model_name, "model": fields,
                "labels": export.label_vocabulary(),
                "preprocessing": {"volume_shape": list(INPUT_SHAPE[2:]),
                                  "input": export.INPUT_LAYOUT,
                                  "normalisation": export.NORMALISATION},
                "training": None, "source_step": 0,
                "source": {"kind": "tools/make_interop_fixtures.py radnet (random weights)"},
                "names": "see radnet.interop.weightsfile"}
        path = os.path.join(out, f"{name}.safetensors")
        weightsfile.write(path, flat, card)
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


# ----------------------------------------------------------------------------- PyTorch side

def _randomize_batch_norm(model, torch) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)


def _monai_model(arch: str, width: int, args: dict, seed: int):
    import torch  # noqa: PLC0415
    from monai.networks.nets import ResNet  # noqa: PLC0415
    torch.manual_seed(seed)
    block, layers = MONAI_LAYERS[arch]
    model = ResNet(block=block, layers=layers, block_inplanes=[width * 2 ** i for i in range(4)],
                   spatial_dims=3, n_input_channels=1, feed_forward=False, **args)
    _randomize_batch_norm(model, torch)
    return model.eval()


def _medicalnet_checkpoint(state: dict, channels: int, torch) -> dict:
    """MedicalNet's checkpoint layout: DataParallel's ``module.`` prefix and the ``conv_seg``
    decoder (transposed conv, batch norm, conv, batch norm, conv), narrowed like the encoder."""
    g = torch.Generator().manual_seed(3)
    mid = 8
    seg = {"conv_seg.0.weight": (channels, mid, 2, 2, 2), "conv_seg.0.bias": (mid,),
           "conv_seg.1.weight": (mid,), "conv_seg.1.bias": (mid,),
           "conv_seg.1.running_mean": (mid,), "conv_seg.1.running_var": (mid,),
           "conv_seg.3.weight": (mid, mid, 3, 3, 3), "conv_seg.4.weight": (mid,),
           "conv_seg.4.bias": (mid,), "conv_seg.4.running_mean": (mid,),
           "conv_seg.4.running_var": (mid,), "conv_seg.6.weight": (2, mid, 1, 1, 1)}
    full = {f"module.{k}": v for k, v in state.items()}
    for k, shape in seg.items():
        full[f"module.{k}"] = torch.randn(shape, generator=g)
    full["module.conv_seg.1.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
    full["module.conv_seg.4.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
    return full


def make_torch(out: str, archs: list[str] | None, width: int | None) -> None:
    import monai  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from monai.networks.nets import ResNet  # noqa: PLC0415
    from safetensors.numpy import save_file  # noqa: PLC0415
    from safetensors.torch import save_file as save_torch  # noqa: PLC0415

    from radnet.interop import names, torch_reference, weightsfile  # noqa: PLC0415

    torch.set_num_threads(2)
    x = np.random.default_rng(11).uniform(0, 1, INPUT_SHAPE).astype(np.float32)
    xt = torch.from_numpy(x)
    outputs = {"input": x}
    meta = {"torch": torch.__version__, "monai": monai.__version__,
            "input": "[B, 1, D, H, W] float32 uniform [0, 1), seed 11; JAX takes it as "
                     "[B, D, H, W, 1]"}
    specs = dict(MONAI_FIXTURES)
    if archs:   # by hand: full-width models in both MONAI layouts, no radnet side
        specs = {}
        for arch in archs:
            specs[f"monai_{arch}_default"] = (arch, width or 64, dict(), 0)
            medicalnet = dict(conv1_t_stride=2, bias_downsample=False)
            if arch in ("resnet18", "resnet34"):
                medicalnet["shortcut_type"] = "A"
            specs[f"monai_{arch}_medicalnet"] = (arch, width or 64, medicalnet, 1)
    for name, (arch, w, args, seed) in specs.items():
        model = _monai_model(arch, w, args, seed)
        with torch.no_grad():
            outputs[f"{name}.embedding"] = model(xt).numpy()
        state = model.state_dict()
        path = os.path.join(out, f"{name}.safetensors")
        if name.startswith("medicalnet_"):
            state = _medicalnet_checkpoint(state, outputs[f"{name}.embedding"].shape[1], torch)
        save_torch({k: v.contiguous() for k, v in state.items()}, path,
                   metadata={"arch": arch, "monai_args": json.dumps(args), "width": str(w)})
        if archs:     # a .pth in MedicalNet's layout too, for the PyTorch-file reader
            torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}},
                       os.path.join(out, f"{name}.pth"))
        meta[name] = json.dumps({"arch": arch, "width": w, "seed": seed, "monai_args": args})
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")

    if not archs:   # radnet → PyTorch: the reference module and MONAI on radnet's files
        xr = torch.from_numpy(x)
        ref = torch_reference.load(os.path.join(out, "radnet_variant_radnet10.safetensors"))
        with torch.no_grad():
            outputs["radnet_variant_radnet10.embedding"] = ref.encoder(xr)[0].numpy()
            for head, value in ref(xr).items():
                outputs[f"radnet_variant_radnet10.{head}"] = value.numpy()
            r50 = torch_reference.load(os.path.join(out, "radnet_variant_resnet50.safetensors"))
            outputs["radnet_variant_resnet50.embedding"] = r50(xr)[0].numpy()
        tensors, card = weightsfile.read(os.path.join(out, "medicalnet_variant_resnet50.safetensors"))
        state = names.radnet_to_monai(tensors)
        monai_args = names.monai_resnet_args(card["model"])
        model = ResNet(**monai_args)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                              strict=True)
        with torch.no_grad():
            outputs["medicalnet_variant_resnet50.monai_embedding"] = model.eval()(xr).numpy()
        meta["medicalnet_variant_resnet50"] = json.dumps(monai_args)
    path = os.path.join(out, "outputs.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in outputs.items()}, path, metadata=meta)
    print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["radnet", "torch"])
    parser.add_argument("--out", default=FIXTURES)
    parser.add_argument("--archs", default="", help="by hand: e.g. resnet18,resnet50")
    parser.add_argument("--width", type=int, default=None, help="by hand: base width (64)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.side == "radnet":
        make_radnet(args.out)
    else:
        archs = [a for a in args.archs.split(",") if a]
        unknown = [a for a in archs if a not in MONAI_LAYERS]
        if unknown:
            print(f"make_interop_fixtures: --archs {unknown}: use {sorted(MONAI_LAYERS)}",
                  file=sys.stderr)
            return 2
        make_torch(args.out, archs, args.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
