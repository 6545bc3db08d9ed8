"""The evaluation report of a pretrained 3D-RADNet: the paper's Table 1, with plots.

    python -m radnet.main --config=configs/evaluate.py --workdir=WORKDIR \
        --config.checkpoint=WORKDIR --config.dataset=DATASET [--config.split=test] \
        [--config.out=DIR]

Writes to ``config.out`` (default: ``--workdir``):

- ``report.json``   every metric of ``radnet.evaluators.heads.head_metrics`` plus run details
- ``report.md``     Table 1 in the paper's layout (Samples / Accuracy / AUC / Recall /
                    Precision per class, a Total row per head) and the spacing errors
- ``roc_<head>.png``, ``confusion_<head>.png``, ``slice_spacing.png``
- ``training_curves.png`` loss per head and validation accuracy per head against the step,
                    from the run's metrics.jsonl, the scored step marked

By default the run's best checkpoint (by its ``checkpoint.best_metric``) is scored, and the
report says which step that is and why. Every accuracy, AUC, exact match and MAE carries a
95% percentile-bootstrap interval that resamples PATIENTS (the dataset's manifest.csv
``patient_key``), with the number of patients and series it rests on.
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
                 meta: Mapping[str, Any] | None = None, groups: np.ndarray | None = None,
                 bootstrap_samples: int = 1000, bootstrap_seed: int = 0,
                 level: float = 0.95) -> dict[str, Any]:
    """The content of report.json from gathered outputs (logits) and labels (no padding).

    ``groups`` [N]: the patient of each row, for the bootstrap intervals (None: each row is
    its own group, i.e. series-level; ``bootstrap_samples=0``: no intervals).
    """
    heads = metrics.head_metrics(outputs, targets, coverage_threshold=coverage_threshold)
    n = int(np.asarray(next(iter(outputs.values()))).shape[0]) if outputs else 0
    report = {
        "heads": heads,
        "summary": metrics.summary(heads),
        "samples": n,
        "meta": dict(meta or {}),
    }
    if bootstrap_samples > 0 and n:
        unit = "patient" if groups is not None else "series"
        groups = np.arange(n) if groups is None else np.asarray(groups)
        report["intervals"] = metrics.bootstrap_intervals(
            outputs, targets, groups, bootstrap_samples, bootstrap_seed, level,
            coverage_threshold)
        report["meta"]["ci"] = {"level": level, "resamples": int(bootstrap_samples),
                                "seed": int(bootstrap_seed), "unit": unit,
                                "groups": int(np.unique(groups).size), "series": n}
    return report


_METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "recall": "recall",
                 "precision": "precision", "exact_match": "exact match"}


def _pct(value) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}%"


def _ci(interval, scale: float = 100.0, digits: int = 1) -> str:
    """`` [lo–hi]`` after a value, or nothing when there is no interval."""
    if not interval:
        return ""
    return f" [{scale * interval[0]:.{digits}f}–{scale * interval[1]:.{digits}f}]"


def _interval(report, head: str, metric: str, name: str | None = None):
    entry = report.get("intervals", {}).get(head, {})
    if name is not None:
        entry = entry.get("classes", {}).get(name, {})
    return entry.get(metric)


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
    if meta.get("step_reason"):
        lines += [f"Scored step {meta['step']}: {meta['step_reason']}.", ""]
    ci = meta.get("ci")
    if ci:
        lines += [f"In brackets: {100 * ci['level']:.0f}% confidence interval (percentile "
                  f"bootstrap, {ci['resamples']} resamples of the {ci['groups']} "
                  f"{ci['unit']}s behind these {ci['series']} series"
                  + (", all series of a drawn patient together" if ci["unit"] == "patient"
                     else "; no patient keys found, so series count as independent")
                  + ").", ""]
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
            lines.append(
                f"| {shown} | {row['samples']} | {_pct(row['accuracy'])}"
                f"{_ci(_interval(report, head, 'accuracy', name))} | {_pct(row['auc'])}"
                f"{_ci(_interval(report, head, 'auc', name))} | {_pct(row['recall'])} | "
                f"{_pct(row['precision'])} |")
            if row["undefined"]:
                notes.append(f"{section} / {shown}: " + "; ".join(
                    f"{_METRIC_NAMES.get(m, m)} — {r}" for m, r in row["undefined"].items())
                    + ".")
        key = "exact_match" if head in labels.MULTILABEL_HEADS else "accuracy"
        lines.append(f"| <u>Total</u> | <u>{h['samples']}</u> | {_pct(h[key])}"
                     f"{_ci(_interval(report, head, key))} | | | |")
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
                  f"| Effective slice spacing | {s['samples']} | {_mm(s['mae_mm'])}"
                  f"{_ci(_interval(report, 'slice_spacing', 'mae_mm'), 1.0, 2)} | "
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
    level = report.get("meta", {}).get("ci", {}).get("level")
    rows = [("head", "samples", "metric", "value" + (f" [{100 * level:.0f}% CI]" if level else ""))]
    for head in (*labels.CLASS_HEADS,):
        if head in heads:
            rows.append((head, str(heads[head]["samples"]), "accuracy",
                         _pct(heads[head]["accuracy"])
                         + _ci(_interval(report, head, "accuracy"))))
    if "coverage" in heads:
        rows.append(("coverage", str(heads["coverage"]["samples"]), "exact match",
                     _pct(heads["coverage"]["exact_match"])
                     + _ci(_interval(report, "coverage", "exact_match"))))
    if "slice_spacing" in heads:
        s = heads["slice_spacing"]
        rows.append(("slice_spacing", str(s["samples"]), "MAE / RMSE (mm)",
                     f"{_mm(s['mae_mm'])}{_ci(_interval(report, 'slice_spacing', 'mae_mm'), 1.0, 2)}"
                     f" / {_mm(s['rmse_mm'])}"))
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


TRAINING_CURVES = "training_curves.png"


def read_metrics(run_dir: str) -> list[dict]:
    """The lines of RUN/metrics.jsonl, or [] when the run has none (a converted checkpoint)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(records: list[dict], path: str, scored_step: int | None = None,
                         val_split: str = "val") -> bool:
    """Loss per head (training, at each logged step) and validation accuracy per head
    (coverage: exact match) against the step; the scored step as a dotted line. False when
    there is nothing to draw."""
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == val_split]
    if not train and not val:
        return False
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    heads = (*labels.CLASS_HEADS, *labels.MULTILABEL_HEADS, *labels.REGRESSION_HEADS)
    for head in heads:
        points = [(r["step"], r[f"{head}/loss"]) for r in train if f"{head}/loss" in r]
        if points:
            ax_loss.plot(*zip(*points), lw=1.2, label=head)
    total = [(r["step"], r.get("loss_interval_mean", r.get("loss"))) for r in train
             if "loss" in r]
    if total:
        ax_loss.plot(*zip(*total), color="black", lw=1.8, label="total (interval mean)")
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log",
                title="Training loss per head")
    ax_loss.legend(fontsize=7)
    for head in heads:
        key = f"{head}/exact_match" if head in labels.MULTILABEL_HEADS else f"{head}/accuracy"
        points = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points), marker="o", ms=3, lw=1.2,
                        label=head + (" (exact match)" if head in labels.MULTILABEL_HEADS else ""))
    ax_acc.set(xlabel="step", ylabel=f"{val_split} accuracy", ylim=(0, 1.02),
               title=f"Validation ({val_split} split) accuracy per head")
    for ax in (ax_loss, ax_acc):
        if scored_step is not None:
            ax.axvline(scored_step, color="0.4", ls=":", lw=1)
    if scored_step is not None:
        ax_acc.text(0.01, 0.02, f"dotted line: the scored step, {scored_step}", fontsize=7,
                    color="0.3", transform=ax_acc.transAxes)
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
                 meta: Mapping[str, Any] | None = None, groups: np.ndarray | None = None,
                 bootstrap_samples: int = 1000, bootstrap_seed: int = 0,
                 training_run: str | None = None) -> dict[str, Any]:
    """Builds the report from gathered arrays and writes every output file to ``out_dir``.

    Args:
      outputs: model outputs without padding rows: ``sequence`` [N,5], ``view`` [N,3],
        ``contrast`` [N,2], ``coverage`` [N,9] logits, ``slice_spacing`` [N] mm.
      targets: labels of the same rows: ``sequence``/``view``/``contrast`` [N] (-1
        unknown), ``coverage`` [N,9] (-1 unknown), ``effective_spacing_mm`` [N] (NaN
        unknown), optionally ``index`` [N] (dataset rows).
      groups: [N] patient of each row, for the bootstrap intervals (None: series-level).
      training_run: a training workdir whose metrics.jsonl becomes training_curves.png.
    Returns the report dict (as written to report.json).
    """
    os.makedirs(out_dir, exist_ok=True)
    report = build_report(outputs, targets, coverage_threshold, meta, groups,
                          bootstrap_samples, bootstrap_seed)
    plots = []
    if training_run and plot_training_curves(read_metrics(training_run),
                                             os.path.join(out_dir, TRAINING_CURVES),
                                             report["meta"].get("step")):
        plots.append(TRAINING_CURVES)
    report["meta"]["plots"] = plots + write_plots(outputs, targets, report["heads"], out_dir)
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
            progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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
    from radnet.data import source as source_lib
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
    total = pipeline.num_eval_batches(len(source_lib.split_rows(dataset, split)[0]),
                                      local_batch, jax.process_count())
    batches = tqdm(batches, desc=f"evaluate {split}", unit="batch", total=total,
                   disable=not progress or jax.process_index() != 0)
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


