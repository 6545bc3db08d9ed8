"""Liver segmentation with the transferred 3D-RADNet encoder (task ``segment``).

    python -m radnet.main --config=configs/liver.py:freeze=all --workdir=runs/liver/all
    python -m radnet.train.segment --table=2 --root=runs/liver/table2   # print a table

A task on the trainer skeleton (radnet.train.loop): this module brings the data (proposal
windows, fraction subset), the VNet with the restored encoder, the optimizer with frozen
stages, the Dice-loss train step and the validation Dice; the loop brings the mesh, the
sharded state, resumable Orbax checkpoints (a run killed and started again with the same
command ends as an uninterrupted one), the NaN guard, best-checkpoint keeping, metrics and
multi-process runs. After training, the best validation checkpoint is evaluated on the
validation and test cases.

Workdir outputs::

    config.json        the resolved config (model fields from the pretraining run, n_train)
    proposals.csv      every scored window, 'selected' marks the segmentation inputs
    metrics.jsonl      train loss, volumes/s; val dice (and TensorBoard events)
    checkpoints/       Orbax: state {step, params, batch_stats, opt_state} + data_iter;
                       the latest and the best validation Dice are kept
    per_case.csv       split, case_id, dice, iou (best checkpoint; val and test cases)
    results.json       summaries (mean/median Dice and IoU) for val and test

Evaluation stitches the predictions of a case's selected windows back onto the whole
case (foreground probabilities averaged where windows overlap; slices outside every
selected window are background) and scores it against the case's whole liver mask,
so a liver missed by the proposal costs Dice as it would in use. Windows of all cases
stream through radnet.evaluators.predict, so every process and device shares the work.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from radnet.data import lits
from radnet import models, proposal
from radnet.evaluators import segmentation as seg_metrics
from radnet.data import augment
from radnet.evaluators import predict as predict_lib
from radnet.train import checkpoint as ckpt_lib
from radnet.train import loop, transfer
from radnet.train import state as state_lib


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


def train_iterator(dataset: str, windows: Sequence[tuple[str, int]], num_slices: int,
                   batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """This process's shuffled, repeated batches of training windows (checkpointable).

    One seeded stream of windows for all processes; process p takes elements p, p+P, …
    and batches ``batch_size`` of them, so every window of every epoch goes to exactly one
    process.
    """
    if not windows:
        raise ValueError("no training windows")
    stream = grain.MapDataset.source(list(windows)).seed(seed).shuffle().repeat(None)
    return iter(stream[process_index::process_count]
                .map(proposal.WindowReader(dataset, num_slices, with_mask=True))
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
    """1 − soft Dice of the liver probability per window, averaged over the batch.

    logits ``[B, D, H, W, 2]``, mask ``[B, D, H, W]`` in {0, 1}. ``smooth`` keeps a window
    without liver well-defined (predicting nothing there gives loss 0).
    """
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
    target = mask.astype(jnp.float32)
    axes = tuple(range(1, prob.ndim))
    inter = jnp.sum(prob * target, axis=axes)
    total = jnp.sum(prob, axis=axes) + jnp.sum(target, axis=axes)
    return 1.0 - jnp.mean((2.0 * inter + smooth) / (total + smooth))


def make_train_step(model, param_labels, stat_labels, optimizer, smooth: float):
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
            return dice_loss(logits, batch["mask"], smooth), updates["batch_stats"]

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
    """``(variables, batch) -> (liver probability [B, D, H, W], {})`` for evaluators.predict."""
    def predict_step(variables, batch):
        logits = model.apply(variables, augment.to_unit_float(batch["image"]), train=False)
        return {"probability": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]}, {}
    return predict_step


# ----------------------------------------------------------------------------- evaluation

def stitch(n_slices: int, shape_hw: tuple[int, int], starts: Sequence[int],
           probs: Sequence[np.ndarray]) -> np.ndarray:
    """Window probabilities ``[D, H, W]`` at ``starts`` → mean probability on the case."""
    total = np.zeros((n_slices, *shape_hw), np.float32)
    count = np.zeros((n_slices, 1, 1), np.float32)
    for start, p in zip(starts, probs):
        lo, hi = max(start, 0), min(start + p.shape[0], n_slices)
        if hi <= lo:
            continue
        total[lo:hi] += p[lo - start:hi - start]
        count[lo:hi] += 1
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def evaluate_cases(dataset: str, case_ids: Sequence[str], windows: dict[str, list[int]],
                   num_slices: int, predict_step, variables, batch_sharding,
                   local_batch_size: int, threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """Per-case Dice / IoU of stitched predictions (module docstring), on every process.

    The windows of all cases stream through radnet.evaluators.predict in case order; a
    case is stitched and scored as soon as its last window is back, so at most one case's
    probabilities are held at a time.
    """
    empty = [c for c in case_ids if not windows.get(c)]
    if empty:  # a case without a selected window would drop out of the scores unseen
        raise ValueError(f"{len(empty)} case(s) have no selected window: {empty[:5]}")
    items = [(c, s) for c in case_ids for s in windows[c]]
    last_of_case = {c: i for i, (c, _) in enumerate(items)}   # the last index wins
    batches = predict_lib.padded_batches(
        items, proposal.WindowReader(dataset, num_slices), local_batch_size,
        jax.process_index(), jax.process_count())
    results, probs = {}, []
    for outputs, gathered, _ in predict_lib.predict(predict_step, variables, batches,
                                                    batch_sharding, device_keys=("image",),
                                                    gather_keys=(predict_lib.POSITION,)):
        for position, prob in zip(gathered[predict_lib.POSITION], outputs["probability"]):
            probs.append(prob)
            case_id = items[position][0]
            if position != last_of_case[case_id]:
                continue
            _, mask = lits.open_case(dataset, case_id)
            truth = mask.read().result().astype(bool)
            pred = stitch(truth.shape[0], truth.shape[1:], windows[case_id], probs) >= threshold
            dice, iou = seg_metrics.dice_iou(pred, truth)
            results[case_id] = {"dice": dice, "iou": iou}
            probs = []
    return results


# ----------------------------------------------------------------------------- tables

TABLE_HEADER = ("Mean DICE", "Mean IOU", "Median DICE", "Median IOU")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(kind: str, results: Sequence[dict], split: str = "test") -> str:
    """Table 2 (``kind="freeze"``) or Table 3 (``kind="fraction"``) in the paper's layout."""
    if kind == "freeze":
        order = {f: i for i, f in enumerate(transfer.FREEZE_ROWS)}
        rows = sorted(results, key=lambda r: order.get(r["freeze"], 99))
        first = ["Modification"] + [transfer.FREEZE_LABELS[r["freeze"]] for r in rows]
    elif kind == "fraction":
        rows = sorted(results, key=lambda r: -r["fraction"])
        first = ["% Training Data"] + [f"{100 * r['fraction']:.0f}% (n={r['n_train']})"
                                       for r in rows]
    else:
        raise ValueError(f"table kind is 'freeze' or 'fraction', got {kind!r}")
    body = [[_pct(r[split][k]) for k in ("mean_dice", "mean_iou", "median_dice", "median_iou")]
            for r in rows]
    width0 = max(len(s) for s in first)
    lines = [first[0].ljust(width0) + "  " + "  ".join(h.rjust(11) for h in TABLE_HEADER)]
    for name, cells in zip(first[1:], body):
        lines.append(name.ljust(width0) + "  " + "  ".join(c.rjust(11) for c in cells))
    n = rows[0][split]["n"] if rows else 0
    lines.append(f"({split} set, n={n} cases; Dice/IoU per whole case, then mean/median)")
    return "\n".join(lines)


