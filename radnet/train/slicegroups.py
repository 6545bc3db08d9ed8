"""Slice-group selection for lung nodules (task ``slicegroups``).

    python -m radnet.main --config=configs/slicegroups.py:sector_num=5,freeze=none \
        --workdir=runs/sg/s5
    python -m radnet.train.slicegroups --root=runs/sg        # the sector × resolution table

A task on the trainer skeleton (radnet.train.loop): this module brings the slice groups
(radnet.data.slicegroups: slabs, sectors, labels, class balance), the sector-conditioned
model (radnet.models.slicegroups) with the pretrained encoder restored and frozen as the
liver transfer's rows (radnet.train.transfer), the cross-entropy step and the validation
accuracy; the loop brings the sharded state, resumable checkpoints, the NaN guard, the best
checkpoint and the metrics. After training, the best validation checkpoint scores every
group of the validation and test studies.

Workdir outputs::

    config.json          the resolved config (encoder fields from the pretraining run)
    metrics.jsonl        train loss; val accuracy and loss
    checkpoints/         Orbax: state + Grain iterator; latest and best val accuracy
    predictions.csv      split, series_key, group, first slice, sector, label, p_* (every group)
    ranked.csv           per test study, its groups by P(nodule) = 1 − P(non-nodule), with
                         P(malignant) and the rank — the reading order for a radiologist
    strips/<key>.png     per test study, the top groups (maximum-intensity thumbnails, scores)
    results.json         per-group accuracy, per-class recall/precision/AUC, majority
                         baseline, study-level recall of nodule groups in the top k
"""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import flax.linen as nn
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from radnet.data import augment
from radnet.data import slicegroups as sg
from radnet.evaluators import heads as head_metrics
from radnet.evaluators import predict as predict_lib
from radnet.train import checkpoint as ckpt_lib
from radnet.train import loop, transfer
from radnet.train import state as state_lib
from radnet.train.segment import init_variables

def resolve_config(config) -> ml_collections.ConfigDict:
    """A private copy with the derived fields: encoder fields of the pretraining run (so
    its encoder always fits, and scratch runs train the same architecture), the frozen
    stages, the slab shape, the pretraining step."""
    config = ml_collections.ConfigDict(config.to_dict())
    transfer.adopt_pretrained(config)
    config.model.sector_num = int(config.groups.sector_num)
    stored = int(sg.read_attributes(config.dataset)["in_plane"])
    in_plane = int(config.groups.in_plane)
    if stored % in_plane:
        raise loop.ConfigError(f"config.groups.in_plane={in_plane} must divide the dataset's "
                               f"stored in-plane size {stored}")
    config.input.volume_shape = (int(config.groups.group_slices), in_plane, in_plane)
    return config


def init_model_variables(model, input_shape, seed: int) -> dict:
    """Fresh variables of a SliceGroupNet: the encoder as every radnet task draws it
    (radnet.train.segment.init_variables: He-normal over fan-out, fast in NumPy); the head
    with Flax's own initialisers — LeCun-normal hidden kernels, the sector embedding as
    ``nn.Embed`` draws it, and a zero output layer, so training starts at uniform
    probabilities (loss ln 3). Why not init_variables for the head: fan-out of a Dense
    [in, out] kernel is ``out``, so the 3-logit layer came out with std √(2/3) ≈ 0.8, 9×
    LeCun's: measured logits of ±10 and loss 8.9 at step 0, gradient norm 160 at step 10,
    and a training loss above ln 3 for the first ~60 steps."""
    variables = init_variables(model, input_shape, seed)
    flat = traverse_util.flatten_dict(variables["params"])
    key = jax.random.key(seed)
    for path, leaf in sorted(flat.items()):
        if path[0] != "head":
            continue
        key, sub = jax.random.split(key)
        if path[-1] == "kernel":
            init = (nn.initializers.zeros if path[-2] == "logits"
                    else nn.initializers.lecun_normal())
        elif path[-1] == "embedding":
            init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        else:
            continue
        flat[path] = np.asarray(init(sub, leaf.shape, leaf.dtype))
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


def flips_only(prob: float) -> ml_collections.ConfigDict:
    """radnet.data.augment's config with only the left-right and slice-order flips, each
    with probability ``prob`` (a nodule's class depends on neither)."""
    config = augment.default_augment_config()
    for key in ("intensity_scale_prob", "intensity_shift_prob", "gamma_prob", "noise_prob",
                "flip_rows_prob", "translate_prob"):
        config[key] = 0.0
    config.flip_left_right_prob = config.flip_slices_prob = float(prob)
    return config


