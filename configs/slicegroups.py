"""Slice-group selection for lung nodules (LIDC-IDRI) by transfer of the pretrained encoder.

    python -m data_prep.lidc --lidc_root=LIDC --out=runs/lidc            # build (config.build)
    python -m radnet.main --config=configs/slicegroups.py:sector_num=5,in_plane=128,\
freeze=none,dataset=runs/lidc,pretrained=runs/pretrain --workdir=runs/sg/s5_128
    bash launch/lidc_study.sh DATASET PRETRAINED ROOT       # the sector × resolution table

Arguments: ``sector_num`` (1 / 5 / 13 in the report), ``in_plane`` (128 or 64: a divisor of
the stored size), ``freeze`` (all | block3 | block2 | block1 | none | scratch, as the liver
transfer), ``head`` (``embedding``: one head with a learned sector embedding; ``per_sector``:
one head per sector, the report's independent models), ``labels`` (``report``: median ≥ 3
malignant, < 3 benign; ``strict``: ≤ 2 benign, ≥ 4 malignant, 3 left out), ``balance``
(oversample | undersample | none), ``tiny`` (CPU tests), ``demo`` (the phantom study).
"""

import ml_collections

from configs import common

LABEL_SCHEMES = {
    "report": dict(benign_max=2.5, malignant_min=3.0),
    "strict": dict(benign_max=2.0, malignant_min=4.0),
}


def get_config(arg=None):
    arg = common.parse_arg(arg, sector_num=5, in_plane=128, freeze="none", head="embedding",
                           labels="report", balance="oversample", tiny=False, demo=False,
                           dataset="runs/lidc", pretrained="runs/pretrain", seed=0, steps=-1)
    config = common.trainer_defaults()
    config.task = "slicegroups"
    config.seed = arg.seed
    config.dataset = arg.dataset
    config.freeze = arg.freeze
    config.pretrained = ml_collections.ConfigDict(dict(
        workdir=arg.pretrained, step=-1, model_fields=True))

    # data_prep.lidc: how the dataset is built (a rebuild is needed only for these).
    config.build = ml_collections.ConfigDict(dict(
        slice_spacing_mm=1.0, in_plane=128, hu_min=-1000.0, hu_max=400.0,
        # Two readers' marks are one nodule when their centroids are within
        # max(min_tolerance_mm, tolerance_factor × the larger diameter).
        min_tolerance_mm=5.0, tolerance_factor=0.5,
        split_fractions=(0.6, 0.2, 0.2), split_seed=0))

    config.groups = ml_collections.ConfigDict(dict(
        group_slices=16,              # slab thickness in stored (1 mm) slices
        sector_num=arg.sector_num,
        in_plane=arg.in_plane,
        balance=arg.balance,
        flip_prob=0.5))               # training: each of left-right and z flipped at random
    if arg.labels not in LABEL_SCHEMES:
        raise ValueError(f"labels={arg.labels!r}; choose one of {sorted(LABEL_SCHEMES)}")
    config.labels = ml_collections.ConfigDict(dict(
        scheme=arg.labels, min_readers=1, min_diameter_mm=0.0, min_overlap_slices=3, **LABEL_SCHEMES[arg.labels]))

    config.model_name = "slicegroups"
    config.model = ml_collections.ConfigDict(dict(
        depth=50, variant="radnet", norm="batch", width=64, dtype="float32",
        head=arg.head, sector_num=arg.sector_num, sector_dim=16, hidden=128,
        pool="meanmax"))             # slab embedding: mean | meanmax of the block4 map

    config.report = ml_collections.ConfigDict(dict(top_k=3, strip_groups=6))
    # Balanced sampling trains the head on equal class shares; at evaluation the
    # probabilities are moved back to the class shares of the training groups
    # (p · prior_true / prior_sampled, renormalised), so accuracy is that of the real mix.
    config.eval.prior_correction = True
    # … and per-class offsets of the log-probabilities fitted on the validation groups
    # (results.json "test_calibrated"; the test groups never choose them).
    config.eval.calibrate = True
    config.optimizer.update(lr=1e-4, grad_clip_norm=1.0)
    config.schedule.update(name="constant", warmup_steps=0)
    config.train.update(batch_size=8, num_steps=3000, log_every_steps=20)
    config.eval.update(every_steps=200, batch_size=8)
    config.checkpoint.update(every_steps=200, keep_latest=1, keep_best=1,
                             best_metric="val/accuracy", best_mode="max")

    if arg.tiny:
        config.model.update(depth=10, width=4, hidden=16, sector_dim=4)
        config.groups.group_slices = 16
        config.train.update(batch_size=4, num_steps=4, log_every_steps=1)
        config.optimizer.lr = 1e-3
        config.eval.update(every_steps=2, batch_size=4)
        config.checkpoint.every_steps = 2
    if arg.demo:
        # Phantom chest CTs on 2 shared CPU cores (encoder of the demo pretraining, depth 10,
        # width 8): validation at the end only, so every step trains. 600 steps (~4 min):
        # at 120 the model still predicted non-nodule everywhere (docs/lidc.md §7).
        config.train.update(batch_size=8, num_steps=600, log_every_steps=50)
        config.optimizer.lr = 1e-3
        # A short warm-up and a cosine decay: at a constant 1e-3 the last step's weights
        # were one noisy iterate (train loss 0.7–2.4 batch to batch at step 100–120).
        config.schedule.update(name="warmup_cosine", warmup_steps=10, end_lr_fraction=0.01)
        config.eval.update(every_steps=0, batch_size=16)
        config.checkpoint.every_steps = 50
    if arg.steps > 0:
        config.train.num_steps = arg.steps
    return config