def collect_results(root: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                out.append(json.load(f))
    return out


# ----------------------------------------------------------------------------- run

def resolve_config(config) -> ml_collections.ConfigDict:
    """A private copy with every derived field filled in, as config.json records it: the
    encoder fields of the pretraining run (so its encoder always fits), the frozen stages,
    the input shape of a window, the pretraining step read."""
    config = ml_collections.ConfigDict(config.to_dict())
    frozen = transfer.frozen_stages(config.freeze)
    pre = config.pretrained
    if pre.model_fields and pre.workdir:
        pre_model = ckpt_lib.load_config(pre.workdir).get("model", {})
        accepted = set(models.get(config.model_name).__dataclass_fields__)
        for key in ("depth", "variant", "norm", "width", "dilated", "dtype"):
            if key in pre_model and key in accepted:
                config.model[key] = pre_model[key]
    config.model.frozen_stages = frozen
    if transfer.restores_encoder(config.freeze):
        pre.step = ckpt_lib.resolve_step(pre.workdir, None if pre.step < 0 else pre.step)
    in_plane = int(lits.read_attributes(config.dataset)["in_plane"])
    config.input.volume_shape = (config.proposal.window_slices, in_plane, in_plane)
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


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Task ``segment`` for radnet.main (its return value is the exit status)."""
    train_and_evaluate(config, workdir)
    return 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming a killed run), evaluates the best validation checkpoint; returns
    what results.json holds."""
    config = resolve_config(config)
    frozen = tuple(config.model.frozen_stages)
    placement = loop.Placement.from_config(config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)

    # Data: the usable cases of each split, the fraction subset of train, proposals.
    all_train = lits.cases(config.dataset, "train")
    train_ids = training_subset(all_train, config.fraction, config.subset_seed)
    val_ids, test_ids = lits.cases(config.dataset, "val"), lits.cases(config.dataset, "test")
    if not val_ids:
        raise ValueError(f"{config.dataset} has no validation case")
    windows = _proposals(config, workdir, sorted(set(all_train) | set(val_ids) | set(test_ids)))
    selected = {c: [w.start for w in ws if w.selected] for c, ws in windows.items()}
    train_windows = [(c, s) for c in train_ids for s in selected[c]]
    num_slices = config.proposal.window_slices
    logging.info("segment: freeze=%s fraction=%.2f: %d/%d training cases (%d windows), "
                 "%d val, %d test", config.freeze, config.fraction, len(train_ids),
                 len(all_train), len(train_windows), len(val_ids), len(test_ids))

    # Model, frozen stages, optimizer, steps.
    model = state_lib.build_model(config)
    input_shape = (1, *state_lib.input_shape(config))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape),
                                                 train=False))
    param_labels = transfer.label_tree(abstract["params"], frozen)
    stat_labels = transfer.label_tree(abstract.get("batch_stats", {}), frozen)
    optimizer = transfer.freeze(state_lib.build_optimizer(config), frozen)
    predict_step = jax.jit(make_predict_step(model),
                           out_shardings=(placement.batch_sharding, placement.replicated))

    def initial_variables() -> dict:
        variables = init_variables(model, input_shape, config.seed)
        if transfer.restores_encoder(config.freeze):
            variables, step = ckpt_lib.restore_subtree(config.pretrained.workdir, variables,
                                                       config.pretrained.step)
            logging.info("restored the encoder of %s step %d", config.pretrained.workdir, step)
        return variables

    def scores(variables, case_ids) -> dict[str, dict[str, float]]:
        return evaluate_cases(config.dataset, case_ids, selected, num_slices, predict_step,
                              variables, placement.batch_sharding,
                              placement.local_eval_batch_size, config.eval.threshold)

    def validate(state, step: int) -> dict[str, float]:
        summary = seg_metrics.summarize(scores(
            {"params": state["params"], "batch_stats": state["batch_stats"]}, val_ids))
        logging.info("step %d validation Dice %.4f", step, summary["mean_dice"])
        return {"dice": summary["mean_dice"]}

    data_iter = train_iterator(config.dataset, train_windows, num_slices,
                               placement.local_batch_size, config.seed,
                               jax.process_index(), jax.process_count())
    loop.train(config, workdir, placement, loop.Task(
        model=model, optimizer=optimizer,
        train_step=make_train_step(model, param_labels, stat_labels, optimizer,
                                   config.loss.dice_smooth),
        train_iterator=data_iter, batch_keys=("image", "mask"), evaluate=validate,
        initial_variables=initial_variables, metric_names=("dice",),
        config_extra={"n_train": len(train_ids), "n_train_windows": len(train_windows)}))

    # The best validation checkpoint on the validation and test cases.
    best_step = ckpt_lib.best_step(workdir)
    _, best, _ = ckpt_lib.load_variables(workdir, best_step, sharding=placement.replicated)
    per_case, summaries = {}, {}
    for split, ids in (("val", val_ids), ("test", test_ids)):
        if ids:
            per_case[split] = scores(best, ids)
            summaries[split] = seg_metrics.summarize(per_case[split])
    results = {"freeze": config.freeze, "fraction": config.fraction, "n_train": len(train_ids),
               "n_train_windows": len(train_windows), "best_step": int(best_step),
               "pretrained_step": (int(config.pretrained.step)
                                   if transfer.restores_encoder(config.freeze) else None),
               **summaries}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "per_case.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "case_id", "dice", "iou"])
            for split, res in per_case.items():
                for case_id, r in res.items():
                    w.writerow([split, case_id, f"{r['dice']:.6f}", f"{r['iou']:.6f}"])
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    logging.info("segment results: %s", json.dumps(results))
    return results


def main(argv):
    from absl import flags  # noqa: PLC0415

    del argv
    f = flags.FLAGS
    kind = {"2": "freeze", "3": "fraction"}[f.table]
    results = collect_results(f.root)
    if not results:
        raise SystemExit(f"no results.json under {f.root}/*/")
    title = {"freeze": "Table 2: liver segmentation by frozen part of the encoder",
             "fraction": "Table 3: liver segmentation by share of training cases"}[kind]
    print(title)
    print(format_table(kind, results, f.split))
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("table", None, ["2", "3"], "Which paper table to print.", required=True)
    flags.DEFINE_string("root", None, "Folder whose sub-folders are segment workdirs.",
                        required=True)
    flags.DEFINE_enum("split", "test", ["val", "test"], "Which split's summary to print.")
    from radnet import cli  # one-line errors, quiet libraries

    cli.run(main)
