"""Evaluation of a pretrained 3D-RADNet: the paper's Table 1 with plots.

    python -m radnet.main --config=configs/evaluate.py --workdir=runs/x \
        --config.checkpoint=runs/x --config.dataset=runs/demo/dataset [--config.split=test]

The model (name and sizes) comes from the checkpoint's own config.json; this file holds
only what the evaluation itself needs. Outputs go to ``out``, or to ``--workdir``
when ``out`` is empty.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, checkpoint="", dataset="runs/demo/dataset", split="test",
                           out="", tiny=False)
    config = ml_collections.ConfigDict()
    config.task = "evaluate"
    config.checkpoint = arg.checkpoint  # a pretraining workdir; empty → --workdir
    config.step = -1                    # checkpoint step; -1 → the run's best (its
                                        # checkpoint.best_metric), the latest without one
    config.dataset = arg.dataset
    config.split = arg.split            # train / val / test
    config.out = arg.out                # output folder; empty → --workdir
    config.batch_size = 8               # GLOBAL, as in training; per process rounded up to a
                                        # multiple of its devices (padding is masked)
    # A coverage region is predicted present at sigmoid probability ≥ this (paper: 0.5).
    config.coverage_threshold = 0.5
    # 95% confidence intervals: percentile bootstrap over patients (manifest.csv patient_key).
    config.bootstrap_samples = 1000     # 0 = no intervals
    config.bootstrap_seed = 0
    if arg.tiny:
        config.batch_size = 2
    return config
