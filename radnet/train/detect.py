"""Universal lesion detection (task ``detect``): the radnet encoder on slabs of CT slices
with an anchor-free CenterNet head, trained on the shared trainer, evaluated by FROC.

    python -m radnet.main --config=configs/detect.py:dataset=DS,pretrained=RUN --workdir=W
    python -m radnet.main --config=configs/detect.py:dataset=DS,freeze=scratch --workdir=W2
    python -m radnet.train.detect --table --root=DIR       # the FROC table of several runs

A task on the trainer skeleton (radnet.train.loop): this module brings the data (slabs of
the lesion dataset, radnet/data/deeplesion.py, with their boxes; random flips), the model
(radnet.models.detection.LesionDetector, its encoder restored from a pretraining run unless
``freeze=scratch``), the loss (CenterNet: penalty-reduced focal loss on the heatmap, L1 on
log size and offset at the centres) and the validation FROC; the loop brings the mesh,
sharded state, resumable Orbax checkpoints, NaN guard, best-checkpoint keeping (by
``val/froc_mean``), metrics and multi-process runs. After training the best checkpoint
detects on the validation and test slabs.

Workdir outputs (besides the loop's)::

    detections.csv     split, index, score, x1 y1 x2 y2 (dataset pixels), per slab after NMS
    results.json       FROC of val and test: sensitivity at 0.5 … 16 FPs per image, by
                       lesion type and by size bin
    froc.md, froc.png  the papers' table and the FROC curve (test split)
"""

from __future__ import annotations

import csv
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from radnet import detection, models
from radnet.data import augment
from radnet.data import deeplesion as dl
from radnet.detection import decode
from radnet.evaluators import predict as predict_lib
from radnet.models.detection import HEAT_PRIOR, STRIDE
from radnet.train import checkpoint as ckpt_lib
from radnet.train import loop, transfer
from radnet.train import state as state_lib
from radnet.train.segment import init_variables


# ----------------------------------------------------------------------------- data

class Flip(grain.transforms.RandomMap):
    """Random left-right and up-down flips of a slab and its boxes."""

    def __init__(self, prob: float):
        self.prob = float(prob)

    def random_map(self, element, rng: np.random.Generator):
        image, boxes = element["image"], element["boxes"].copy()
        size_w, size_h = image.shape[2], image.shape[1]
        if rng.random() < self.prob:
            image = image[:, :, ::-1]
            boxes[:, [0, 2]] = size_w - boxes[:, [2, 0]]
        if rng.random() < self.prob:
            image = image[:, ::-1, :]
            boxes[:, [1, 3]] = size_h - boxes[:, [3, 1]]
        return {**element, "image": np.ascontiguousarray(image), "boxes": boxes}


class Targets(grain.transforms.Map):
    """Adds the CenterNet targets of an element's boxes (radnet.detection.decode)."""

    def __init__(self, sigma_fraction: float, min_sigma: float):
        self.sigma_fraction, self.min_sigma = float(sigma_fraction), float(min_sigma)

    def map(self, element):
        h, w = element["image"].shape[1] // STRIDE, element["image"].shape[2] // STRIDE
        t = decode.centernet_targets(element["boxes"], element["box_valid"], (h, w), STRIDE,
                                     self.sigma_fraction, self.min_sigma)
        return {"image": element["image"], **t}


TRAIN_KEYS = ("image", "heatmap", "center_index", "log_size", "offset", "box_mask")


