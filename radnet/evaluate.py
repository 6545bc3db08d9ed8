"""The evaluation report of a pretrained 3D-RADNet: the paper's Table 1, with plots.

    python -m radnet.main --config=configs/evaluate.py --workdir=WORKDIR \
        --config.checkpoint=WORKDIR --config.dataset=DATASET [--config.split=test] \
        [--config.out=DIR]

Writes to ``config.out`` (default: ``--workdir``):

- ``report.json``   every metric of ``radnet.evaluators.heads.head_metrics`` plus run details
- ``report.md``     Table 1 in the paper's layout (Samples / Accuracy / AUC / Recall /
                    Precision per class, a Total row per head) and the spacing errors
- ``roc_<head>.png``, ``confusion_<head>.png``, ``slice_spacing.png``
- ``predictions.npz`` the gathered model outputs and labels, keyed by dataset row index,
                    so the report can be re-rendered or analysed without the model

The report is built by ``write_report(outputs, targets, out_dir)`` from plain arrays, so
it is tested without a model; ``run`` streams the split through a jitted, data-sharded
evaluation step and calls it.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping

import numpy as np
from absl import logging

from radnet import labels
from radnet.evaluators import heads as metrics

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PREDICTIONS = "predictions.npz"

# Section titles of Table 1, in the paper's order.
SECTION_TITLES = {
    "sequence": "Modality/Sequence",
    "view": "View",
    "contrast": "Contrast",
    "coverage": "Scan Coverage",
}
_DISPLAY = {
    "no_contrast": "No Contrast",
    "upper_head_neck": "Upper Head-Neck",
    "lower_head_neck": "Lower Head-Neck",
}


def display_name(name: str) -> str:
    """Label name → the paper's spelling (``axial`` → ``Axial``; sequences as they are)."""
    if name in _DISPLAY:
        return _DISPLAY[name]
    if name in labels.SEQUENCE:
        return name
    return name.replace("_", " ").title()


# --------------------------------------------------------------------------- report


