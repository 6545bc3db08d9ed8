"""A training run → one portable weights file (safetensors + a JSON model card).

    python -m radnet.export --workdir=runs/demo/pretrain --out=radnet.safetensors           # best step
    python -m radnet.export --workdir=runs/demo/pretrain --step=1000 --out=radnet-1000.safetensors

The file holds the model's parameters and batch statistics under flat names
(``params.encoder.block1.unit1.conv1.kernel``, ``batch_stats.encoder.stem.norm.mean``, …;
radnet.interop.weightsfile) and a model card: the model config, the label vocabulary in
radnet/labels.py order, the preprocessing, a training summary (steps; label counts of the
training split when the run's dataset is readable — counts only, no identifiers), the source
step and the radnet version. ``radnet.pretrained.load(FILE)`` then gives what loading the
workdir gives, bit for bit. docs/interop.md describes every field.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from absl import flags, logging
from flax import traverse_util

import radnet
from radnet import cli
from radnet import labels
from radnet import pretrained as pretrained_lib
from radnet.interop import weightsfile

NORMALISATION = "uint8 volume / 255 -> float32 in [0, 1] (radnet.data.augment.to_unit_float)"
INPUT_LAYOUT = "[B, D, H, W, 1] float32 (channels last)"


def label_vocabulary() -> dict[str, Any]:
    """The heads in output order and each head's class names in output order
    (radnet/labels.py); a list for the order, since JSON objects have none."""
    classes: dict[str, Any] = {h: list(n) for h, n in labels.CLASS_HEADS.items()}
    classes.update({h: list(n) for h, n in labels.MULTILABEL_HEADS.items()})
    classes.update({h: "regression, mm" for h in labels.REGRESSION_HEADS})
    return {"heads": list(labels.HEADS), "classes": classes}


def label_counts(dataset: str) -> dict[str, Any]:
    """Volumes per split and, over the training split, volumes per label of every head
    (``unknown`` = not mined). Counts only: no keys, paths or identifiers."""
    from radnet.data import schema  # noqa: PLC0415  (TensorStore, on use)
    arrays = schema.read_labels(dataset)
    split = np.asarray(arrays["split"])
    counts: dict[str, Any] = {"volumes": {s: int((split == labels.split_index(s)).sum())
                                          for s in labels.SPLITS}}
    train = split == labels.split_index("train")
    for head, names in labels.CLASS_HEADS.items():
        values = np.asarray(arrays[head])[train]
        counts[head] = {n: int((values == i).sum()) for i, n in enumerate(names)}
        counts[head]["unknown"] = int((values == labels.UNKNOWN).sum())
    for head, names in labels.MULTILABEL_HEADS.items():
        values = np.asarray(arrays[head])[train]
        counts[head] = {n: int((values[:, i] == 1).sum()) for i, n in enumerate(names)}
        counts[head]["unknown"] = int((values == labels.UNKNOWN).all(axis=1).sum())
    spacing = np.asarray(arrays[labels.SLICE_SPACING_TARGET])[train]
    counts["slice_spacing"] = {"known": int(np.isfinite(spacing).sum()),
                               "unknown": int((~np.isfinite(spacing)).sum())}
    return counts


def model_card(p: pretrained_lib.Pretrained) -> dict[str, Any]:
    """The card of a loaded run (docs/interop.md, "The model card")."""
    config = p.config
    training: dict[str, Any] = {"task": config.get("task"),
                                "num_steps": int(config.train.num_steps)
                                if "train" in config else None}
    dataset = config.get("dataset")
    try:
        training["label_counts"] = label_counts(dataset) if dataset else None
        if not dataset:
            training["label_counts_note"] = "the run names no dataset"
    except Exception as e:  # noqa: BLE001  (an optional summary: say why it is missing)
        logging.warning("label counts left out: the run's dataset is not readable here (%s)", e)
        training["label_counts"] = None
        training["label_counts_note"] = "the run's dataset was not readable at export time"
    return {
        "radnet_version": radnet.__version__,
        "model_name": config.model_name,
        "model": config.model.to_dict(),
        "labels": label_vocabulary(),
        "preprocessing": {"volume_shape": [int(s) for s in config.input.volume_shape],
                          "input": INPUT_LAYOUT, "normalisation": NORMALISATION,
                          "volume": pretrained_lib.volume_options_dict(p)},
        "training": training,
        "source_step": int(p.step),
        "source": {"kind": "radnet run"},
        "names": "<collection>.<module path>.<array>; conv kernels [kD, kH, kW, C_in, C_out], "
                 "dense kernels [C_in, C_out], float32",
    }


def export(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
    """Writes ``out`` from ``workdir`` (its best checkpoint, or ``step``); returns the card."""
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out={out}: the file name must end in .safetensors")
    p = pretrained_lib.load(workdir, step)
    tensors = {name: np.asarray(value) for name, value in traverse_util.flatten_dict(
        {c: p.variables[c] for c in pretrained_lib.COLLECTIONS if p.variables.get(c)},
        sep=weightsfile.SEP).items()}
    card = model_card(p)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    weightsfile.write(out, tensors, card)
    logging.info("wrote %s: %d arrays of step %d", out, len(tensors), p.step)
    return card


def define_flags() -> None:
    """The command's flags; defined only when run as a program, so importing this module
    next to others that spell --workdir or --out clashes with nothing."""
    flags.DEFINE_string("workdir", None, "a radnet training run (config.json + checkpoints/)")
    flags.DEFINE_integer("step", None, "checkpoint step; default the run's best")
    flags.DEFINE_string("out", None, "the weights file to write, *.safetensors")


def main(argv) -> int:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(cli.error_line(f"unexpected arguments {' '.join(argv[1:])}"), file=sys.stderr)
        return 2
    if not FLAGS.workdir or not FLAGS.out:
        print(cli.error_line("--workdir and --out are both required, e.g. "
                             "--workdir=runs/demo/pretrain --out=radnet.safetensors"),
              file=sys.stderr)
        return 2
    if not FLAGS["verbosity"].present and not FLAGS.debug:
        logging.set_verbosity(logging.ERROR)   # Orbax's notes on reading would bury the result
    try:
        card = export(FLAGS.workdir, FLAGS.out, FLAGS.step)
    except (FileNotFoundError, ValueError) as e:
        if FLAGS.debug:
            raise
        print(cli.error_line(f"{str(e).splitlines()[0]}"), file=sys.stderr)
        return 2
    print(f"{FLAGS.out}: {card['model_name']} model, step {card['source_step']}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
