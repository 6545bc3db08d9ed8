"""Universal lesion detection on a lesion dataset (task ``detect``; docs/lesions.md).

    python -m radnet.main --config=configs/detect.py:dataset=DS,pretrained=RUN --workdir=W
    python -m radnet.main --config=configs/detect.py:dataset=DS,freeze=scratch --workdir=W

``dataset``: a lesion dataset (python -m data_prep.deeplesion or data_prep.lesions
--dataset_out). ``freeze``: none (pretrained encoder, all trained; default) | scratch (same
network, fresh weights) | all | block1 … block3 (radnet/train/transfer.py). ``pretrained``:
the pretraining run whose encoder (and encoder fields) are used. ``tiny``: CPU test size;
``demo``: the phantom-lesion setting of docs/lesions.md.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, freeze="none", tiny=False, demo=False, dataset="runs/lesions",
                           pretrained="runs/pretrain", seed=0, steps=-1)
    config = common.trainer_defaults()
    config.task = "detect"
    config.seed = arg.seed
    config.dataset = arg.dataset
    config.freeze = arg.freeze
    config.pretrained = ml_collections.ConfigDict(dict(
        workdir=arg.pretrained, step=-1,
        # The encoder fields (depth, width, norm, dtype) are taken from the pretraining
        # run's config.json, for freeze=scratch too when the run exists, so "scratch" is
        # the same network; off = the fields below as they are.
        model_fields=True))

    config.model_name = "detector"
    config.model = ml_collections.ConfigDict(dict(
        depth=50, variant="radnet", norm="batch", width=64, dtype="float32",
        neck_width=64, head_width=64))
    # input.volume_shape: (2k+1, size, size) of the dataset, set at the start.
    config.data = ml_collections.ConfigDict(dict(
        max_boxes=16,           # boxes per slab kept for training
        flip_prob=0.5,          # left-right and up-down, each
        mm_per_pixel=0.0))      # >0: the dataset must be at this in-plane spacing
    config.loss = ml_collections.ConfigDict(dict(
        size_weight=0.1, offset_weight=1.0,   # CenterNet's weights
        sigma_fraction=0.15, min_sigma=0.6))  # heatmap Gaussian, in cells
    config.optimizer.update(name="adamw", lr=1e-3, weight_decay=1e-4, grad_clip_norm=5.0)
    config.schedule.update(name="warmup_cosine", warmup_steps=200)
    config.train.update(batch_size=16, num_steps=20000, log_every_steps=50)
    config.eval.update(every_steps=1000, batch_size=16,
                       fps_per_image=(0.5, 1.0, 2.0, 4.0, 8.0, 16.0), iou_threshold=0.5,
                       criterion="iou",     # or "iobb"
                       top_k=50, nms_iou=0.3, max_detections=20, min_score=0.01)
    config.checkpoint.update(every_steps=1000, keep_latest=1, keep_best=1,
                             best_metric="val/froc_mean", best_mode="max")

    if arg.tiny:
        config.model.update(depth=10, width=4, neck_width=8, head_width=8)
        config.train.update(batch_size=2, num_steps=4, log_every_steps=1)
        config.schedule.warmup_steps = 0
        config.eval.update(every_steps=2, batch_size=2)
        config.checkpoint.every_steps = 2
    if arg.demo:
        # Phantom lesions on 2 CPU cores: 128×128 slabs at 2.5 mm, the demo encoder.
        config.model.update(neck_width=32, head_width=32)
        config.train.update(batch_size=8, num_steps=1000, log_every_steps=50)
        config.schedule.warmup_steps = 50
        config.optimizer.lr = 2e-3
        config.eval.update(every_steps=250, batch_size=8)
        config.checkpoint.every_steps = 250
    if arg.steps > 0:
        config.train.num_steps = arg.steps
    return config
