"""Liver segmentation by transfer of the pretrained encoder (paper, 2.3; Tables 2 and 3).

    python -m radnet.main --config=configs/liver.py:freeze=all,fraction=1.0,\
dataset=runs/lits,pretrained=runs/pretrain --workdir=runs/liver/all
    bash launch/liver_tables.sh table2|table3 ...      # the whole grid + the tables

``freeze``: all | block3 | block2 | block1 | none | scratch (radnet/train/transfer.py).
Keys follow the trainer's vocabulary (configs/common.trainer_defaults): optimizer.*,
schedule.*, train.*, eval.*, checkpoint.*, mesh.
``fraction``: share of the training cases used (seeded, nested subsets; val fixed).
``tiny``: CPU-sized for tests; ``demo``: the `make demo` setting on phantom cases.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, freeze="all", fraction=1.0, tiny=False, demo=False,
                           dataset="runs/lits", pretrained="runs/pretrain", proposals="",
                           seed=0, steps=-1)
    config = common.trainer_defaults()
    config.task = "segment"
    config.seed = arg.seed
    config.dataset = arg.dataset                    # data_prep.lits output
    config.freeze = arg.freeze
    config.fraction = arg.fraction
    config.subset_seed = arg.seed                   # which training cases a fraction keeps
    config.pretrained = ml_collections.ConfigDict(dict(
        workdir=arg.pretrained,                     # pretraining run (radnet.main task=pretrain)
        step=-1,                                    # -1: its latest checkpoint
        # Encoder fields are taken from the pretraining run's config.json, so its encoder
        # always fits; off = the fields below as they are.
        model_fields=True))

    config.model_name = "vnet"
    # num_classes 0: from the dataset (data_prep.lits / data_prep.nifti --fold_foreground=liver
    # make background and liver, the paper's two).
    config.model = ml_collections.ConfigDict(dict(
        depth=50, variant="radnet", norm="batch", width=64, num_classes=0,
        decoder_width=16, dtype="float32"))
    # input.volume_shape: (proposal.window_slices, in_plane, in_plane), set at the start.
    config.input.patch_shape = ()                   # sliding windows only (configs/segment.py)
    config.input.train_overlap = 0.5

    # Region proposal with the pretrained classifier (paper: 48 slices, stride 8, 0.9).
    config.proposal = ml_collections.ConfigDict(dict(
        enabled=True, window_slices=48, stride=8, threshold=0.9, batch_size=4,
        path=arg.proposals))                        # reuse a proposals.csv; '' = compute

    # Dice on the liver channel (the paper); ce_weight > 0 adds cross-entropy.
    config.loss = ml_collections.ConfigDict(dict(dice_smooth=1.0, ce_weight=0.0))
    # Adam at a constant rate, no clipping (the paper's liver setting).
    config.optimizer.update(lr=1e-4, grad_clip_norm=0.0)
    config.schedule.update(name="constant", warmup_steps=0)
    config.train.update(batch_size=4, num_steps=3000, log_every_steps=20)
    # Overlapping proposal windows are averaged (uniform), the class is the argmax (for
    # two classes: liver probability > 0.5); metrics on each case's source
    # grid, normalised surface Dice at tolerance_mm; overlay PNGs of the first test cases.
    config.eval.update(every_steps=100, batch_size=4, weighting="uniform",
                       overlap=0.5, gaussian_sigma=0.125, source_grid=True, tolerance_mm=2.0,
                       overlays=3)
    # The latest (to resume) and the best validation Dice are kept.
    config.checkpoint.update(every_steps=100, keep_latest=1, keep_best=1,
                             best_metric="val/dice", best_mode="max")

    if arg.tiny:
        config.model.update(depth=10, width=4, decoder_width=4)
        config.proposal.update(window_slices=16, stride=8, batch_size=2)
        config.train.update(batch_size=2, num_steps=4, log_every_steps=1)
        config.optimizer.lr = 1e-3
        config.eval.update(every_steps=2, batch_size=2)
        config.checkpoint.every_steps = 2
    if arg.demo:
        # Phantom cases on 2 CPU cores (encoder from the demo pretraining, 48×64×64).
        config.model.decoder_width = 4
        config.train.update(batch_size=2, num_steps=30, log_every_steps=15)  # 2 lines a run
        config.optimizer.lr = 3e-3
        config.eval.update(every_steps=15, batch_size=2)
        config.checkpoint.every_steps = 15
    if arg.steps > 0:
        config.train.num_steps = arg.steps
    return config