def make_train_step(model, param_labels, stat_labels, optimizer, flip_prob: float = 0.0):
    def train_step(state, batch, rng):
        x = augment.to_unit_float(batch["image"])
        if flip_prob > 0:
            x = augment.augment(jax.random.fold_in(rng, state["step"]), x,
                                flips_only(flip_prob))

        def loss_fn(params):
            params = jax.tree.map(
                lambda lab, p: jax.lax.stop_gradient(p) if lab == transfer.FROZEN else p,
                param_labels, params)
            logits, updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, x, batch["sector"],
                train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, (updates["batch_stats"], logits)

        (loss, (new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = transfer.keep_frozen(params, state["params"], param_labels)
        new_stats = transfer.keep_frozen(new_stats, state["batch_stats"], stat_labels)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return ({"step": state["step"] + 1, "params": params, "batch_stats": new_stats,
                 "opt_state": opt_state},
                {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)})

    return train_step


def make_predict_step(model):
    def predict_step(variables, batch):
        x = augment.to_unit_float(batch["image"])
        logits = model.apply(variables, x, batch["sector"], train=False)
        return {"probability": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}, {}
    return predict_step


def class_shares(groups) -> np.ndarray:
    labels = np.array([g.label for g in groups if g.label != sg.UNKNOWN], np.int64)
    counts = np.bincount(labels, minlength=len(sg.CLASSES)).astype(np.float64) + 1.0
    return counts / counts.sum()


def prior_weights(train_groups, sampled_groups) -> np.ndarray:
    """Per-class factor prior_true / prior_sampled (add-one shares, so none is 0)."""
    return class_shares(train_groups) / class_shares(sampled_groups)


def predict_groups(config, groups, predict_step, variables, placement,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """[N, 3] class probabilities of ``groups`` (every process gets all of them),
    reweighted by ``weights`` per class and renormalised when given."""
    if not groups:
        return np.zeros((0, len(sg.CLASSES)), np.float32)
    reader = sg.SlabReader(config.dataset, int(config.groups.group_slices),
                           int(config.groups.in_plane))
    batches = predict_lib.padded_batches(groups, reader.map, placement.local_eval_batch_size,
                                         jax.process_index(), jax.process_count())
    out = np.zeros((len(groups), len(sg.CLASSES)), np.float32)
    for outputs, gathered, _ in predict_lib.predict(
            predict_step, variables, batches, placement.batch_sharding,
            device_keys=("image", "sector"), gather_keys=(predict_lib.POSITION,)):
        out[gathered[predict_lib.POSITION]] = outputs["probability"]
    if weights is not None:
        out = out * weights[None].astype(np.float32)
        out /= out.sum(axis=1, keepdims=True)
    return out


# ----------------------------------------------------------------------------- metrics

def ranked_by_study(groups, probs: np.ndarray) -> dict[str, list[int]]:
    """Per study (series key, in first-seen order) the indices of its groups from the
    highest P(nodule) = 1 − P(non-nodule) down (ties: the groups' order): the reading
    order ranked.csv writes and the top-k recall scores."""
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g.series_key, []).append(i)
    p_nodule = 1.0 - np.asarray(probs)[:, sg.NON_NODULE] if len(groups) else np.zeros(0)
    return {key: [idx[j] for j in np.argsort(-p_nodule[idx], kind="stable")]
            for key, idx in by.items()}


def _has_nodule(labels) -> bool:
    return any(label in (sg.BENIGN, sg.MALIGNANT) for label in labels)


def top_k_hits(groups, probs: np.ndarray, k: int) -> list[bool]:
    """For each study with a nodule group: is one among its k groups of highest P(nodule)."""
    return [_has_nodule(groups[i].label for i in order[:k])
            for order in ranked_by_study(groups, probs).values()
            if _has_nodule(groups[i].label for i in order)]


def top_k_recall(groups, probs: np.ndarray, k: int) -> tuple[float | None, int]:
    """Share of studies with a nodule group that have one among their k groups of
    highest P(nodule); and how many such studies there are."""
    hits = top_k_hits(groups, probs, k)
    return (sum(hits) / len(hits) if hits else None), len(hits)


def fit_bias(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class log-probability offsets b [3] minimising the validation NLL of
    softmax(log p + b) (a small L2 keeps b finite when a class is absent): the decision rule
    adapted on validation groups, never on test ones."""
    from scipy.optimize import minimize  # noqa: PLC0415

    logp = np.log(np.maximum(probs.astype(np.float64), 1e-7))
    y = labels.astype(np.int64)

    def nll(b):
        z = logp + b
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(lse - z[np.arange(len(y)), y]) + 1e-3 * np.sum(b ** 2))

    return minimize(nll, np.zeros(probs.shape[1]), method="L-BFGS-B").x


def apply_bias(probs: np.ndarray, bias: np.ndarray) -> np.ndarray:
    z = np.log(np.maximum(probs.astype(np.float64), 1e-7)) + bias
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def calibrated_summary(val_groups, val_probs, test_groups, test_probs, top_k: int):
    """(bias fitted on the labelled validation groups, test summary with it applied)."""
    known = np.array([g.label != sg.UNKNOWN for g in val_groups])
    labels = np.array([g.label for g in val_groups])
    bias = fit_bias(val_probs[known], labels[known])
    return bias, summarize(test_groups, apply_bias(test_probs, bias), top_k)


def study_intervals(groups, probs: np.ndarray, top_k: int, num_samples: int = 1000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """Percentile-bootstrap intervals over STUDIES (the groups of one study are not
    independent; radnet.evaluators.heads' resampling by row weights): of the accuracy's
    margin over the majority-class baseline (both on the same resampled groups) and of
    the top-k study recall."""
    labels = np.array([g.label for g in groups], np.int64)
    keys = np.array([g.series_key for g in groups])
    known = labels != sg.UNKNOWN
    if not known.any():
        return {"margin_ci": None, f"top{top_k}_study_recall_ci": None}
    majority = np.bincount(labels[known], minlength=len(sg.CLASSES)).argmax()
    w = head_metrics.bootstrap_weights(keys[known], num_samples, seed)
    margin = (head_metrics.weighted_accuracy(probs[known].argmax(-1) == labels[known], w)
              - head_metrics.weighted_accuracy(labels[known] == majority, w))
    tail = 50.0 * (1.0 - level)
    out = {"margin_ci": np.percentile(margin, [tail, 100 - tail]).tolist()}
    hits = top_k_hits(groups, probs, top_k)
    ci = None
    if hits:
        ws = head_metrics.bootstrap_weights(np.arange(len(hits)), num_samples, seed)
        recall = head_metrics.weighted_accuracy(np.array(hits), ws)
        ci = np.percentile(recall[np.isfinite(recall)], [tail, 100 - tail]).tolist()
    out[f"top{top_k}_study_recall_ci"] = ci
    return out


def summarize(groups, probs: np.ndarray, top_k: int) -> dict:
    labels = np.array([g.label for g in groups], np.int64)
    m = head_metrics.classification_metrics(probs, labels, sg.CLASSES)
    known = labels[labels != sg.UNKNOWN]
    counts = np.bincount(known, minlength=len(sg.CLASSES))
    recall, n_studies = top_k_recall(groups, probs, top_k)
    return {
        **study_intervals(groups, probs, top_k),
        "groups": int(m["samples"]), "unknown": int(m["unknown"]),
        "class_counts": dict(zip(sg.CLASSES, counts.tolist())),
        "accuracy": m["accuracy"],
        "majority_accuracy": float(counts.max() / max(counts.sum(), 1)),
        "margin": m["accuracy"] - float(counts.max() / max(counts.sum(), 1))
        if m["accuracy"] is not None else None,
        "classes": {c: {k: m["classes"][c][k] for k in ("recall", "precision", "auc")}
                    for c in sg.CLASSES},
        "confusion": m["confusion"],
        f"top{top_k}_study_recall": recall, "studies_with_nodule_groups": n_studies,
    }


# ----------------------------------------------------------------------------- outputs

def write_outputs(workdir: str, config, split_groups: dict, split_probs: dict) -> None:
    with open(os.path.join(workdir, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "series_key", "group", "first_slice", "sector", "label",
                    *(f"p_{c}" for c in sg.CLASSES)])
        for split, groups in split_groups.items():
            for g, p in zip(groups, split_probs[split]):
                w.writerow([split, g.series_key, g.index, g.start, g.sector,
                            sg.CLASSES[g.label] if g.label >= 0 else "unknown",
                            *(f"{v:.4f}" for v in p)])
    groups, probs = split_groups.get("test", []), split_probs.get("test")
    os.makedirs(os.path.join(workdir, "strips"), exist_ok=True)
    with open(os.path.join(workdir, "ranked.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["series_key", "rank", "group", "first_slice", "last_slice", "sector",
                    "p_nodule", "p_malignant", "label"])
        for key, order in ranked_by_study(groups, probs).items():
            for rank, i in enumerate(order, start=1):
                g = groups[i]
                w.writerow([key, rank, g.index, g.start,
                            g.start + int(config.groups.group_slices) - 1, g.sector,
                            f"{1 - probs[i, sg.NON_NODULE]:.4f}",
                            f"{probs[i, sg.MALIGNANT]:.4f}",
                            sg.CLASSES[g.label] if g.label >= 0 else "unknown"])
            write_strip(os.path.join(workdir, "strips", f"{key}.png"), config,
                        [groups[i] for i in order[:int(config.report.strip_groups)]],
                        [probs[i] for i in order[:int(config.report.strip_groups)]])


def write_strip(path: str, config, groups, probs) -> None:
    """A row of thumbnails (maximum-intensity projection of each slab) with their scores."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = max(len(groups), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6), squeeze=False)
    for ax, g, p in zip(axes[0], groups, probs):
        slab = sg.read_slab(config.dataset, g.series_key, g.start,
                            int(config.groups.group_slices), int(config.groups.in_plane))
        ax.imshow(slab.max(axis=0), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"slices {g.start}-{g.start + slab.shape[0] - 1}\n"
                     f"P(nod) {1 - p[sg.NON_NODULE]:.2f}  P(mal) {p[sg.MALIGNANT]:.2f}",
                     fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- run

def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    train_and_evaluate(config, workdir)
    return 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    config = resolve_config(config)
    frozen = tuple(config.model.frozen_stages)
    placement = loop.Placement.from_config(config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
    gs = config.groups
    groups = sg.make_groups(config.dataset, int(gs.group_slices), int(gs.sector_num),
                            config.labels)
    split_groups = {s: [g for g in groups if g.split == s] for s in ("train", "val", "test")}
    train_groups = sg.balance(split_groups["train"], gs.balance, config.seed)
    val_known = [g for g in split_groups["val"] if g.label != sg.UNKNOWN]
    if not train_groups or not val_known:
        raise loop.ConfigError(f"{config.dataset} gives {len(train_groups)} training and "
                               f"{len(val_known)} labelled validation groups; need both")
    logging.info("slicegroups: %d train groups (%s after balance), %d val, %d test; "
                 "sector_num=%d in_plane=%d freeze=%s head=%s", len(split_groups["train"]),
                 len(train_groups), len(split_groups["val"]), len(split_groups["test"]),
                 gs.sector_num, gs.in_plane, config.freeze, config.model.head)

    weights = (prior_weights(split_groups["train"], train_groups)
               if config.eval.prior_correction else None)
    model = state_lib.build_model(config)
    input_shape = (1, *state_lib.input_shape(config))
    param_labels, stat_labels, optimizer = transfer.labels_and_optimizer(
        model, input_shape, frozen, state_lib.build_optimizer(config))
    predict_step = jax.jit(make_predict_step(model),
                           out_shardings=(placement.batch_sharding, placement.replicated))

    def initial_variables() -> dict:
        variables = init_model_variables(model, input_shape, config.seed)
        return transfer.with_pretrained_encoder(variables, config)

    def validate(state, step: int) -> dict[str, float]:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        probs = predict_groups(config, val_known, predict_step, variables, placement,
                               weights)
        labels = np.array([g.label for g in val_known])
        acc = float(np.mean(probs.argmax(-1) == labels))
        loss = float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-7))))
        logging.info("step %d validation accuracy %.4f loss %.4f", step, acc, loss)
        return {"accuracy": acc, "loss": loss}

    data_iter = sg.train_iterator(config.dataset, train_groups, int(gs.group_slices),
                                  int(gs.in_plane), placement.local_batch_size, config.seed,
                                  jax.process_index(), jax.process_count())
    loop.train(config, workdir, placement, loop.Task(
        model=model, optimizer=optimizer,
        train_step=make_train_step(model, param_labels, stat_labels, optimizer,
                                   float(gs.flip_prob)),
        train_iterator=data_iter, batch_keys=("image", "sector", "label"), evaluate=validate,
        initial_variables=initial_variables, metric_names=("accuracy", "loss"),
        config_extra={"n_train_groups": len(train_groups)}))

    best_step = ckpt_lib.best_step(workdir)
    _, best, _ = ckpt_lib.load_variables(workdir, best_step, sharding=placement.replicated)
    split_probs, summaries = {}, {}
    for split in ("val", "test"):
        split_probs[split] = predict_groups(config, split_groups[split], predict_step, best,
                                            placement, weights)
        if split_groups[split]:
            summaries[split] = summarize(split_groups[split], split_probs[split],
                                         int(config.report.top_k))
    if config.eval.calibrate and split_groups["test"]:
        bias, summaries["test_calibrated"] = calibrated_summary(
            split_groups["val"], split_probs["val"], split_groups["test"], split_probs["test"],
            int(config.report.top_k))
        summaries["calibration_bias"] = bias.round(4).tolist()
    results = {"sector_num": int(gs.sector_num), "in_plane": int(gs.in_plane),
               "freeze": config.freeze, "head": config.model.head,
               "labels": config.labels.scheme, "balance": gs.balance,
               "best_step": int(best_step), "n_train_groups": len(train_groups),
               "prior_weights": None if weights is None else weights.round(4).tolist(),
               **summaries}
    if jax.process_index() == 0:
        write_outputs(workdir, config, {s: split_groups[s] for s in ("val", "test")},
                      split_probs)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    logging.info("slicegroups results: %s", json.dumps(results))
    return results


# ----------------------------------------------------------------------------- table

def _cell(x, pct=True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _signed(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _ci(ci, signed: bool = False) -> str:
    if not ci:
        return ""
    f = _signed if signed else _cell
    return f" [{f(ci[0])},{f(ci[1])}]"


def format_table(results: list[dict], split: str = "test", top_k: int = 3) -> str:
    """The report's study as one table: sectors × in-plane size × pretrained/scratch."""
    rows = sorted(results, key=lambda r: (r["sector_num"], -r["in_plane"],
                                          r["freeze"] == "scratch", r["freeze"]))
    head = (f"{'sectors':>7} {'in-plane':>8} {'encoder':>10} {'acc%':>6} {'cal%':>6} "
            f"{'major%':>6} {'margin [95% CI]':>19} "
            + " ".join(f"{c[:6] + ' R/P/AUC':>19}" for c in sg.CLASSES)
            + f" {'top' + str(top_k) + '% [95% CI]':>21} {'n':>4}")
    lines = [head]
    for r in rows:
        s = r.get(split)
        if not s:
            continue
        enc = "scratch" if r["freeze"] == "scratch" else f"pre:{r['freeze']}"
        cells = [f"{_cell(s['classes'][c]['recall'])}/{_cell(s['classes'][c]['precision'])}/"
                 f"{_cell(s['classes'][c]['auc'], False)}" for c in sg.CLASSES]
        cal = (r.get(f"{split}_calibrated") or {}).get("accuracy")
        margin = _signed(s.get("margin")) + _ci(s.get("margin_ci"), signed=True)
        top = _cell(s.get(f"top{top_k}_study_recall")) + _ci(s.get(f"top{top_k}_study_recall_ci"))
        lines.append(f"{r['sector_num']:>7} {r['in_plane']:>8} {enc:>10} "
                     f"{_cell(s['accuracy']):>6} {_cell(cal):>6} "
                     f"{_cell(s['majority_accuracy']):>6} {margin:>19} "
                     + " ".join(f"{c:>19}" for c in cells)
                     + f" {top:>21} {s['groups']:>4}")
    lines.append(f"({split} groups; acc = per-group accuracy (prior-corrected argmax), cal = "
                 f"the same after class offsets fitted on the validation groups, major = "
                 f"majority-class baseline, margin = acc − major, R/P/AUC per class (one vs rest), "
                 f"top{top_k} = studies with a nodule group that have one among their {top_k} "
                 f"highest-ranked groups; intervals: percentile bootstrap over studies)")
    return "\n".join(lines)


def collect_results(root: str) -> list[dict]:
    """results.json of every run under ``root`` (one folder each), in name order."""
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                out.append(json.load(f))
    return out


def main(argv):
    from absl import flags  # noqa: PLC0415

    del argv
    results = collect_results(flags.FLAGS.root)
    if not results:
        raise SystemExit(f"no results.json under {flags.FLAGS.root}/*/")
    print(format_table(results, flags.FLAGS.split))
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("root", None, "Folder whose sub-folders are slicegroups workdirs.",
                        required=True)
    flags.DEFINE_enum("split", "test", ["val", "test"], "Which split to tabulate.")
    app.run(main)