def build_report(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                 coverage_threshold: float = metrics.COVERAGE_THRESHOLD,
                 meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of report.json from gathered outputs (logits) and labels (no padding)."""
    heads = metrics.head_metrics(outputs, targets, coverage_threshold=coverage_threshold)
    n = int(np.asarray(next(iter(outputs.values()))).shape[0]) if outputs else 0
    return {
        "heads": heads,
        "summary": metrics.summary(heads),
        "samples": n,
        "meta": dict(meta or {}),
    }


_METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "recall": "recall",
                 "precision": "precision", "exact_match": "exact match"}


def _pct(value) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}%"


def render_markdown(report: Mapping[str, Any]) -> str:
    """Table 1 of the paper: one section per head, per-class rows and a Total row.

    Undefined entries show as "—" with their reason listed under the table.
    """
    heads = report["heads"]
    meta = report.get("meta", {})
    lines = []
    title = "Classification performance of 3D-RADNet"
    if meta.get("split"):
        title += f" on the {meta['split']} set"
    lines += [f"# {title}", ""]
    details = [f"{k}: `{meta[k]}`" for k in ("checkpoint", "step", "dataset") if k in meta]
    if details:
        lines += ["; ".join(details), ""]
    lines += ["| | Samples | Accuracy | AUC | Recall | Precision |",
              "|---|---:|---:|---:|---:|---:|"]
    notes: list[str] = []
    for head, section in SECTION_TITLES.items():
        if head not in heads:
            continue
        h = heads[head]
        lines.append(f"| **{section}** | | | | | |")
        for name, row in h["classes"].items():
            shown = display_name(name)
            lines.append(f"| {shown} | {row['samples']} | {_pct(row['accuracy'])} | "
                         f"{_pct(row['auc'])} | {_pct(row['recall'])} | "
                         f"{_pct(row['precision'])} |")
            if row["undefined"]:
                notes.append(f"{section} / {shown}: " + "; ".join(
                    f"{_METRIC_NAMES.get(m, m)} — {r}" for m, r in row["undefined"].items())
                    + ".")
        total = h["exact_match"] if head in labels.MULTILABEL_HEADS else h["accuracy"]
        lines.append(f"| <u>Total</u> | <u>{h['samples']}</u> | {_pct(total)} | | | |")
        for metric, reason in h["undefined"].items():
            notes.append(f"{section}: {metric} undefined — {reason}.")
    lines.append("")
    lines.append("Accuracy, AUC, recall and precision of a class are one-vs-rest; Samples counts "
                 "its labelled positives. A single-choice head's Total is its argmax accuracy "
                 "over all labelled samples.")
    if "coverage" in heads:
        c = heads["coverage"]
        lines.append(f"Scan coverage: a region is predicted present at probability ≥ "
                     f"{c['threshold']:g}; its Total is the exact match over all nine regions "
                     f"({c['samples']} samples with every region labelled"
                     + (f", {c['unknown_rows']} left out" if c["unknown_rows"] else "") + ").")
    for head in (*labels.CLASS_HEADS,):
        if head in heads and heads[head]["unknown"]:
            lines.append(f"{SECTION_TITLES[head]}: {heads[head]['unknown']} samples with an "
                         "unknown label are left out.")
    if "slice_spacing" in heads:
        s = heads["slice_spacing"]
        lines += ["", "## Slice spacing regression", "",
                  "| | Samples | MAE (mm) | RMSE (mm) | Bias (mm) |",
                  "|---|---:|---:|---:|---:|",
                  f"| Effective slice spacing | {s['samples']} | {_mm(s['mae_mm'])} | "
                  f"{_mm(s['rmse_mm'])} | {_mm(s['bias_mm'])} |"]
        for metric, reason in s["undefined"].items():
            notes.append(f"Slice spacing: {metric} undefined — {reason}.")
        if s["unknown"]:
            lines.append(f"\n{s['unknown']} samples with an unknown spacing are left out.")
    if notes:
        lines += ["", "## Undefined entries (—)", ""] + [f"- {n}" for n in notes]
    plots = meta.get("plots")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines.append("")
    return "\n".join(lines)


def _mm(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def console_table(report: Mapping[str, Any]) -> str:
    """The per-head summary printed at the end of a run (and shown by the demo)."""
    heads = report["heads"]
    rows = [("head", "samples", "metric", "value")]
    for head in (*labels.CLASS_HEADS,):
        if head in heads:
            rows.append((head, str(heads[head]["samples"]), "accuracy",
                         _pct(heads[head]["accuracy"])))
    if "coverage" in heads:
        rows.append(("coverage", str(heads["coverage"]["samples"]), "exact match",
                     _pct(heads["coverage"]["exact_match"])))
    if "slice_spacing" in heads:
        s = heads["slice_spacing"]
        rows.append(("slice_spacing", str(s["samples"]), "MAE / RMSE (mm)",
                     f"{_mm(s['mae_mm'])} / {_mm(s['rmse_mm'])}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) if i != 1 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths)))
    out = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot's import
    import matplotlib.pyplot as plt
    return plt


def _scores(outputs, head):
    if head in labels.CLASS_HEADS:
        return metrics.softmax(outputs[head])
    return metrics.sigmoid(outputs[head])


def plot_roc(outputs, targets, heads, head: str, path: str) -> None:
    """One-vs-rest ROC curve of every class of ``head``, AUC in the legend."""
    plt = _pyplot()
    names = labels.CLASS_HEADS.get(head) or labels.MULTILABEL_HEADS[head]
    scores = _scores(outputs, head)
    y = np.asarray(targets[head]).astype(np.int64)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(names):
        if head in labels.CLASS_HEADS:
            keep = y != labels.UNKNOWN
            positive = y[keep] == c
        else:
            keep = y[:, c] != labels.UNKNOWN
            positive = y[keep, c] == 1
        fpr, tpr = metrics.roc_curve(scores[keep, c], positive)
        auc = heads[head]["classes"][name]["auc"]
        label = f"{display_name(name)} (n={int(positive.sum())}, AUC " + (
            f"{auc:.3f})" if auc is not None else "undefined)")
        if fpr.size:
            ax.plot(fpr, tpr, lw=1.5, label=label)
        else:
            ax.plot([], [], lw=0, label=label)  # keep the class visible in the legend
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate",
           ylabel="True positive rate",
           title=f"ROC, {SECTION_TITLES.get(head, head)} (one-vs-rest)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(heads, head: str, path: str) -> None:
    """Confusion matrix of a single-choice head (rows true, columns predicted), counts
    annotated and colour normalised per true class so that rare classes stay visible."""
    plt = _pyplot()
    names = [display_name(n) for n in labels.CLASS_HEADS[head]]
    cm = np.asarray(heads[head]["confusion"], dtype=np.int64)
    row_sum = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row_sum, out=np.zeros(cm.shape, float), where=row_sum > 0)
    size = 1.2 + 0.8 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="Predicted", ylabel="True",
           title=f"{SECTION_TITLES[head]}: accuracy {_pct(heads[head]['accuracy'])}")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coverage_confusion(heads, path: str) -> None:
    """Coverage: a 2×2 confusion matrix per region at the report's threshold."""
    plt = _pyplot()
    cov = heads["coverage"]
    names = list(cov["classes"])
    cols = 3
    rows_n = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.6 * cols, 2.4 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names):
        r = cov["classes"][name]
        cm = np.array([[r["tn"], r["fp"]], [r["fn"], r["tp"]]])
        row_sum = cm.sum(axis=1, keepdims=True)
        frac = np.divide(cm, row_sum, out=np.zeros(cm.shape, float), where=row_sum > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if frac[i, j] > 0.5 else "black")
        ax.set_xticks([0, 1], ["absent", "present"], fontsize=7)
        ax.set_yticks([0, 1], ["absent", "present"], fontsize=7)
        ax.set_title(display_name(name), fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Scan coverage (rows true, columns predicted at p ≥ {cov['threshold']:g}); "
                 f"exact match {_pct(cov['exact_match'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spacing(outputs, targets, heads, path: str) -> None:
    """Predicted against true effective slice spacing, identity line for reference."""
    plt = _pyplot()
    pred = np.asarray(outputs["slice_spacing"], dtype=np.float64).reshape(-1)
    true = np.asarray(targets[labels.SLICE_SPACING_TARGET], dtype=np.float64)
    keep = np.isfinite(true) & np.isfinite(pred)
    s = heads["slice_spacing"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true[keep], pred[keep], s=12, alpha=0.6, edgecolors="none")
    if keep.any():
        lo = float(min(true[keep].min(), pred[keep].min(), 0.0))
        hi = float(max(true[keep].max(), pred[keep].max()))
        margin = 0.04 * (hi - lo) + 1e-6  # keep edge points off the frame
        lo, hi = lo - margin, hi + margin
    else:
        lo, hi = 0.0, 1.0
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="predicted = true")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="True effective slice spacing (mm)",
           ylabel="Predicted slice spacing (mm)",
           title=f"Slice spacing: MAE {_mm(s['mae_mm'])} mm, RMSE {_mm(s['rmse_mm'])} mm "
                 f"(n={s['samples']})")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(outputs, targets, heads, out_dir: str) -> list[str]:
    """Writes every plot whose head is present; returns the file names (relative)."""
    written = []
    for head in (*labels.CLASS_HEADS, *labels.MULTILABEL_HEADS):
        if head in heads:
            name = f"roc_{head}.png"
            plot_roc(outputs, targets, heads, head, os.path.join(out_dir, name))
            written.append(name)
    for head in labels.CLASS_HEADS:
        if head in heads:
            name = f"confusion_{head}.png"
            plot_confusion(heads, head, os.path.join(out_dir, name))
            written.append(name)
    if "coverage" in heads:
        plot_coverage_confusion(heads, os.path.join(out_dir, "confusion_coverage.png"))
        written.append("confusion_coverage.png")
    if "slice_spacing" in heads:
        plot_spacing(outputs, targets, heads, os.path.join(out_dir, "slice_spacing.png"))
        written.append("slice_spacing.png")
    return written


