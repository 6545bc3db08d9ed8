"""Segmentation of any NIfTI dataset (MSD task, nnU-Net raw, LiTS) with the transferred encoder.

    python -m data_prep.nifti --dataset_dir=Task09_Spleen --out=runs/spleen
    python -m radnet.main --config=configs/segment.py:dataset=runs/spleen,pretrained=runs/pretrain,\
freeze=all --workdir=runs/spleen/all

Classes and their number come from the dataset (dataset.json's labels); windows of
``patch`` (DxHxW voxels, multiples of the encoder's stride 16x32x32) slide over depth,
height and width for training and for whole-volume inference (Gaussian-weighted overlap),
and the final metrics (Dice, IoU, HD95, normalised surface Dice per class) are computed on
each case's source grid. ``freeze``: all | block3 | block2 | block1 | none | scratch
(radnet/train/transfer.py); ``pretrained=''`` needs ``freeze=scratch``. ``loss``: dice |
dice_ce. configs/liver.py is the paper's liver setting (region proposal instead of
sliding windows). ``tiny``: CPU-sized for tests.
"""

import ml_collections

from configs import common


def _patch(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3:
        raise ValueError(f"patch={text!r}: give DxHxW, e.g. 48x128x128")
    return parts


def get_config(arg=None):
    arg = common.parse_arg(arg, dataset="runs/segment", pretrained="runs/pretrain",
                           freeze="all", fraction=1.0, patch="48x128x128", loss="dice",
                           tiny=False, seed=0, steps=-1)
    if arg.loss not in ("dice", "dice_ce"):
        raise ValueError(f"loss={arg.loss!r}: choose dice or dice_ce")
    config = common.trainer_defaults()
    config.task = "segment"
    config.seed = arg.seed
    config.dataset = arg.dataset                    # data_prep.nifti output
    config.freeze = arg.freeze
    config.fraction = arg.fraction
    config.subset_seed = arg.seed
    config.pretrained = ml_collections.ConfigDict(dict(
        workdir=arg.pretrained, step=-1, model_fields=True))

    config.model_name = "vnet"
    config.model = ml_collections.ConfigDict(dict(
        depth=50, variant="radnet", norm="batch", width=64,
        num_classes=0,                              # 0: the dataset's number of classes
        decoder_width=16, dtype="float32"))
    config.input.patch_shape = _patch(arg.patch)   # → input.volume_shape at the start
    config.input.train_overlap = 0.5               # training windows: a grid at this overlap
    config.proposal = ml_collections.ConfigDict(dict(
        enabled=False, window_slices=48, stride=8, threshold=0.9, batch_size=4, path=""))

    config.loss = ml_collections.ConfigDict(dict(
        dice_smooth=1.0, ce_weight=1.0 if arg.loss == "dice_ce" else 0.0))
    config.optimizer.update(lr=1e-4, grad_clip_norm=0.0)
    config.schedule.update(name="constant", warmup_steps=0)
    config.train.update(batch_size=2, num_steps=3000, log_every_steps=20)
    # Whole-volume inference: windows overlapping by `overlap`, Gaussian importance with
    # sigma = gaussian_sigma x window size (nnU-Net's 1/8); metrics on the source grid.
    config.eval.update(every_steps=100, batch_size=2, weighting="gaussian",
                       overlap=0.5, gaussian_sigma=0.125, source_grid=True, tolerance_mm=2.0,
                       overlays=3)
    config.checkpoint.update(every_steps=100, keep_latest=1, keep_best=1,
                             best_metric="val/dice", best_mode="max")

    if arg.tiny:
        config.model.update(depth=10, width=4, decoder_width=4)
        if arg.patch == "48x128x128":
            config.input.patch_shape = (16, 32, 32)
        config.train.update(batch_size=2, num_steps=4, log_every_steps=1)
        config.optimizer.lr = 1e-3
        config.eval.update(every_steps=2, batch_size=2, overlays=1)
        config.checkpoint.every_steps = 2
    if arg.steps > 0:
        config.train.num_steps = arg.steps
    return config