def train_iterator(config, indices, batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """This process's shuffled, repeated, augmented batches with targets (checkpointable)."""
    if not indices:
        raise loop.ConfigError(f"{config.dataset} has no usable training slab (check "
                               "images.csv)")
    stream = grain.MapDataset.source(list(indices)).seed(config.seed).shuffle().repeat(None)
    stream = stream[process_index::process_count].map(
        dl.SlabReader(config.dataset, config.data.max_boxes))
    if config.data.flip_prob > 0:
        stream = stream.random_map(Flip(config.data.flip_prob))
    return iter(stream.map(Targets(config.loss.sigma_fraction, config.loss.min_sigma))
                .batch(batch_size)
                .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


def _model_input(image_u8: jnp.ndarray) -> jnp.ndarray:
    """``[B, S, H, W]`` uint8 → ``[B, S, H, W, 1]`` in [0, 1] (as pretraining's volumes)."""
    return augment.to_unit_float(image_u8)


# ----------------------------------------------------------------------------- loss

def focal_loss(logits: jnp.ndarray, target: jnp.ndarray, alpha: float = 2.0,
               beta: float = 4.0) -> jnp.ndarray:
    """CenterNet's penalty-reduced pixel-wise focal loss, summed over cells and divided by
    the number of centres (cells where target == 1) of the batch (at least 1).
    ``logits``, ``target``: ``[B, h, w]``."""
    p = jax.nn.sigmoid(logits)
    log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    pos = (target >= 1.0 - 1e-6).astype(jnp.float32)
    pos_loss = -((1 - p) ** alpha) * log_p * pos
    neg_loss = -((1 - target) ** beta) * (p ** alpha) * log_not_p * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / jnp.maximum(pos.sum(), 1.0)


def detection_loss(outputs, batch, size_weight: float, offset_weight: float):
    """(total, parts) of a batch: focal heatmap loss + weighted L1 on log size and offset."""
    heat = focal_loss(outputs["heatmap"][..., 0], batch["heatmap"])
    b, h, w, _ = outputs["size"].shape
    gather = lambda a: jnp.take_along_axis(a.reshape(b, h * w, -1),
                                           batch["center_index"][..., None], axis=1)
    mask = batch["box_mask"][..., None]
    n = jnp.maximum(batch["box_mask"].sum(), 1.0)
    size = jnp.sum(jnp.abs(gather(outputs["size"]) - batch["log_size"]) * mask) / n
    offset = jnp.sum(jnp.abs(gather(outputs["offset"]) - batch["offset"]) * mask) / n
    total = heat + size_weight * size + offset_weight * offset
    return total, {"heatmap_loss": heat, "size_loss": size, "offset_loss": offset}


def make_train_step(model, param_labels, stat_labels, optimizer, loss_cfg):
    def train_step(state, batch, rng):
        del rng  # augmentation happens in the input pipeline

        def loss_fn(params):
            params = jax.tree.map(
                lambda lab, p: jax.lax.stop_gradient(p) if lab == transfer.FROZEN else p,
                param_labels, params)
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                _model_input(batch["image"]), train=True, mutable=["batch_stats"])
            total, parts = detection_loss(outputs, batch, loss_cfg.size_weight,
                                          loss_cfg.offset_weight)
            return total, (parts, updates["batch_stats"])

        (loss, (parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = transfer.keep_frozen(params, state["params"], param_labels)
        new_stats = transfer.keep_frozen(new_stats, state["batch_stats"], stat_labels)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": new_stats,
                     "opt_state": opt_state}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts}

    return train_step


def make_predict_step(model, top_k: int):
    """``(variables, batch) -> ({"scores" [B, k], "boxes" [B, k, 4] in cells}, {})``."""
    def predict_step(variables, batch):
        outputs = model.apply(variables, _model_input(batch["image"]), train=False)
        return decode.topk_peaks(outputs, top_k), {}
    return predict_step


# ----------------------------------------------------------------------------- evaluation

def detect(ds: dl.LesionDataset, indices, predict_step, variables, placement,
           eval_cfg) -> list[tuple[np.ndarray, np.ndarray]]:
    """Detections ``(boxes [N, 4] pixels, scores [N])`` of every slab in ``indices``."""
    reader = lambda i: {"image": ds.image[int(i)].read().result()}
    batches = predict_lib.padded_batches(list(indices), reader, placement.local_eval_batch_size,
                                         jax.process_index(), jax.process_count())
    size = int(ds.attributes["size"])
    out = [None] * len(indices)
    for outputs, gathered, _ in predict_lib.predict(
            predict_step, variables, batches, placement.batch_sharding,
            device_keys=("image",), gather_keys=(predict_lib.POSITION,)):
        for pos, scores, boxes in zip(gathered[predict_lib.POSITION], outputs["scores"],
                                      outputs["boxes"]):
            out[int(pos)] = decode.to_detections(scores, boxes, STRIDE, (size, size),
                                                 eval_cfg.nms_iou, eval_cfg.max_detections,
                                                 eval_cfg.min_score)
    return out


def froc_of(ds: dl.LesionDataset, indices, detections, eval_cfg) -> dict:
    """The FROC result of ``detections`` against the slabs' boxes, with per-type and
    per-size-bin sensitivities."""
    truth = [ds.boxes(i) for i in indices]
    fps = tuple(eval_cfg.fps_per_image)
    types = [[dl.LESION_TYPES.get(int(r["lesion_type"]), "unknown") for r in ds.lesion_rows(i)]
             for i in indices]
    sizes = [[detection.size_bin(float(r["long_mm"] or 0)) for r in ds.lesion_rows(i)]
             for i in indices]
    result = detection.froc(detections, truth, fps, eval_cfg.iou_threshold,
                            eval_cfg.criterion, groups=types)
    result["by_type"] = result.pop("by_group")
    result["by_size"] = detection.froc(detections, truth, fps, eval_cfg.iou_threshold,
                                       eval_cfg.criterion, groups=sizes)["by_group"]
    return result


def _summary(result: dict) -> dict:
    """The JSON-able part of a FROC result."""
    keep = ("sensitivity", "mean_sensitivity", "num_images", "num_lesions", "num_predictions",
            "criterion", "iou_threshold", "by_type", "by_size")
    out = {k: result[k] for k in keep if k in result}
    out["sensitivity"] = {f"{f:g}": v for f, v in result["sensitivity"].items()}
    for group in ("by_type", "by_size"):
        if group in out:
            out[group] = {str(g): {"num_lesions": v["num_lesions"],
                                   "sensitivity": {f"{f:g}": s
                                                   for f, s in v["sensitivity"].items()}}
                          for g, v in out[group].items()}
    return out


def metric_name(fp: float) -> str:
    return f"sensitivity_at_{fp:g}".replace(".", "_")


# ----------------------------------------------------------------------------- run

def resolve_config(config) -> ml_collections.ConfigDict:
    """A private copy with the derived fields filled in: the slab shape of the dataset, the
    encoder fields of the pretraining run (so its encoder fits), the frozen stages."""
    config = ml_collections.ConfigDict(config.to_dict())
    ds = dl.open_dataset(config.dataset)
    attrs = ds.attributes
    config.input.volume_shape = (int(attrs["num_slices"]), int(attrs["size"]),
                                 int(attrs["size"]))
    if float(config.data.mm_per_pixel) > 0 and float(attrs["mm_per_pixel"]) != float(
            config.data.mm_per_pixel):
        raise loop.ConfigError(
            f"{config.dataset} holds slabs at {attrs['mm_per_pixel']} mm per pixel; "
            f"config.data.mm_per_pixel={config.data.mm_per_pixel} (set it to 0 to take the "
            "dataset's)")
    transfer.adopt_pretrained(config, models.get(config.model_name).__dataclass_fields__)
    return config


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Task ``detect`` for radnet.main (its return value is the exit status)."""
    train_and_evaluate(config, workdir)
    return 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    config = resolve_config(config)
    frozen = tuple(config.model.frozen_stages)
    placement = loop.Placement.from_config(config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
    ds = dl.open_dataset(config.dataset)
    split_ids = {s: ds.indices(s) for s in ("train", "val", "test")}
    if not split_ids["val"]:
        raise loop.ConfigError(f"{config.dataset} has no usable validation slab; the run "
                               "validates on it (check images.csv)")
    logging.info("detect: freeze=%s; %d train, %d val, %d test slabs", config.freeze,
                 *(len(split_ids[s]) for s in ("train", "val", "test")))

    model = state_lib.build_model(config)
    input_shape = (1, *state_lib.input_shape(config))
    param_labels, stat_labels, optimizer = transfer.labels_and_optimizer(
        model, input_shape, frozen, state_lib.build_optimizer(config))
    predict_step = jax.jit(make_predict_step(model, config.eval.top_k),
                           out_shardings=(placement.batch_sharding, placement.replicated))

    def initial_variables() -> dict:
        variables = init_variables(model, input_shape, config.seed)
        # the heatmap's prior bias: init_variables zeroes every bias
        variables["params"]["head"]["heatmap_out"]["bias"] = np.full(
            (1,), -np.log((1 - HEAT_PRIOR) / HEAT_PRIOR), np.float32)
        return transfer.with_pretrained_encoder(variables, config)

    fps = tuple(config.eval.fps_per_image)

    def validate(state, step: int) -> dict[str, float]:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        dets = detect(ds, split_ids["val"], predict_step, variables, placement, config.eval)
        result = froc_of(ds, split_ids["val"], dets, config.eval)
        logging.info("step %d validation FROC %s", step,
                     {f"{f:g}": round(v, 3) for f, v in result["sensitivity"].items()})
        return {"froc_mean": result["mean_sensitivity"],
                **{metric_name(f): result["sensitivity"][f] for f in fps}}

    data_iter = train_iterator(config, split_ids["train"], placement.local_batch_size,
                               jax.process_index(), jax.process_count())
    loop.train(config, workdir, placement, loop.Task(
        model=model, optimizer=optimizer,
        train_step=make_train_step(model, param_labels, stat_labels, optimizer, config.loss),
        train_iterator=data_iter, batch_keys=TRAIN_KEYS, evaluate=validate,
        initial_variables=initial_variables,
        metric_names=("froc_mean", *(metric_name(f) for f in fps)),
        config_extra={"n_train_slabs": len(split_ids["train"])}))

    best_step = ckpt_lib.best_step(workdir)
    _, best, _ = ckpt_lib.load_variables(workdir, best_step, sharding=placement.replicated)
    results = {"freeze": config.freeze, "best_step": int(best_step),
               "pretrained": config.pretrained.workdir
               if transfer.restores_encoder(config.freeze) else None}
    rows, curves = [], {}
    for split in ("val", "test"):
        ids = split_ids[split]
        if not ids:
            continue
        dets = detect(ds, ids, predict_step, best, placement, config.eval)
        result = froc_of(ds, ids, dets, config.eval)
        results[split] = _summary(result)
        curves[split] = result
        for i, (boxes, scores) in zip(ids, dets):
            rows.extend([split, i, f"{s:.5f}", *(f"{v:.2f}" for v in b)]
                        for b, s in zip(boxes, scores))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "detections.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "index", "score", "x1", "y1", "x2", "y2"])
            w.writerows(rows)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        split = "test" if "test" in curves else "val"
        name = f"{config.freeze} ({split})"
        detection.plot_froc({name: curves[split]}, os.path.join(workdir, "froc.png"), fps)
        with open(os.path.join(workdir, "froc.md"), "w") as f:
            f.write(detection.format_table({name: curves[split]}, fps) + "\n")
    logging.info("detect results: %s", json.dumps({s: results[s]["sensitivity"]
                                                   for s in ("val", "test") if s in results}))
    return results


def format_runs(root: str, split: str = "test") -> str:
    """The FROC table of every workdir under ``root`` that has a results.json."""
    lines = None
    table = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            if split in r:
                sens = {float(k): v for k, v in r[split]["sensitivity"].items()}
                table[f"{name} ({r['freeze']})"] = {"sensitivity": sens}
                lines = tuple(sens)
    if not table:
        raise SystemExit(f"no results.json with a {split} split under {root}/*/")
    return detection.format_table(table, lines)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("root", None, "Folder whose sub-folders are detect workdirs.",
                        required=True)
    flags.DEFINE_enum("split", "test", ["val", "test"], "Which split's FROC to print.")

    def _main(argv):
        del argv
        print(format_runs(flags.FLAGS.root, flags.FLAGS.split))
        return 0

    app.run(_main)
