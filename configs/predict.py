"""Look at an unlabelled DICOM archive with a pretrained model (radnet.archive).

    python -m radnet.main --config=configs/predict.py --config.checkpoint=RUN \\
        --config.dicom_root=DIR --workdir=OUT [--config.neighbours=5]
    python -m radnet.main --config=configs/predict.py:neighbours=5,workers=4 ...
    python -m radnet.main --config=configs/predict.py:tiny ...          # CPU tests

The model and its preprocessing come from the checkpoint; the series grouping and the
header label rules from configs/index.py (pass the same overrides as your index run, e.g.
--config.index.max_oblique_deg=15, and the same --config.salt_file, so that series keys
and header labels are the index's). Columns and the QC rule: docs/predict.md.
"""

import ml_collections

from configs import common
from configs import index as index_config


def get_config(arg=None):
    arg = common.parse_arg(arg, checkpoint="", dicom_root="", neighbours=0, workers=2,
                           tiny=False)
    config = ml_collections.ConfigDict()
    config.task = "predict"
    config.checkpoint = arg.checkpoint   # a pretraining workdir or an exported .safetensors
    config.step = -1                     # checkpoint step; -1 → the run's best
    config.dicom_root = arg.dicom_root
    config.salt_file = "~/.config/radnet/salt"  # the index's salt: the same keys
    config.collections = ""              # optional collections.csv, as given to the index
    config.index = index_config.get_config()   # grouping and header-label rules
    # Index exclusion reasons that do not stop a prediction (comma-separated): the image
    # needs no description. Other excluded series get a row with their reason.
    config.also_predict = "missing_description"

    # --- work ---
    config.workers = arg.workers         # processes reading headers and pixels; 0: this one
    config.header_chunk = 64             # files per header task
    config.chunk_series = 64             # series per resumable part (OUT/_work/part-*.npz)
    config.batch_size = 8                # GLOBAL inference batch over all devices
    config.progress = True               # a progress bar over the series (stderr)

    # --- outputs ---
    config.coverage_threshold = 0.5      # a region is predicted present at p ≥ this
    # QC (docs/predict.md, "The QC rule"): a head is flagged when the image disbelieves
    # the header's label: 1 − p(header label) above the head's threshold (coverage: the
    # worst region; spacing: relative difference, and more than qc_spacing_abs_mm).
    # Thresholds are CALIBRATED on series with trusted labels: qc_calibration_split of
    # qc_calibration_dataset ("auto": the dataset the checkpoint was trained on; its held-out
    # splits, which the model never trained on), chosen so that at most qc_target_flag_rate
    # of them are flagged (OUT/qc_calibration.json). val and test together: the demo's val
    # split alone (58 series) gave thresholds that flagged 4.5-13 % of an independent
    # archive's correct series, val+test (215) 2.0-2.4 % (docs/predict.md). A
    # qc_calibration.json of an earlier run may be given instead; with nothing to calibrate
    # on, the fixed rule below (qc_threshold) applies.
    config.qc_calibration_dataset = "auto"
    config.qc_calibration_split = "val,test"  # comma-separated splits
    config.qc_target_flag_rate = 0.02    # of the trusted series, flagged on any head
    config.qc_by_modality = True         # thresholds per head and modality (CT / MR)
    config.qc_min_disbelief = 0.5        # calibrated thresholds never lower: p(header) ≤ 0.5
    config.qc_calibration = ""           # an earlier OUT/qc_calibration.json to reuse
    config.qc_threshold = 0.95           # uncalibrated: flagged when p(header) < 1 − this
    config.qc_spacing_abs_mm = 2.0
    config.qc_spacing_rel = 0.5          # uncalibrated spacing threshold; calibration's floor
    config.qc_top = 20                   # disagreements listed per head in qc.md
    # suggested_overrides.csv: a missing header label is suggested at probability ≥ this.
    config.suggest_threshold = 0.95
    config.neighbours = arg.neighbours   # k nearest series by cosine (neighbours.csv); 0: off
    if arg.tiny:
        config.workers = 0
        config.batch_size = 2
        config.chunk_series = 4
        config.progress = False
    return config