def write_report(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                 out_dir: str, coverage_threshold: float = metrics.COVERAGE_THRESHOLD,
                 meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Builds the report from gathered arrays and writes every output file to ``out_dir``.

    Args:
      outputs: model outputs without padding rows: ``sequence`` [N,5], ``view`` [N,3],
        ``contrast`` [N,2], ``coverage`` [N,9] logits, ``slice_spacing`` [N] mm.
      targets: labels of the same rows: ``sequence``/``view``/``contrast`` [N] (-1
        unknown), ``coverage`` [N,9] (-1 unknown), ``effective_spacing_mm`` [N] (NaN
        unknown), optionally ``index`` [N] (dataset rows).
    Returns the report dict (as written to report.json).
    """
    os.makedirs(out_dir, exist_ok=True)
    report = build_report(outputs, targets, coverage_threshold, meta)
    report["meta"]["plots"] = write_plots(outputs, targets, report["heads"], out_dir)
    with open(os.path.join(out_dir, REPORT_JSON), "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)  # undefined metrics are null
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_MD), "w") as f:
        f.write(render_markdown(report))
    np.savez_compressed(os.path.join(out_dir, PREDICTIONS),
                        **{f"output_{k}": np.asarray(v) for k, v in outputs.items()},
                        **{f"target_{k}": np.asarray(v) for k, v in targets.items()})
    return report


# --------------------------------------------------------------------------- the task


def predict(model_config, variables, dataset: str, split: str, batch_size: int,
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Streams ``split`` through the model; returns (outputs, targets) of every real row.

    ``batch_size`` is global (all processes together), as in training; each process's
    share is rounded up to a multiple of its devices (the extra rows are masked padding).
    The Grain evaluation pipeline feeds radnet.evaluators.predict on a 1-D ``data`` mesh
    of all devices; outputs and labels come back gathered, in dataset row order, and the
    dataset row indices are checked to be unique.
    """
    import jax
    from tqdm import tqdm

    from radnet import models
    from radnet.data import augment, pipeline
    from radnet.evaluators import predict as predict_lib

    model = models.get(model_config.model_name)(**model_config.model)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    data_sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    # Through the host: loaded variables may sit on this process's devices only.
    variables = jax.device_put(jax.device_get(variables), replicated)

    def eval_step(variables, batch):
        # uint8 crosses the host→device link (4× less than float32); the scaling to
        # [0, 1] is training's own (radnet.data.augment.to_unit_float), done on device.
        return model.apply(variables, augment.to_unit_float(batch["volume"]), train=False), {}

    step = jax.jit(eval_step, out_shardings=(data_sharding, replicated))
    local_batch = predict_lib.local_batch_size(batch_size, jax.process_count(),
                                               jax.local_device_count())
    if local_batch * jax.process_count() != batch_size:
        logging.warning("global batch_size %d → %d per process × %d processes (a multiple of "
                        "the %d local devices)", batch_size, local_batch, jax.process_count(),
                        jax.local_device_count())
    keys = (*labels.CLASS_HEADS, *labels.MULTILABEL_HEADS, labels.SLICE_SPACING_TARGET, "index")
    acc = metrics.Accumulator()
    batches = pipeline.eval_batches(dataset, split=split, batch_size=local_batch,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    batches = tqdm(batches, desc=f"evaluate {split}", unit="batch",
                   disable=jax.process_index() != 0)
    for outputs, targets, _ in predict_lib.predict(step, variables, batches, data_sharding,
                                                   device_keys=("volume",), gather_keys=keys):
        acc.add(outputs, targets)
    outputs, targets = acc.arrays()
    if not outputs:
        raise ValueError(f"split {split!r} of {dataset} has no rows to evaluate")
    index = targets["index"]
    if np.unique(index).size != index.size:
        raise RuntimeError(f"{index.size - np.unique(index).size} dataset rows were evaluated "
                           "more than once; the evaluation pipeline must yield each row once")
    order = np.argsort(index, kind="stable")  # row order, independent of the process layout
    return ({k: v[order] for k, v in outputs.items()},
            {k: v[order] for k, v in targets.items()})


def run(config, workdir: str) -> int:
    """Task ``evaluate``: Table 1 and plots for the checkpoint in ``config.checkpoint``."""
    import jax

    from radnet.data import schema
    from radnet.train import checkpoint as checkpoint_lib

    checkpoint = config.checkpoint or workdir
    if not config.dataset:
        raise ValueError("--config.dataset is required (the zarr dataset to evaluate on)")
    if config.split not in labels.SPLITS:
        raise ValueError(f"--config.split={config.split!r}; choose one of {labels.SPLITS}")
    step = None if config.step < 0 else int(config.step)
    trained_shape = tuple(checkpoint_lib.load_config(checkpoint).input.volume_shape)
    dataset_shape = tuple(int(s) for s in schema.read_attributes(config.dataset)["volume_shape"])
    if trained_shape != dataset_shape:
        raise ValueError(f"{checkpoint} was trained on volumes of {trained_shape} but "
                         f"{config.dataset} holds {dataset_shape}; evaluate on a dataset built "
                         "with the same volume shape")
    model_config, variables, step = checkpoint_lib.load_variables(checkpoint, step)
    logging.info("evaluating %s (step %d, model %s) on %s split %s", checkpoint, step,
                 model_config.model_name, config.dataset, config.split)
    outputs, targets = predict(model_config, variables, config.dataset, config.split,
                               config.batch_size)
    if jax.process_index() != 0:
        return 0
    out_dir = config.out or workdir
    meta = {
        "checkpoint": os.path.abspath(checkpoint),
        "step": step,
        "dataset": config.dataset,
        "split": config.split,
        "model_name": model_config.model_name,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    report = write_report(outputs, targets, out_dir, config.coverage_threshold, meta)
    print(f"\n3D-RADNet evaluation, split {config.split}, {report['samples']} samples\n")
    print(console_table(report))
    print(f"\nreport: {os.path.join(out_dir, REPORT_MD)} (+ report.json, "
          f"{len(report['meta']['plots'])} plots)")
    return 0
