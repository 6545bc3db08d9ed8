"""Benchmark of the predict task (radnet.archive) on this CPU; prints JSON lines.

    python bench/predict.py --checkpoint=runs/demo/pretrain --dicom_root=runs/demo/pacs/dicom
    python bench/predict.py --checkpoint=RUN                  # a phantom archive it writes
    python bench/predict.py --checkpoint=RUN --workers=0,2    # in-process, then 2 workers

For each ``--workers`` value, one full run into a fresh folder (nothing resumed):
series/s over every series found and over those predicted, and the time split between
header reading (wall), grouping (wall), pixel preprocessing (the summed seconds of the
volume builds, wherever they ran; with workers they overlap the model), waiting for pixels
(the main process idle), model inference (wall, less that waiting) and the QC calibration
(the model on the run's validation split, once per OUT). With ``workers=0``
the parts run one after another, so the split is exact.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from configs import predict as predict_config  # noqa: E402
from radnet import archive  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Pretraining workdir or .safetensors.")
_DICOM_ROOT = flags.DEFINE_string("dicom_root", None, "Archive (else a phantom PACS is written).")
_PATIENTS = flags.DEFINE_integer("patients", 6, "Phantom archive: patients.")
_SALT = flags.DEFINE_string("salt_file", None, "Salt file (default: a temporary one).")
_WORKERS = flags.DEFINE_string("workers", "0,2", "Worker counts to time, comma-separated.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Inference batch (global).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch folder (default: a temporary one).")


def _emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def main(argv):
    del argv
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required (e.g. runs/demo/pretrain after make demo)")
    scratch = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_predict_")
    os.makedirs(scratch, exist_ok=True)
    root = _DICOM_ROOT.value
    if not root:
        from data_prep.phantoms import pacs  # noqa: PLC0415  (an offline tool: bench only)
        pacs.generate(os.path.join(scratch, "pacs"), patients=_PATIENTS.value, seed=0,
                      lits_cases=0, workers=1)
        root = os.path.join(scratch, "pacs", "dicom")
    salt = _SALT.value
    if not salt:
        salt = os.path.join(scratch, "salt")
        with open(salt, "w") as f:
            f.write("bench-predict-salt-0123456789abcdef\n")
    for workers in [int(w) for w in _WORKERS.value.split(",") if w.strip()]:
        config = predict_config.get_config()
        config.checkpoint, config.dicom_root, config.salt_file = _CHECKPOINT.value, root, salt
        config.workers, config.batch_size = workers, _BATCH.value
        out = tempfile.mkdtemp(prefix=f"w{workers}_", dir=scratch)
        start = time.perf_counter()
        archive.run(config, out)
        wall = time.perf_counter() - start
        with open(os.path.join(out, archive.SUMMARY_JSON)) as f:
            summary = json.load(f)
        s = summary["seconds"]
        predicted = summary["status"].get(archive.PREDICTED, 0)
        _emit({"bench": "predict", "workers": workers, "files": summary["files"],
               "series": summary["series"], "predicted": predicted,
               "wall_s": round(wall, 2),
               "series_per_s": round(summary["series"] / s["total"], 3),
               "predicted_per_s": round(predicted / s["total"], 3),
               "seconds": s,
               "share": {k: round(s.get(k, 0.0) / s["total"], 3) for k in
                         ("load_model", "headers", "grouping", "pixels_worker_sum",
                          "waiting_for_pixels", "inference", "qc_calibration")},
               "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    app.run(main)
