"""Liver segmentation with the transferred 3D-RADNet encoder (task ``segment``).

    python -m radnet.main --config=configs/liver.py:freeze=all --workdir=runs/liver/all
    python -m radnet.train.segment --table=2 --root=runs/liver/table2   # print a table

Sections in order: data (proposal windows, fraction subset) → model and transfer →
optimizer with frozen parts → jitted train / predict steps → validation Dice every
``eval_every`` steps, best checkpoint kept → test evaluation on whole cases → outputs.

Workdir outputs::

    config.json        the resolved config (+ n_train, frozen stages)
    proposals.csv      every scored window, 'selected' marks the segmentation inputs
    metrics.jsonl      step, loss, val_dice, volumes/s (and TensorBoard events)
    checkpoints/       Orbax, item 'state' = {step, params, batch_stats, opt_state};
                       only the best validation Dice is kept
    per_case.csv       split, case_id, dice, iou (best checkpoint; val and test cases)
    results.json       summaries (mean/median Dice and IoU) for val and test

Evaluation stitches the predictions of a case's selected windows back onto the whole
case (foreground probabilities averaged where windows overlap; slices outside every
selected window are background) and scores it against the case's whole liver mask,
so a liver missed by the proposal costs Dice as it would in use.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from radnet.data import lits
from radnet import models, proposal, seg_metrics
from radnet.data import augment
from radnet.train import transfer

STATE_ITEM = "state"


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


class _WindowLoader:
    """(case_id, start) → {"image": uint8 [D,H,W], "mask": uint8 [D,H,W]} from TensorStore."""

    def __init__(self, dataset: str, num_slices: int):
        self.dataset = dataset
        self.num_slices = num_slices
        self._open: dict[str, Any] = {}

    def __call__(self, item):
        case_id, start = item
        if case_id not in self._open:
            self._open[case_id] = lits.open_case(self.dataset, case_id)
        image, mask = self._open[case_id]
        return {"image": lits.read_window(image, start, self.num_slices),
                "mask": lits.read_window(mask, start, self.num_slices)}

    def __getstate__(self):  # TensorStore handles are reopened in each worker
        return {"dataset": self.dataset, "num_slices": self.num_slices}

    def __setstate__(self, state):
        self.__init__(state["dataset"], state["num_slices"])


def train_batches(dataset: str, windows: Sequence[tuple[str, int]], num_slices: int,
                  batch_size: int, seed: int) -> grain.MapDataset:
    """Shuffled, repeated batches of training windows; batch i is ``ds[i]`` (resumable)."""
    if not windows:
        raise ValueError("no training windows")
    return (grain.MapDataset.source(list(windows)).seed(seed).shuffle().repeat(None)
            .map(_WindowLoader(dataset, num_slices)).batch(batch_size))


# ----------------------------------------------------------------------------- model

def build_model_config(config, frozen: Sequence[str]) -> dict:
    """VNet fields: the config's, encoder fields from the pretraining run when asked."""
    fields = dict(config.model)
    if config.model_from_pretrained and config.pretrained_workdir:
        pre = transfer.pretrained_model_config(config.pretrained_workdir)
        accepted = set(models.get(config.model_name).__dataclass_fields__)
        for key in ("depth", "variant", "norm", "width", "dilated", "dtype"):
            if key in pre and key in accepted:
                fields[key] = pre[key]
    fields["frozen_stages"] = tuple(frozen)
    return fields


def init_variables(model, input_shape: Sequence[int], seed: int) -> dict:
    """Fresh ``{"params", "batch_stats"}`` of ``model`` for inputs ``[B, D, H, W, C]``.

    Shapes come from ``jax.eval_shape`` of ``model.init``; values are drawn in NumPy:
    kernels He-normal over fan-out (the encoder's and decoder's convolution init),
    norm scales and running variances 1, biases and running means 0. Why not
    ``jax.jit(model.init)``: compiling every initialiser costs minutes of CPU on a
    small machine, far more than the few steps of a test or the demo.
    """
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros(input_shape), train=False),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = transfer._key_name(path[-1])
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