def scored_step_reason(run_dir: str, run_config, step: int, asked: bool) -> str:
    """Why this step is scored, in words for the report and the console."""
    from radnet.train import checkpoint as checkpoint_lib

    latest = checkpoint_lib.latest_step(run_dir)
    if asked:
        return f"as asked by config.step (the run's latest is {latest})"
    metric = run_config.checkpoint.best_metric
    value = None
    for record in read_metrics(run_dir):
        if record.get("step") == step and f"{record.get('split')}/" in metric:
            value = record.get(metric.split("/", 1)[1])
    if value is None and step == latest:
        return f"the latest; no step of the run has {metric} to choose by"
    shown = f" {value:.4g}" if isinstance(value, (int, float)) else ""
    return (f"the best by {metric}{shown} ({run_config.checkpoint.best_mode}) among the kept "
            f"checkpoints; the latest is {latest}")


def patient_groups(dataset: str, rows: np.ndarray) -> np.ndarray | None:
    """The patient key of each dataset row in ``rows``, from the dataset's manifest.csv;
    None when there is none to go by (then the bootstrap resamples series)."""
    import csv
    import io

    from radnet.data import schema

    text = schema.read_sidecar(dataset, "manifest.csv")
    if text is None:
        return None
    keys = {int(r["index"]): r.get("patient_key", "")
            for r in csv.DictReader(io.StringIO(text.decode()))}
    groups = [keys.get(int(i), "") for i in rows]
    if not all(groups):
        logging.warning("%s/manifest.csv lacks the patient of some rows; the confidence "
                        "intervals resample series instead", dataset)
        return None
    return np.asarray(groups)


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
    run_config = checkpoint_lib.load_config(checkpoint)
    trained_shape = tuple(checkpoint_lib.load_config(checkpoint).input.volume_shape)
    dataset_shape = tuple(int(s) for s in schema.read_attributes(config.dataset)["volume_shape"])
    if trained_shape != dataset_shape:
        raise ValueError(f"{checkpoint} was trained on volumes of {trained_shape} but "
                         f"{config.dataset} holds {dataset_shape}; evaluate on a dataset built "
                         "with the same volume shape")
    model_config, variables, step = checkpoint_lib.load_variables(checkpoint, step,
                                                                  prefer="best")
    step_reason = scored_step_reason(checkpoint, run_config, step, config.step >= 0)
    logging.debug("evaluating %s step %d (%s), model %s, on %s split %s", checkpoint, step,
                 step_reason, model_config.model_name, config.dataset, config.split)
    outputs, targets = predict(model_config, variables, config.dataset, config.split,
                               config.batch_size)
    if jax.process_index() != 0:
        return 0
    out_dir = config.out or workdir
    meta = {
        "checkpoint": os.path.abspath(checkpoint),
        "step": step,
        "step_reason": step_reason,
        "dataset": os.path.abspath(config.dataset) if "://" not in config.dataset
        else config.dataset,
        "split": config.split,
        "model_name": model_config.model_name,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    groups = patient_groups(config.dataset, targets["index"])
    report = write_report(outputs, targets, out_dir, config.coverage_threshold, meta, groups,
                          int(config.get("bootstrap_samples", 1000)),
                          int(config.get("bootstrap_seed", 0)), training_run=checkpoint)
    ci = report["meta"].get("ci", {})
    print(f"\n3D-RADNet evaluation, split {config.split}: {report['samples']} series of "
          f"{ci.get('groups', '?')} {ci.get('unit', 'patient')}s; step {step} ({step_reason})\n")
    print(console_table(report))
    print(f"\nreport: {os.path.join(out_dir, REPORT_MD)} (+ report.json, "
          f"{len(report['meta']['plots'])} plots)")
    return 0
