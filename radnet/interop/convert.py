"""Trade weights with MONAI and MedicalNet: their 3D ResNet ↔ radnet's ``medicalnet`` variant.

    python -m radnet.interop.convert --from=monai --arch=resnet50 --in=monai.safetensors --out=r50.safetensors
    python -m radnet.interop.convert --from=monai --arch=resnet10 --conv1_t_stride=2 \\
        --bias_downsample=false --in=sd.safetensors --out=r10.safetensors
    python -m radnet.interop.convert --from=medicalnet --arch=resnet18 --in=resnet_18.pth --out=r18.safetensors
    python -m radnet.interop.convert --to=monai --in=r50.safetensors --out=monai_r50.safetensors

``--from=monai`` reads the state dict of ``monai.networks.nets.ResNet`` built with
``spatial_dims=3, n_input_channels=1`` and ``--conv1_t_stride`` / ``--bias_downsample`` /
``--shortcut_type`` as given (MONAI's defaults: 1, true, B); ``--from=medicalnet`` reads a
Tencent MedicalNet checkpoint (``{"state_dict": …}`` with ``module.`` prefixes and the
``conv_seg`` decoder; defaults 2, false, and shortcut A for resnet18/34). Input is a
safetensors file, or a ``.pt``/``.pth`` file when PyTorch is installed. The output is a
radnet weights file (``radnet.pretrained.load``-able, model ``resnet``, variant
``medicalnet``) whose encoder computes what MONAI's ``feed_forward=False`` model computes in
eval mode. Keys that the encoder does not use (``num_batches_tracked``, ``fc.*``,
``conv_seg.*``) are named in one message; any other misfit stops the conversion.

``--to=monai`` writes the MONAI state dict of a radnet ``medicalnet`` encoder (a weights
file or a workdir) and prints the ``ResNet(...)`` arguments that load it. The default
``radnet`` variant has no MONAI counterpart: radnet.interop.torch_reference loads its files
in PyTorch. docs/interop.md has the name map and the layout conversions.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping

import numpy as np
from absl import flags, logging

import radnet
from radnet import cli
from radnet.interop import names, weightsfile

ARCHS = {f"resnet{d}": d for d in (10, 18, 34, 50, 101, 152, 200)}
# MONAI's ResNet defaults; MedicalNet's checkpoints (MONAI's get_medicalnet_pretrained_resnet_args).
DEFAULTS = {"monai": dict(conv1_t_stride=1, bias_downsample=True, shortcut_type="B"),
            "medicalnet": dict(conv1_t_stride=2, bias_downsample=False, shortcut_type="B")}
MEDICALNET_SHORTCUT_A = ("resnet18", "resnet34")
_DROPPABLE = ("fc.", "conv_seg.")       # a classifier head, MedicalNet's segmentation decoder


class ConversionError(ValueError):
    """Weights that do not fit the architecture asked for; the message names every key."""


# ----------------------------------------------------------------------------- reading

def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A state dict from safetensors (numpy only) or ``.pt``/``.pth`` (needs PyTorch),
    unwrapping MedicalNet's ``{"state_dict": …}``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--in={path} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        tensors, _ = weightsfile.read_safetensors(path)
        return tensors
    if suffix not in (".pt", ".pth"):
        raise ValueError(f"--in={path}: read .safetensors (or .pt/.pth with PyTorch installed), "
                         f"not {suffix or 'a file without suffix'}")
    try:
        import torch  # noqa: PLC0415  (optional: radnet never depends on PyTorch)
    except ImportError:
        raise ValueError(f"--in={path} is a PyTorch file and PyTorch is not installed here; "
                         "install torch, or save the state dict as safetensors "
                         "(safetensors.torch.save_file(state_dict, 'x.safetensors'))") from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"--in={path} holds a {type(loaded).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in loaded.items() if hasattr(v, "detach")}


# ----------------------------------------------------------------------------- MONAI → radnet

def encoder_fields(depth: int, width: int, conv1_t_stride: int, bias_downsample: bool,
                   shortcut_type: str) -> dict[str, Any]:
    """``radnet.models.ResNet3D`` fields of the MONAI layout."""
    from radnet.models import common  # noqa: PLC0415
    return dict(depth=depth, variant="medicalnet", norm="batch", width=width, dtype="float32",
                dilated=False, frozen_stages=[], bn_momentum=common.BN_MOMENTUM,
                stem_stride=int(conv1_t_stride), shortcut_type=shortcut_type,
                shortcut_bias=bool(bias_downsample) and shortcut_type == "B")


def _hints(problems: list[str], args: Mapping[str, Any]) -> str:
    text = " ".join(problems)
    hints = []
    if "downsample.0.bias" in text:
        hints.append(f"--bias_downsample={'false' if args['bias_downsample'] else 'true'}?")
    if "downsample" in text and "downsample.0.bias" not in text:
        hints.append(f"--shortcut_type={'A' if args['shortcut_type'] == 'B' else 'B'}?")
    if "layer" in text and "downsample" not in text or "shape" in text:
        hints.append("another --arch?")
    return f" (check: {' '.join(hints)})" if hints else ""


def from_monai(state: Mapping[str, np.ndarray], arch: str, *, conv1_t_stride: int = 1,
               bias_downsample: bool = True, shortcut_type: str = "B",
               source: str = "the state dict", origin: str = "monai"):
    """A MONAI ResNet state dict → (radnet flat arrays, encoder fields, unused keys).

    Raises ConversionError naming every missing, unexpected or mis-shaped key (with MONAI's
    names) when the weights do not fit ``arch`` with these arguments.
    """
    import jax  # noqa: PLC0415

    from radnet import models  # noqa: PLC0415
    from radnet.train import checkpoint as ckpt_lib  # noqa: PLC0415

    if arch not in ARCHS:
        raise ValueError(f"--arch={arch}: use one of {', '.join(ARCHS)}")
    if shortcut_type not in ("A", "B"):
        raise ValueError(f"--shortcut_type={shortcut_type}: use A or B")
    if conv1_t_stride not in (1, 2):
        raise ValueError(f"--conv1_t_stride={conv1_t_stride}: use 1 or 2")
    conv1 = state.get("conv1.weight")
    if conv1 is None:
        raise ConversionError(f"{source} has no conv1.weight: not a MONAI/MedicalNet ResNet state "
                              f"dict (first keys: {', '.join(list(state)[:5])})")
    if conv1.ndim != 5:
        raise ConversionError(f"{source}: conv1.weight has shape {tuple(conv1.shape)}, not a "
                              "3D convolution [O, I, kD, kH, kW] (spatial_dims=3 is needed)")
    if conv1.shape[1] != 1:
        raise ConversionError(f"{source}: conv1 takes {conv1.shape[1]} input channels; radnet "
                              "encoders take 1 (n_input_channels=1)")
    if tuple(conv1.shape[2:]) != (7, 7, 7):
        raise ConversionError(f"{source}: conv1 kernel {tuple(conv1.shape[2:])}; radnet's "
                              "medicalnet stem is 7×7×7 (conv1_t_size=7)")
    args = dict(conv1_t_stride=conv1_t_stride, bias_downsample=bias_downsample,
                shortcut_type=shortcut_type)
    fields = encoder_fields(ARCHS[arch], int(conv1.shape[0]), **args)
    converted, unused = names.monai_to_radnet(state)
    droppable = [k for k in unused if k.endswith(names.BUFFER) or k.startswith(_DROPPABLE)]
    strangers = [k for k in unused if k not in droppable]

    model = models.ResNet3D(**{**fields, "frozen_stages": ()})
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), np.zeros((1, 32, 64, 64, 1), np.float32), train=False))
    expected = {tuple(k): a.shape for c in ("params", "batch_stats")
                for k, a in ckpt_lib.flatten({c: abstract.get(c, {})}).items()}
    found = {tuple(k.split(".")): v.shape for k, v in converted.items()}

    def monai_name(path):
        return names.radnet_to_monai_name(".".join(path)) or ".".join(path)

    torch_shape = lambda path, shape: tuple(shape) if len(shape) != 5 else tuple(
        shape[i] for i in names.FLAX_TO_TORCH_KERNEL)
    problems = [f"missing {monai_name(p)} {torch_shape(p, expected[p])}"
                for p in sorted(set(expected) - set(found))]
    problems += [f"unexpected {monai_name(p)} {torch_shape(p, found[p])}"
                 for p in sorted(set(found) - set(expected))]
    problems += [f"unexpected {k}" for k in strangers]
    problems += [f"shape of {monai_name(p)}: {arch} needs {torch_shape(p, expected[p])}, "
                 f"found {torch_shape(p, found[p])}"
                 for p in sorted(set(expected) & set(found)) if expected[p] != found[p]]
    if problems:
        raise ConversionError(
            f"{source} does not fit {origin} {arch} (conv1_t_stride={conv1_t_stride}, "
            f"bias_downsample={str(bias_downsample).lower()}, shortcut_type={shortcut_type}): "
            f"{len(problems)} problem(s): {'; '.join(problems)}{_hints(problems, args)}")
    return converted, fields, droppable


def unused_message(source: str, unused: list[str]) -> str:
    """One line naming every key the encoder does not use."""
    buffers = [k for k in unused if k.endswith(names.BUFFER)]
    others = [k for k in unused if k not in buffers]
    parts = []
    if others:
        parts.append(f"{len(others)} not part of the encoder: {', '.join(others)}")
    if buffers:
        parts.append(f"{len(buffers)} batch-norm step counters (radnet's batch norm has a fixed "
                     f"momentum): {', '.join(buffers)}")
    return f"{source}: {len(unused)} key(s) not used: " + "; ".join(parts)


def convert_from(origin: str, path: str, out: str, arch: str, conv1_t_stride: int | None = None,
                 bias_downsample: bool | None = None, shortcut_type: str | None = None
                 ) -> tuple[dict, list[str]]:
    """``--from=monai|medicalnet``: ``path`` → the radnet weights file ``out``.
    Returns (the model card, the unused keys)."""
    if origin not in DEFAULTS:
        raise ValueError(f"--from={origin}: use monai or medicalnet")
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out={out}: the file name must end in .safetensors")
    defaults = dict(DEFAULTS[origin])
    if origin == "medicalnet" and arch in MEDICALNET_SHORTCUT_A:
        defaults["shortcut_type"] = "A"
    args = dict(conv1_t_stride=defaults["conv1_t_stride"] if conv1_t_stride is None
                else int(conv1_t_stride),
                bias_downsample=defaults["bias_downsample"] if bias_downsample is None
                else bool(bias_downsample),
                shortcut_type=shortcut_type or defaults["shortcut_type"])
    state = read_state_dict(path)
    if origin == "medicalnet":
        state = names.strip_prefix(state)
    converted, fields, unused = from_monai(state, arch, source=path, origin=origin, **args)
    card = {
        "radnet_version": radnet.__version__,
        "model_name": "resnet",
        "model": fields,
        "labels": None,
        "preprocessing": {"volume_shape": None, "input": "[B, D, H, W, 1] float32 (channels "
                          "last; PyTorch's [B, 1, D, H, W] transposed)",
                          "normalisation": f"as the {origin} model was trained (not known "
                          "to radnet)"},
        "training": None,
        "source_step": 0,
        "source": {"kind": origin, "arch": arch, "file": os.path.basename(path),
                   "monai_args": names.monai_resnet_args(fields), "unused_keys": unused},
        "names": "<collection>.<module path>.<array>; conv kernels [kD, kH, kW, C_in, C_out], "
                 "float32",
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    weightsfile.write(out, converted, card)
    return card, unused


# ----------------------------------------------------------------------------- radnet → MONAI

def to_monai(path: str, out: str) -> tuple[dict[str, Any], list[str]]:
    """``--to=monai``: a radnet ``medicalnet`` encoder (weights file or workdir) → a MONAI
    ResNet state dict in ``out`` (safetensors). Returns (MONAI's constructor arguments, the
    arrays left out: everything outside the encoder, e.g. a radnet model's heads)."""
    from radnet import pretrained  # noqa: PLC0415
    from radnet.train import checkpoint as ckpt_lib  # noqa: PLC0415

    if not out.endswith(".safetensors"):
        raise ValueError(f"--out={out}: the file name must end in .safetensors")
    p = pretrained.load(path)
    model = {k: v for k, v in p.config.model.to_dict().items()}
    variant, norm = model.get("variant", "radnet"), model.get("norm", "batch")
    if variant != "medicalnet":
        raise ValueError(f"{path} holds the {variant!r} variant, which MONAI's ResNet cannot "
                         "express (pre-activation units, SAME padding, a (3,7,7) stem); use "
                         "radnet.interop.torch_reference.load in PyTorch")
    if norm != "batch" or model.get("dilated"):
        raise ValueError(f"{path}: norm={norm!r}, dilated={model.get('dilated')}: MONAI's "
                         "ResNet has batch norm and no dilated stages")
    encoder = p.encoder_variables()
    flat = {".".join(k): np.asarray(v) for c in ("params", "batch_stats")
            for k, v in ckpt_lib.flatten({c: encoder[c]}).items()}
    state = names.radnet_to_monai(flat)
    monai_args = names.monai_resnet_args(model)
    prefix = () if p.config.model_name == "resnet" else ("encoder",)
    left_out = sorted(".".join(k) for k in ckpt_lib.flatten(p.variables)
                      if tuple(k[1:1 + len(prefix)]) != prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    weightsfile.save(out, state, {"monai_resnet_args": json.dumps(monai_args),
                                  "radnet_source_step": str(p.step),
                                  "radnet_left_out": json.dumps(left_out)})
    return monai_args, left_out


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
    """Flags, defined only when run as a program (see radnet.export.define_flags)."""
    # Strings, checked in run(): a wrong value is then the command's one-line error, exit 2.
    flags.DEFINE_string("from", None, "monai|medicalnet: foreign weights to import")
    flags.DEFINE_string("to", None, "monai: export a radnet medicalnet encoder")
    flags.DEFINE_string("arch", None, f"--from: the ResNet, one of {', '.join(ARCHS)}")
    flags.DEFINE_integer("conv1_t_stride", None, "--from: MONAI's conv1_t_stride (1 or 2); "
                         "default 1 for monai, 2 for medicalnet")
    flags.DEFINE_string("bias_downsample", None, "--from: true|false, MONAI's bias_downsample; "
                        "default true for monai, false for medicalnet")
    flags.DEFINE_string("shortcut_type", None, "--from: A|B, MONAI's shortcut_type; "
                        "default B (A for medicalnet resnet18/34)")
    flags.DEFINE_string("in", None, "input: a state dict (.safetensors, .pt/.pth) for --from; "
                        "a radnet weights file or workdir for --to")
    flags.DEFINE_string("out", None, "output .safetensors file")


def _bool(text: str | None) -> bool | None:
    if text is None:
        return None
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"--bias_downsample={text}: use true or false")


def run(FLAGS) -> int:
    origin, target, source, out = FLAGS["from"].value, FLAGS.to, FLAGS["in"].value, FLAGS.out
    if bool(origin) == bool(target):
        raise ValueError("give exactly one of --from=monai|medicalnet or --to=monai")
    if target and target != "monai":
        raise ValueError(f"--to={target}: radnet converts to monai (PyTorch users of the radnet "
                         "variant: radnet.interop.torch_reference)")
    if not source or not out:
        raise ValueError("--in and --out are both required")
    if target:
        args, left_out = to_monai(source, out)
        if left_out:
            print(f"{source}: {len(left_out)} array(s) outside the encoder not converted "
                  f"(MONAI's ResNet has no place for them): {', '.join(left_out)}",
                  file=sys.stderr)
        print(f"{out}: load with monai.networks.nets.ResNet("
              + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ").load_state_dict("
              "safetensors.torch.load_file(...))")
        return 0
    if not FLAGS.arch:
        raise ValueError(f"--from={origin} needs --arch ({', '.join(ARCHS)})")
    card, unused = convert_from(origin, source, out, FLAGS.arch, FLAGS.conv1_t_stride,
                                _bool(FLAGS.bias_downsample), FLAGS.shortcut_type)
    if unused:
        print(unused_message(source, unused), file=sys.stderr)
    args = card["source"]["monai_args"]
    print(f"{out}: radnet resnet (medicalnet variant, depth {card['model']['depth']}, width "
          f"{card['model']['width']}) from {origin} {FLAGS.arch} "
          f"(conv1_t_stride={args['conv1_t_stride']}, bias_downsample="
          f"{str(args['bias_downsample']).lower()}, shortcut_type={args['shortcut_type']})")
    return 0


def main(argv) -> int:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(cli.error_line(f"unexpected arguments {' '.join(argv[1:])}"), file=sys.stderr)
        return 2
    if not FLAGS["verbosity"].present and not FLAGS.debug:
        logging.set_verbosity(logging.ERROR)
    try:
        return run(FLAGS)
    except (FileNotFoundError, ValueError) as e:
        if FLAGS.debug:
            raise
        print(cli.error_line(f"{' '.join(str(e).split())}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    define_flags()
    cli.run(main)
