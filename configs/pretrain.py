"""3D-RADNet pretraining: the paper's setting by default.

    python -m radnet.main --config=configs/pretrain.py --workdir=runs/x
    python -m radnet.main --config=configs/pretrain.py:depth=18,norm=group --workdir=...
    python -m radnet.main --config=configs/pretrain.py:tiny --workdir=...   # CPU-sized
    python -m radnet.main --config=configs/pretrain.py:demo,dataset=runs/demo/dataset ...

Any field can also be overridden on the command line: --config.train.batch_size=4.
Arguments: depth (10/18/34/50/...), variant, norm (batch/group), dataset (path or URL),
tiny (CPU tests), demo (the `make demo` model: 48×32×32 phantoms on 2 CPU cores).
"""

import ml_collections

from configs import common
from radnet.data import augment


def get_config(arg=None):
    arg = common.parse_arg(arg, depth=50, variant="radnet", norm="batch", tiny=False,
                           demo=False, dataset="runs/demo/dataset")
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.seed = 0
    config.dataset = arg.dataset

    # Paper: ResNet50 adapted to 3D, FC of 1000 neurons, five heads.
    config.model_name = "radnet"
    config.model = ml_collections.ConfigDict(dict(
        depth=arg.depth, variant=arg.variant, norm=arg.norm, width=64, hidden=1000,
        dtype="float32"))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=8,          # GLOBAL batch (all processes and devices together)
        num_steps=100_000,
        stop_at_step=0,        # >0: stop (after a checkpoint) at this step, e.g. to fit a
                               # job time limit; the next launch resumes. 0 = run to num_steps
        log_every_steps=50,
    ))

    # Paper: Adam. Learning rate, warm-up and clipping are not given there; these are ours.
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        grad_clip_norm=1.0))   # global-norm clipping; 0 = off
    config.schedule = ml_collections.ConfigDict(dict(
        name="warmup_cosine",  # or "constant"
        warmup_steps=1000, end_lr_fraction=0.01))

    # Weights of the five per-head losses (cross-entropies; spacing RMSE in mm).
    config.loss_weights = ml_collections.ConfigDict(dict(
        sequence=1.0, view=1.0, contrast=1.0, coverage=1.0, slice_spacing=0.1))

    # Devices: one 'data' axis over everything by default; e.g. [("data", -1), ("model", 2)].
    config.mesh = [("data", -1)]
    config.sharding = ml_collections.ConfigDict(dict(
        batch_axes=("data",),
        # (regex on "params/encoder/block1/...", spec per dimension); first match wins.
        rules=[],
        fsdp_axis="",          # e.g. "data": FSDP-shard every array ≥ fsdp_min_size elements
        fsdp_min_size=2 ** 18,
    ))

    config.input = ml_collections.ConfigDict(dict(
        volume_shape=(),       # () = read from the dataset; recorded in config.json
        worker_count=0,        # Grain worker processes (mp_prefetch); 0 = in-process
        prefetch_buffer=2,
        shuffle=True,
        # Label-safe augmentation on the device inside the jitted step (radnet.data.augment:
        # intensity scale/shift, gamma, noise, patient left-right flips).
        augment=augment.default_augment_config(),
    ))

    config.eval = ml_collections.ConfigDict(dict(
        every_steps=1000,      # validation over the whole split; 0 = only at the end
        split="val",
        batch_size=8,          # GLOBAL; the last batch is padded and masked
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000,
        keep_latest=2,
        keep_best=1,
        best_metric="val/loss",  # any key of the validation metrics, e.g. "val/sequence/accuracy"
        best_mode="min",
        async_save=True,
    ))

    if arg.tiny:
        config.model.depth = 10
        config.model.width = 8
        config.model.hidden = 32
        config.train.batch_size = 2
        config.train.num_steps = 4
        config.train.log_every_steps = 1
        config.schedule.warmup_steps = 1
        config.optimizer.lr = 1e-3
        config.eval.every_steps = 2
        config.eval.batch_size = 2
        config.checkpoint.every_steps = 2
        config.input.augment.enabled = False   # tests compare exact numbers
    if arg.demo:
        # `make demo`: 48×32×32 phantom volumes (120 patients, ~400 training series) on 2 CPU
        # cores. With the slice-folded stem a step takes ~0.15 s here (it was ~0.7 s with the
        # 3D stem conv, which XLA:CPU runs slowly for 1 input channel); contrast is the slowest
        # head to learn and needs ~1500 steps (docs/training.md).
        config.model.depth = 10
        config.model.width = 8
        config.model.hidden = 128
        config.train.batch_size = 8
        config.train.num_steps = 1500
        config.train.log_every_steps = 50
        config.optimizer.lr = 1e-3
        config.schedule.warmup_steps = 20
        config.eval.every_steps = 500
        config.eval.batch_size = 16
        config.checkpoint.every_steps = 500
    return config
