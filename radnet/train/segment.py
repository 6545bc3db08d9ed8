"""Segmentation with the transferred 3D-RADNet encoder (task ``segment``), any number of classes.

    python -m radnet.main --config=configs/segment.py:dataset=runs/kits,pretrained=runs/pretrain \
        --workdir=runs/kits/all
    python -m radnet.main --config=configs/liver.py:freeze=all --workdir=runs/liver/all  # the paper
    python -m radnet.train.segment --table=2 --root=runs/liver/table2   # print + save a table

A task on the trainer skeleton (radnet.train.loop): this module brings the data (training
windows, fraction subset), the VNet with the restored encoder and ``num_classes`` from the
dataset, the optimizer with frozen stages, the multi-class Dice (optionally + cross-entropy)
train step and the validation Dice; the loop brings the mesh, the sharded state, resumable
Orbax checkpoints (a run killed and started again with the same command ends as an
uninterrupted one), the NaN guard, best-checkpoint keeping, metrics and multi-process
runs. After training, the best validation checkpoint is evaluated on the validation and
test cases.

**Windows.** Two ways (``config.proposal.enabled``):

- *proposal* (the paper's liver setting, configs/liver.py): 48-slice windows over the whole
  plane, scored by the pretrained classifier's liver coverage (radnet.proposal); the
  selected ones are trained on and predicted; slices in no selected window are background.
- *sliding* (configs/segment.py): windows of ``input.patch_shape`` slide over depth, height
  and width; training takes every window of a grid with ``input.train_overlap``, evaluation
  every window of a grid with ``eval.overlap``, so the whole volume is predicted.

Overlapping predictions are combined per voxel as Σ w·p / Σ w with ``eval.weighting``:
``gaussian`` (w = a Gaussian centred on the window, σ = ``eval.gaussian_sigma`` × window
size per axis, radnet.evaluators.segmentation.gaussian_weights) or ``uniform``.

**Metrics.** Validation during training: mean Dice over cases and foreground classes on the
training grid. Final: the stitched probabilities are resampled back onto each case's
source grid (``eval.source_grid``; linear, then argmax) and scored there against the
annotation as drawn, with the source voxel spacing: Dice, IoU, HD95 and normalised surface
Dice at ``eval.tolerance_mm`` per case and class (radnet/evaluators/segmentation.py).

Workdir outputs::

    config.json        the resolved config (model fields from the pretraining run, classes)
    proposals.csv      proposal mode: every scored window, 'selected' marks the inputs
    metrics.jsonl      train loss, volumes/s; val dice (and TensorBoard events)
    checkpoints/       Orbax: state + data_iter; the latest and the best validation Dice
    per_case.csv       split, case_id, class, dice, iou, hd95_mm, nsd (best checkpoint)
    summary.json       per split: mean, median and 95% bootstrap CI of each metric, per
                       class and over classes, and n (what the tables read)
    results.json       the run and per split the mean/median Dice and IoU with CIs
    overlays/          PNGs of a few test cases: image slice, true and predicted contours

Windows of all cases stream through radnet.evaluators.predict, so every process and
device shares the work; a case is stitched and scored as soon as its last window is back.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from radnet import models, proposal
from radnet.data import augment, nifti
from radnet.evaluators import predict as predict_lib
from radnet.evaluators import segmentation as seg_metrics
from radnet.train import checkpoint as ckpt_lib
from radnet.train import loop, transfer
from radnet.train import state as state_lib

Start = tuple[int, int, int]


# ----------------------------------------------------------------------------- data

def training_subset(case_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The first round(fraction · n) cases of a seeded permutation (so subsets nest)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ids = sorted(case_ids)
    if not ids:
        raise ValueError("no training cases")
    order = np.random.default_rng(seed).permutation(len(ids))
    keep = max(1, int(round(fraction * len(ids))))
    return sorted(ids[i] for i in order[:keep])


class CropReader:
    """(case_id, (z, y, x)) → {"image": uint8 [D, H, W](, "mask": uint8 [D, H, W])}: the
    window of ``window_shape`` at that start (blank outside the case). TensorStore
    handles stay open per case (and are reopened after pickling, in a Grain worker)."""

    def __init__(self, dataset: str, window_shape: Sequence[int], with_mask: bool = False):
        self.dataset = dataset
        self.window_shape = tuple(int(s) for s in window_shape)
        self.with_mask = with_mask
        self._open: dict[str, Any] = {}

    def __call__(self, item) -> dict[str, np.ndarray]:
        case_id, start = item
        if case_id not in self._open:
            self._open[case_id] = nifti.open_case(self.dataset, case_id)
        image, mask = self._open[case_id]
        out = {"image": nifti.read_crop(image, start, self.window_shape)}
        if self.with_mask:
            out["mask"] = nifti.read_crop(mask, start, self.window_shape)
        return out

    def __getstate__(self):
        return {"dataset": self.dataset, "window_shape": self.window_shape,
                "with_mask": self.with_mask}

    def __setstate__(self, state):
        self.__init__(**state)


def train_iterator(dataset: str, windows: Sequence[tuple[str, Start]],
                   window_shape: Sequence[int], batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """This process's shuffled, repeated batches of training windows (checkpointable).

    One seeded stream of windows for all processes; process p takes elements p, p+P, …
    and batches ``batch_size`` of them, so every window of every epoch goes to exactly one
    process.
    """
    if not windows:
        raise ValueError("no training windows")
    stream = grain.MapDataset.source(list(windows)).seed(seed).shuffle().repeat(None)
    return iter(stream[process_index::process_count]
                .map(CropReader(dataset, window_shape, with_mask=True))
                .batch(batch_size)
                .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


# ----------------------------------------------------------------------------- model

def init_variables(model, input_shape: Sequence[int], seed: int) -> dict:
    """Fresh ``{"params", "batch_stats"}`` of ``model`` for inputs ``[B, D, H, W, C]``.

    Shapes come from ``jax.eval_shape`` of ``model.init``; values are drawn in NumPy:
    kernels He-normal over fan-out (the encoder's and decoder's convolution init),
    norm scales and running variances 1, biases and running means 0. Why not
    ``jax.jit(model.init)`` (the loop's default): on 2 CPU cores it compiles for 30 s (demo
    VNet) to 37 s (paper size), against 0.1 s and 1.8 s here; the loop places these
    variables with the state's shardings (``loop.Task.initial_variables``).
    """
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros(input_shape), train=False),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if name == "kernel":
            fan_out = math.prod(leaf.shape[:-2]) * leaf.shape[-1]
            return rng.normal(0.0, math.sqrt(2.0 / fan_out), leaf.shape).astype(leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    filled = jax.tree_util.tree_map_with_path(fill, shapes)
    return {"params": filled["params"], "batch_stats": filled.get("batch_stats", {})}


def dice_loss(logits: jnp.ndarray, mask: jnp.ndarray, smooth: float = 1.0) -> jnp.ndarray:
    """1 − soft Dice, per window and foreground class, averaged over both.

    logits ``[B, D, H, W, K]``, mask ``[B, D, H, W]`` class indices in [0, K). Classes
    1 … K−1 each get a soft Dice of their softmax probability against their one-hot mask
    (with K = 2: the liver channel alone, the paper's loss); ``smooth`` keeps a window
    without a class well-defined (predicting nothing there gives that class loss 0).
    """
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
    target = jax.nn.one_hot(mask.astype(jnp.int32), logits.shape[-1], dtype=jnp.float32)[..., 1:]
    axes = tuple(range(1, prob.ndim - 1))
    inter = jnp.sum(prob * target, axis=axes)
    total = jnp.sum(prob, axis=axes) + jnp.sum(target, axis=axes)
    return 1.0 - jnp.mean((2.0 * inter + smooth) / (total + smooth))


def segmentation_loss(logits, mask, smooth: float = 1.0, ce_weight: float = 0.0):
    """Dice loss, plus ``ce_weight`` × mean voxel cross-entropy when positive (nnU-Net's
    Dice + CE with ce_weight = 1)."""
    loss = dice_loss(logits, mask, smooth)
    if ce_weight > 0:
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), mask.astype(jnp.int32)).mean()
        loss = loss + ce_weight * ce
    return loss


def make_train_step(model, param_labels, stat_labels, optimizer, smooth: float,
                    ce_weight: float = 0.0):
    """Pure ``train_step(state, batch, rng) -> (state, metrics)``; frozen leaves copied through."""

    def train_step(state, batch, rng):
        del rng  # no augmentation, no dropout
        x = augment.to_unit_float(batch["image"])

        def loss_fn(params):
            # No gradient into frozen leaves: XLA then drops their backward pass (for
            # freeze=all the whole encoder backward), not just their update.
            params = jax.tree.map(
                lambda lab, p: jax.lax.stop_gradient(p) if lab == transfer.FROZEN else p,
                param_labels, params)
            logits, updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                mutable=["batch_stats"])
            return (segmentation_loss(logits, batch["mask"], smooth, ce_weight),
                    updates["batch_stats"])

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Bit-exact: frozen leaves are the old arrays, whatever the update computed.
        params = transfer.keep_frozen(params, state["params"], param_labels)
        new_stats = transfer.keep_frozen(new_stats, state["batch_stats"], stat_labels)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": new_stats,
                     "opt_state": opt_state}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_predict_step(model):
    """``(variables, batch) -> (class probabilities [B, D, H, W, K], {})`` for evaluators.predict."""
    def predict_step(variables, batch):
        logits = model.apply(variables, augment.to_unit_float(batch["image"]), train=False)
        return {"probability": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}, {}
    return predict_step


# ----------------------------------------------------------------------------- evaluation

def stitch(n_slices: int, shape_hw: tuple[int, int], starts: Sequence[int],
           probs: Sequence[np.ndarray]) -> np.ndarray:
    """Slice-window foreground probabilities ``[D, H, W]`` at ``starts`` → their mean on
    the case (0 where no window reaches)."""
    stitcher = seg_metrics.Stitcher((n_slices, *shape_hw), 2)
    for start, p in zip(starts, probs):
        stitcher.add((start, 0, 0), np.stack([1 - p, p], axis=-1))
    return stitcher.result()[1]


def evaluate_cases(dataset: str, case_ids: Sequence[str], windows: dict[str, list[Start]],
                   window_shape: Sequence[int], num_classes: int, predict_step, variables,
                   batch_sharding, local_batch_size: int,
                   score: Callable[[str, np.ndarray], dict], weights: np.ndarray | None = None
                   ) -> dict[str, dict]:
    """``score(case_id, probabilities [K, D, H, W])`` of every case's stitched windows
    (module docstring), on every process.

    The windows of all cases stream through radnet.evaluators.predict in case order; a
    case is stitched and scored as soon as its last window is back, so at most one case's
    probabilities are held at a time.
    """
    empty = [c for c in case_ids if not windows.get(c)]
    if empty:  # a case without a window would drop out of the scores unseen
        raise ValueError(f"{len(empty)} case(s) have no window: {empty[:5]}")
    items = [(c, tuple(s)) for c in case_ids for s in windows[c]]
    last_of_case = {c: i for i, (c, _) in enumerate(items)}   # the last index wins
    batches = predict_lib.padded_batches(items, CropReader(dataset, window_shape),
                                         local_batch_size, jax.process_index(),
                                         jax.process_count())
    results: dict[str, dict] = {}
    stitcher = None
    for outputs, gathered, _ in predict_lib.predict(predict_step, variables, batches,
                                                    batch_sharding, device_keys=("image",),
                                                    gather_keys=(predict_lib.POSITION,)):
        for position, prob in zip(gathered[predict_lib.POSITION], outputs["probability"]):
            case_id, start = items[position]
            if stitcher is None:
                image, _ = nifti.open_case(dataset, case_id)
                stitcher = seg_metrics.Stitcher(image.shape, num_classes, weights)
            stitcher.add(start, prob)
            if position == last_of_case[case_id]:
                results[case_id] = score(case_id, stitcher.result())
                stitcher = None
    return results


def write_overlay(path: str, image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                  class_names: Sequence[str], title: str) -> None:
    """One PNG: the axial slice with the most true foreground, true contours solid,
    predicted contours dashed, one colour per class."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    area = (truth > 0).sum(axis=(1, 2))
    k = int(np.argmax(area)) if area.any() else int(np.argmax((pred > 0).sum(axis=(1, 2))))
    fig, ax = plt.subplots(figsize=(4, 4.3), dpi=100)
    ax.imshow(image[k], cmap="gray", interpolation="nearest")
    colours = plt.get_cmap("tab10")
    for c in range(1, len(class_names)):
        colour = colours((c - 1) % 10)
        for mask, style in ((truth[k] == c, "solid"), (pred[k] == c, "dashed")):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour],
                           linestyles=style, linewidths=1.2)
        ax.plot([], [], color=colour, label=class_names[c])
    ax.plot([], [], color="white", linestyle="solid", label="true")
    ax.plot([], [], color="white", linestyle="dashed", label="predicted")
    ax.legend(loc="lower right", fontsize=7, framealpha=0.6)
    ax.set_title(f"{title}, slice {k}", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables

TABLE_HEADER = ("Mean DICE", "Mean IOU", "Median DICE", "Median IOU")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(ci) -> str:
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return ""
    return f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"


def table_rows(kind: str, results: Sequence[dict], split: str = "test"
               ) -> tuple[str, list[tuple[str, dict]]]:
    """(first column's heading, [(row name, that row's split summary)]) in the paper's order."""
    if kind == "freeze":
        order = {f: i for i, f in enumerate(transfer.FREEZE_ROWS)}
        rows = sorted(results, key=lambda r: order.get(r["freeze"], 99))
        return "Modification", [(transfer.FREEZE_LABELS[r["freeze"]], r[split]) for r in rows]
    if kind == "fraction":
        rows = sorted(results, key=lambda r: -r["fraction"])
        return "% Training Data", [(f"{100 * r['fraction']:.0f}% (n={r['n_train']})", r[split])
                                   for r in rows]
    raise ValueError(f"table kind is 'freeze' or 'fraction', got {kind!r}")


def format_table(kind: str, results: Sequence[dict], split: str = "test") -> str:
    """Table 2 (``kind="freeze"``) or Table 3 (``kind="fraction"``) in the paper's layout;
    a 95% bootstrap interval over cases follows each mean when the results carry one."""
    head, rows = table_rows(kind, results, split)
    first = [head] + [name for name, _ in rows]
    body = [[_pct(s["mean_dice"]) + _ci(s.get("ci95_dice")),
             _pct(s["mean_iou"]) + _ci(s.get("ci95_iou")),
             _pct(s["median_dice"]), _pct(s["median_iou"])] for _, s in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(TABLE_HEADER)]
    width0 = max(len(s) for s in first)
    lines = [first[0].ljust(width0) + "  " + "  ".join(h.rjust(w) for h, w in
                                                          zip(TABLE_HEADER, widths))]
    for name, cells in zip(first[1:], body):
        lines.append(name.ljust(width0) + "  " + "  ".join(c.rjust(w) for c, w in
                                                           zip(cells, widths)))
    n = rows[0][1]["n"] if rows else 0
    lines.append(f"({split} set, n={n} cases; Dice/IoU per whole case, then mean [95% "
                 "bootstrap CI over cases] and median)")
    return "\n".join(lines)


def write_tables(kind: str, results: Sequence[dict], out_stem: str, split: str = "test") -> None:
    """``out_stem.md`` (a markdown table) and ``out_stem.csv`` (one row per run, numbers
    as fractions, CI bounds and n in their own columns)."""
    head, rows = table_rows(kind, results, split)
    md = [f"| {head} | n | Mean Dice [95% CI] | Mean IoU [95% CI] | Median Dice | Median IoU |",
          "|---|---|---|---|---|---|"]
    for name, s in rows:
        md.append(f"| {name} | {s['n']} | {_pct(s['mean_dice'])}{_ci(s.get('ci95_dice'))} | "
                  f"{_pct(s['mean_iou'])}{_ci(s.get('ci95_iou'))} | {_pct(s['median_dice'])} | "
                  f"{_pct(s['median_iou'])} |")
    md.append("")
    md.append(f"{split} set; Dice and IoU per whole case; 95% percentile-bootstrap intervals "
              "over cases (radnet.evaluators.segmentation.bootstrap_ci).")
    with open(out_stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    with open(out_stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "split", "n", "mean_dice", "ci95_dice_low", "ci95_dice_high",
                    "mean_iou", "ci95_iou_low", "ci95_iou_high", "median_dice", "median_iou"])
        for name, s in rows:
            dl, dh = s.get("ci95_dice") or ("", "")
            il, ih = s.get("ci95_iou") or ("", "")
            w.writerow([name, split, s["n"], s["mean_dice"], dl, dh, s["mean_iou"], il, ih,
                        s["median_dice"], s["median_iou"]])


def _from_summary(summary: dict) -> dict:
    """summary.json → the table fields of each split (over foreground classes)."""
    out = dict(summary["run"])
    for split, s in summary.items():
        if split == "run" or not isinstance(s, dict) or "over_classes" not in s:
            continue
        m = s["over_classes"]
        out[split] = {"n": s["n"], "mean_dice": m["dice"]["mean"], "mean_iou": m["iou"]["mean"],
                      "median_dice": m["dice"]["median"], "median_iou": m["iou"]["median"],
                      "ci95_dice": m["dice"]["ci95"], "ci95_iou": m["iou"]["ci95"]}
    return out


def collect_results(root: str) -> list[dict]:
    """The runs under ``root/*/``: each run's summary.json (results.json of older runs)."""
    out = []
    for name in sorted(os.listdir(root)):
        summary = os.path.join(root, name, "summary.json")
        path = os.path.join(root, name, "results.json")
        if os.path.exists(summary):
            with open(summary) as f:
                out.append(_from_summary(json.load(f)))
        elif os.path.exists(path):
            with open(path) as f:
                out.append(json.load(f))
    return out


# ----------------------------------------------------------------------------- run

def _shape_arg(value) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def resolve_config(config) -> ml_collections.ConfigDict:
    """A private copy with every derived field filled in, as config.json records it: the
    encoder fields of the pretraining run (so its encoder always fits), the frozen stages,
    the classes and their number from the dataset, the input shape of a window, the
    pretraining step read."""
    config = ml_collections.ConfigDict(config.to_dict())
    transfer.adopt_pretrained(config, models.get(config.model_name).__dataclass_fields__)
    attrs = nifti.read_attributes(config.dataset)
    names = nifti.class_names(attrs)
    if int(config.model.num_classes) <= 0:
        config.model.num_classes = len(names)
    elif int(config.model.num_classes) != len(names):
        raise loop.ConfigError(
            f"config.model.num_classes={config.model.num_classes} but {config.dataset} has "
            f"{len(names)} classes ({', '.join(names)}); set it to 0 (= from the dataset)")
    config.class_names = names
    in_plane = int(attrs["in_plane"])
    if config.proposal.enabled:
        config.input.volume_shape = (config.proposal.window_slices, in_plane, in_plane)
    else:
        patch = _shape_arg(config.input.patch_shape)
        if len(patch) != 3 or min(patch) < 1:
            raise loop.ConfigError(f"config.input.patch_shape={patch}: give [D, H, W]")
        config.input.volume_shape = patch
    try:
        models.check_input_shape(config.input.volume_shape, config.model.variant,
                                      config.model.get("dilated", False))
    except ValueError as e:
        raise loop.ConfigError(str(e)) from None
    return config


def _proposals(config, workdir: str, case_ids: Sequence[str]) -> dict[str, list[proposal.Window]]:
    p = config.proposal
    if p.path:
        found = proposal.read_csv(p.path)
        missing = [c for c in case_ids if c not in found]
        if missing:
            raise ValueError(f"{p.path} has no windows for {len(missing)} case(s): {missing[:5]}")
        windows = {c: found[c] for c in case_ids}
        sizes = {w.num_slices for ws in windows.values() for w in ws}
        if sizes != {p.window_slices}:
            raise ValueError(f"{p.path} holds windows of {sorted(sizes)} slices, the config "
                             f"asks for {p.window_slices}")
    else:
        step = None if config.pretrained.step < 0 else config.pretrained.step
        pre_config, variables, step = ckpt_lib.load_variables(config.pretrained.workdir, step)
        logging.info("proposal: scoring windows with %s step %d", config.pretrained.workdir, step)
        score = proposal.radnet_liver_scorer(state_lib.build_model(pre_config), variables)
        windows = proposal.propose(config.dataset, case_ids, score, p.window_slices, p.stride,
                                   p.threshold, p.batch_size, progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        proposal.write_csv(os.path.join(workdir, "proposals.csv"), windows)
    return windows


def case_windows(config, workdir: str, case_ids: Sequence[str]
                 ) -> tuple[dict[str, list[Start]], dict[str, list[Start]]]:
    """(training windows, evaluation windows) of each case: the selected proposal windows
    for both, or sliding grids with the training and the evaluation overlap."""
    if config.proposal.enabled:
        found = _proposals(config, workdir, case_ids)
        selected = {c: [(w.start, 0, 0) for w in ws if w.selected] for c, ws in found.items()}
        return selected, selected
    window = _shape_arg(config.input.volume_shape)
    train, evaluate = {}, {}
    for c in case_ids:
        image, _ = nifti.open_case(config.dataset, c)
        train[c] = seg_metrics.window_grid(image.shape, window, config.input.train_overlap)
        evaluate[c] = seg_metrics.window_grid(image.shape, window, config.eval.overlap)
    return train, evaluate


def stitch_weights(config) -> np.ndarray | None:
    if config.eval.weighting == "uniform":
        return None
    if config.eval.weighting != "gaussian":
        raise loop.ConfigError(f"config.eval.weighting={config.eval.weighting!r}: choose "
                               "gaussian or uniform")
    return seg_metrics.gaussian_weights(_shape_arg(config.input.volume_shape),
                                        config.eval.gaussian_sigma)


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Task ``segment`` for radnet.main (its return value is the exit status)."""
    train_and_evaluate(config, workdir)
    return 0


def _mean_dice(per_case: dict[str, dict[str, dict[str, float]]]) -> float:
    return float(np.mean([np.mean([m["dice"] for m in classes.values()])
                          for classes in per_case.values()]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming a killed run), evaluates the best validation checkpoint; returns
    what results.json holds."""
    config = resolve_config(config)
    frozen = tuple(config.model.frozen_stages)
    names = list(config.class_names)
    num_classes = len(names)
    window_shape = _shape_arg(config.input.volume_shape)
    placement = loop.Placement.from_config(config)
    weights = stitch_weights(config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)

    # Data: the usable cases of each split, the fraction subset of train, windows.
    all_train = nifti.cases(config.dataset, "train")
    train_ids = training_subset(all_train, config.fraction, config.subset_seed)
    val_ids, test_ids = nifti.cases(config.dataset, "val"), nifti.cases(config.dataset, "test")
    if not val_ids:
        raise ValueError(f"{config.dataset} has no validation case")
    train_windows_of, eval_windows = case_windows(
        config, workdir, sorted(set(all_train) | set(val_ids) | set(test_ids)))
    train_windows = [(c, s) for c in train_ids for s in train_windows_of[c]]
    logging.info("segment: %d classes (%s), freeze=%s fraction=%.2f: %d/%d training cases "
                 "(%d windows of %s), %d val, %d test", num_classes, ", ".join(names),
                 config.freeze, config.fraction, len(train_ids), len(all_train),
                 len(train_windows), window_shape, len(val_ids), len(test_ids))

    # Model, frozen stages, optimizer, steps.
    model = state_lib.build_model(config)
    input_shape = (1, *state_lib.input_shape(config))
    param_labels, stat_labels, optimizer = transfer.labels_and_optimizer(
        model, input_shape, frozen, state_lib.build_optimizer(config))
    predict_step = jax.jit(make_predict_step(model),
                           out_shardings=(placement.batch_sharding, placement.replicated))

    def initial_variables() -> dict:
        variables = init_variables(model, input_shape, config.seed)
        return transfer.with_pretrained_encoder(variables, config)

    def evaluate(variables, case_ids, score) -> dict:
        return evaluate_cases(config.dataset, case_ids, eval_windows, window_shape,
                              num_classes, predict_step, variables, placement.batch_sharding,
                              placement.local_eval_batch_size, score, weights)

    def grid_score(case_id: str, prob: np.ndarray) -> dict:
        _, mask = nifti.open_case(config.dataset, case_id)
        return seg_metrics.case_metrics(np.argmax(prob, axis=0), mask.read().result(), names,
                                        (1.0, 1.0, 1.0), 0.0, surface=False)

    def validate(state, step: int) -> dict[str, float]:
        per_case = evaluate({"params": state["params"], "batch_stats": state["batch_stats"]},
                            val_ids, grid_score)
        dice = _mean_dice(per_case)
        logging.info("step %d validation Dice %.4f", step, dice)
        return {"dice": dice}

    data_iter = train_iterator(config.dataset, train_windows, window_shape,
                               placement.local_batch_size, config.seed,
                               jax.process_index(), jax.process_count())
    loop.train(config, workdir, placement, loop.Task(
        model=model, optimizer=optimizer,
        train_step=make_train_step(model, param_labels, stat_labels, optimizer,
                                   config.loss.dice_smooth, config.loss.ce_weight),
        train_iterator=data_iter, batch_keys=("image", "mask"), evaluate=validate,
        initial_variables=initial_variables, metric_names=("dice",),
        config_extra={"n_train": len(train_ids), "n_train_windows": len(train_windows),
                      "class_names": names}))

    # The best validation checkpoint on the validation and test cases.
    best_step = ckpt_lib.best_step(workdir)
    _, best, _ = ckpt_lib.load_variables(workdir, best_step, sharding=placement.replicated)
    return final_evaluation(config, workdir, best, int(best_step), evaluate, grid_score,
                            train_ids, len(train_windows), val_ids, test_ids)


def final_evaluation(config, workdir: str, variables, best_step: int, evaluate, grid_score,
                     train_ids, n_train_windows: int, val_ids, test_ids) -> dict:
    """Scores the validation and test cases with ``variables``; writes per_case.csv,
    summary.json, results.json and the overlays; returns results.json's content."""
    names = list(config.class_names)
    manifest = {r["case_id"]: r for r in nifti.read_manifest(config.dataset)}
    on_source = bool(config.eval.source_grid) and nifti.has_native(
        nifti.read_attributes(config.dataset))
    overlay_dir = os.path.join(workdir, "overlays")
    overlays = [c for c in test_ids][: int(config.eval.overlays)]
    write_pictures = jax.process_index() == 0 and overlays
    if write_pictures:
        os.makedirs(overlay_dir, exist_ok=True)

    def final_score(case_id: str, prob: np.ndarray) -> dict:
        grid = grid_score(case_id, prob)
        row = manifest[case_id]
        train_spacing, source_spacing = nifti.spacing_of(row)
        if on_source:
            truth = nifti.read_native(config.dataset, case_id)
            pred = seg_metrics.to_source_grid(prob, truth.shape, source_spacing[0],
                                              train_spacing[0])
            spacing = source_spacing
        else:
            _, mask = nifti.open_case(config.dataset, case_id)
            truth, pred, spacing = mask.read().result(), np.argmax(prob, axis=0), train_spacing
        metrics = seg_metrics.case_metrics(pred, truth, names, spacing,
                                           float(config.eval.tolerance_mm))
        if write_pictures and case_id in overlays:
            image, mask = nifti.open_case(config.dataset, case_id)
            write_overlay(os.path.join(overlay_dir, f"{case_id}.png"), image.read().result(),
                          mask.read().result(), np.argmax(prob, axis=0), names,
                          f"{case_id}: Dice " + ", ".join(
                              f"{n} {m['dice']:.3f}" for n, m in metrics.items()))
        return {"classes": metrics, "grid_dice": _mean_dice({case_id: grid})}

    per_case: dict[str, dict] = {}
    for split, ids in (("val", val_ids), ("test", test_ids)):
        if ids:
            per_case[split] = evaluate(variables, ids, final_score)
    run_fields = {"freeze": config.freeze, "fraction": config.fraction,
                  "n_train": len(train_ids), "n_train_windows": n_train_windows,
                  "best_step": best_step,
                  "pretrained_step": (int(config.pretrained.step)
                                      if transfer.restores_encoder(config.freeze) else None),
                  "classes": names[1:], "grid": "source" if on_source else "training",
                  "tolerance_mm": float(config.eval.tolerance_mm),
                  "windows": "proposal" if config.proposal.enabled else "sliding",
                  "weighting": config.eval.weighting}
    summary, results = {"run": run_fields}, dict(run_fields)
    for split, res in per_case.items():
        classes = {c: r["classes"] for c, r in res.items()}
        means = seg_metrics.case_means(classes)
        over = seg_metrics.summarize_classes({c: {"all": m} for c, m in means.items()},
                                             config.seed)["all"]
        summary[split] = {"n": len(res), "over_classes": over,
                          "classes": seg_metrics.summarize_classes(classes, config.seed)}
        results[split] = seg_metrics.summarize(means, with_ci=True, seed=config.seed)
    if "val" in per_case:   # what chose the checkpoint: the validation Dice, training grid
        results["selection"] = {"metric": "val/dice", "training_grid_dice": float(np.mean(
            [r["grid_dice"] for r in per_case["val"].values()]))}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "per_case.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "case_id", "class", *seg_metrics.METRICS])
            for split, res in per_case.items():
                for case_id, r in res.items():
                    for name, m in r["classes"].items():
                        w.writerow([split, case_id, name,
                                    *(f"{m[k]:.6f}" for k in seg_metrics.METRICS)])
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    # In results.json and the tables the caller prints; -v 1 shows it here too.
    logging.debug("segment results: %s", json.dumps(
        {s: results[s] for s in ("val", "test") if s in results}))
    return results


TITLES = {"freeze": "Table 2: liver segmentation by frozen part of the encoder",
          "fraction": "Table 3: liver segmentation by share of training cases"}


def main(argv):
    from absl import flags  # noqa: PLC0415

    del argv
    f = flags.FLAGS
    kind = {"2": "freeze", "3": "fraction"}[f.table]
    results = collect_results(f.root)
    if not results:
        raise SystemExit(f"radnet: error: no summary.json under {f.root}/*/ (run "
                         "launch/liver_tables.sh first)")
    print(TITLES[kind])
    print(format_table(kind, results, f.split))
    stem = os.path.join(f.root, f"table{f.table}")
    write_tables(kind, results, stem, f.split)
    print(f"saved {stem}.md and {stem}.csv")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("table", None, ["2", "3"], "Which paper table to print.", required=True)
    flags.DEFINE_string("root", None, "Folder whose sub-folders are segment workdirs.",
                        required=True)
    flags.DEFINE_enum("split", "test", ["val", "test"], "Which split's summary to print.")
    from radnet import cli  # one-line errors, quiet libraries

    cli.run(main, keep_host_memory=True)