def make_train_step(model, tx, param_labels, stat_labels, smooth: float):
    """Pure ``train_step(state, batch) -> (state, metrics)``; frozen leaves copied through."""

    def train_step(state, batch):
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
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Bit-exact: frozen leaves are the old arrays, whatever the update computed.
        params = transfer.keep_frozen(params, state["params"], param_labels)
        new_stats = transfer.keep_frozen(new_stats, state["batch_stats"], stat_labels)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": new_stats,
                     "opt_state": opt_state}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_predict(model):
    def predict(params, batch_stats, images):
        logits = model.apply({"params": params, "batch_stats": batch_stats},
                             augment.to_unit_float(images), train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
    return predict


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
                   num_slices: int, predict_fn, batch_size: int,
                   threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """Per-case Dice / IoU of stitched predictions (module docstring)."""
    results = {}
    for case_id in case_ids:
        image, mask = lits.open_case(dataset, case_id)
        starts = windows[case_id]
        probs = []
        for i in range(0, len(starts), batch_size):
            chunk = starts[i:i + batch_size]
            batch = np.stack([lits.read_window(image, s, num_slices) for s in chunk])
            pad = batch_size - len(chunk)      # fixed batch shape: one compilation
            if pad:
                batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
            probs.extend(np.asarray(predict_fn(batch))[:len(chunk)])
        truth = mask.read().result().astype(bool)
        pred = stitch(truth.shape[0], truth.shape[1:], starts, probs) >= threshold
        d, j = seg_metrics.dice_iou(pred, truth)
        results[case_id] = {"dice": d, "iou": j}
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

def _write_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
        step = None if config.pretrained_step < 0 else config.pretrained_step
        model, variables, step = transfer.load_classifier(config.pretrained_workdir, step)
        logging.info("proposal: scoring windows with %s step %d", config.pretrained_workdir, step)
        score = proposal.radnet_liver_scorer(model, variables)
        windows = proposal.propose(config.dataset, case_ids, score, p.window_slices, p.stride,
                                   p.threshold, p.batch_size, progress=True)
    proposal.write_csv(os.path.join(workdir, "proposals.csv"), windows)
    return windows


class _QuietLibraries:
    """absl log filter: drops INFO records of Orbax (dozens per save/restore)."""

    def filter(self, record):
        import logging as py_logging  # noqa: PLC0415

        return record.levelno > py_logging.INFO or "/orbax/" not in record.pathname


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Task ``segment`` for radnet.main (its return value is the exit status)."""
    train_and_evaluate(config, workdir)
    return 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, keeps the best validation checkpoint, evaluates; returns results.json."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    if config.get("quiet_orbax", True):
        logging.get_absl_handler().addFilter(_QuietLibraries())

    os.makedirs(workdir, exist_ok=True)
    frozen = transfer.frozen_stages(config.freeze)
    restore = transfer.restores_encoder(config.freeze)

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

    # Model and transfer.
    model_fields = build_model_config(config, frozen)
    model = models.get(config.model_name)(**model_fields)
    attrs = lits.read_attributes(config.dataset)
    shape = (1, num_slices, attrs["in_plane"], attrs["in_plane"], 1)
    variables = init_variables(model, shape, config.seed)
    pretrained_step = None
    if restore:
        step = None if config.pretrained_step < 0 else config.pretrained_step
        variables, pretrained_step = transfer.restore_encoder(
            config.pretrained_workdir, variables, step)
        logging.info("restored the encoder of %s step %d", config.pretrained_workdir,
                     pretrained_step)

    tx = transfer.make_optimizer(optax.adam(config.train.lr), variables["params"], config.freeze)
    param_labels = transfer.label_tree(variables["params"], config.freeze)
    stat_labels = transfer.label_tree(variables["batch_stats"], config.freeze)

    if jax.process_count() > 1:
        # Batches are placed with device_put and every file is written by the caller: both
        # assume one process. Say so rather than fail obscurely or write files N times.
        raise NotImplementedError("the segment task runs on one process (any number of its "
                                  f"devices); this run has {jax.process_count()} processes")
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated = jax.NamedSharding(mesh, jax.P())
    data_sharding = jax.NamedSharding(mesh, jax.P("data"))
    if config.train.batch_size % jax.device_count():
        raise ValueError(f"train.batch_size {config.train.batch_size} is not a multiple of "
                         f"the {jax.device_count()} devices")
    params = jax.device_put(variables["params"], replicated)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "batch_stats": jax.device_put(variables["batch_stats"], replicated),
             "opt_state": jax.jit(tx.init, out_shardings=replicated)(params)}
    train_step = jax.jit(make_train_step(model, tx, param_labels, stat_labels,
                                         config.train.dice_smooth),
                         in_shardings=(replicated, data_sharding),
                         out_shardings=(replicated, replicated), donate_argnums=0)
    predict = jax.jit(make_predict(model))

    with open(os.path.join(workdir, "config.json"), "w") as f:
        saved = json.loads(config.to_json_best_effort())
        saved.update(n_train=len(train_ids), frozen_stages=list(frozen),
                     vnet=dict(model_fields, frozen_stages=list(frozen)))
        json.dump(saved, f, indent=1)

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda m: m["val_dice"], reverse=False, n=1),
        enable_async_checkpointing=False))
    if manager.latest_step() is not None:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; use a fresh workdir")

    def val_dice(st):
        per_case = evaluate_cases(
            config.dataset, val_ids, selected, num_slices,
            lambda b: predict(st["params"], st["batch_stats"], b),
            config.eval.batch_size, config.eval.threshold)
        return seg_metrics.summarize(per_case)["mean_dice"]

    batches = train_batches(config.dataset, train_windows, num_slices,
                            config.train.batch_size, config.seed)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    writer = _tensorboard(workdir)
    t0, seen = time.time(), 0
    best = (-1.0, 0)
    for step in range(1, config.train.num_steps + 1):
        batch = batches[step - 1]
        batch = {"image": jax.device_put(batch["image"], data_sharding),
                 "mask": jax.device_put(batch["mask"], data_sharding)}
        state, m = train_step(state, batch)
        seen += config.train.batch_size
        record = None
        if step % config.train.log_every == 0 or step == config.train.num_steps:
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            rate = seen / max(time.time() - t0, 1e-9)
            eta = (config.train.num_steps - step) * config.train.batch_size / max(rate, 1e-9)
            record = {"step": step, "loss": loss, "windows_per_s": rate}
            logging.info("step %d/%d loss %.4f  %.2f windows/s  ETA %.0fs", step,
                         config.train.num_steps, loss, rate, eta)
        if step % config.train.eval_every == 0 or step == config.train.num_steps:
            vd = val_dice(state)
            record = dict(record or {"step": step}, val_dice=vd)
            manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(
                jax.device_get(state))}), metrics={"val_dice": vd})
            if vd > best[0]:
                best = (vd, step)
            logging.info("step %d validation Dice %.4f (best %.4f at %d)", step, vd, *best)
        if record:
            _write_jsonl(metrics_path, record)
            if writer:
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
    manager.wait_until_finished()
    best_step = manager.best_step()
    restored = manager.restore(best_step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(jax.device_get(state))}))[STATE_ITEM]
    manager.close()
    # Once onto the devices: the restore gives host arrays, which would otherwise be copied
    # over again for every evaluation batch.
    restored = jax.device_put(restored, replicated)
    if writer:
        writer.close()

    predict_best = lambda b: predict(restored["params"], restored["batch_stats"], b)  # noqa: E731
    per_case = {}
    summaries = {}
    for split, ids in (("val", val_ids), ("test", test_ids)):
        if not ids:
            continue
        res = evaluate_cases(config.dataset, ids, selected, num_slices, predict_best,
                             config.eval.batch_size, config.eval.threshold)
        per_case[split] = res
        summaries[split] = seg_metrics.summarize(res)
    with open(os.path.join(workdir, "per_case.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "case_id", "dice", "iou"])
        for split, res in per_case.items():
            for case_id, r in res.items():
                w.writerow([split, case_id, f"{r['dice']:.6f}", f"{r['iou']:.6f}"])
    results = {"freeze": config.freeze, "fraction": config.fraction, "n_train": len(train_ids),
               "n_train_windows": len(train_windows), "best_step": int(best_step),
               "pretrained_step": pretrained_step, **summaries}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    logging.info("segment results: %s", json.dumps(results))
    return results


def _tensorboard(workdir: str):
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
    except ImportError:
        logging.warning("tensorboardX missing: no TensorBoard events (metrics.jsonl still written)")
        return None
    return SummaryWriter(os.path.join(workdir, "events"))


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
    app.run(main)
