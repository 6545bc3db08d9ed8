"""Liver segmentation by transfer of the pretrained encoder (paper, 2.3; Tables 2 and 3).

    python -m radnet.main --config=configs/liver.py:freeze=all,fraction=1.0,\
dataset=runs/lits,pretrained=runs/pretrain --workdir=runs/liver/all
    bash launch/liver_tables.sh table2|table3 ...      # the whole grid + the tables

``freeze``: all | block3 | block2 | block1 | none | scratch (radnet/train/transfer.py).
``fraction``: share of the training cases used (seeded, nested subsets; val fixed).
``tiny``: CPU-sized for tests; ``demo``: the `make demo` setting on phantom cases.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, freeze="all", fraction=1.0, tiny=False, demo=False,
                           dataset="runs/lits", pretrained="runs/pretrain", proposals="",
                           seed=0, steps=-1)
    config = ml_collections.ConfigDict()
    config.task = "segment"
    config.seed = arg.seed
    config.dataset = arg.dataset                    # data_prep.lits output
    config.pretrained_workdir = arg.pretrained      # pretraining run (radnet.main task=pretrain)
    config.pretrained_step = -1                     # -1: latest checkpoint
    config.freeze = arg.freeze
    config.fraction = arg.fraction
    config.subset_seed = arg.seed                   # which training cases a fraction keeps

    config.model_name = "vnet"
    # Encoder fields are replaced by the pretraining run's (config.json) unless
    # model_from_pretrained is off, so the checkpoint's encoder always fits.
    config.model = ml_collections.ConfigDict(dict(
        depth=50, variant="radnet", norm="batch", width=64, num_classes=2,
        decoder_width=16, dtype="float32"))
    config.model_from_pretrained = True

    # Region proposal with the pretrained classifier (paper: 48 slices, stride 8, 0.9).
    config.proposal = ml_collections.ConfigDict(dict(
        window_slices=48, stride=8, threshold=0.9, batch_size=4,
        path=arg.proposals))                        # reuse a proposals.csv; '' = compute

    config.train = ml_collections.ConfigDict(dict(
        batch_size=4, num_steps=3000, lr=1e-4, dice_smooth=1.0,
        eval_every=100, log_every=20))
    config.eval = ml_collections.ConfigDict(dict(batch_size=4, threshold=0.5))
    config.quiet_orbax = True                       # hide Orbax's INFO lines in the log

    if arg.tiny:
        config.model.update(depth=10, width=4, decoder_width=4)
        config.proposal.update(window_slices=16, stride=8, batch_size=2)
        config.train.update(batch_size=2, num_steps=4, eval_every=2, log_every=1, lr=1e-3)
        config.eval.batch_size = 2
    if arg.demo:
        # Phantom cases on 2 CPU cores (encoder from the demo pretraining, 48×64×64).
        config.model.decoder_width = 4
        config.train.update(batch_size=2, num_steps=30, eval_every=15, log_every=5, lr=3e-3)
        config.eval.batch_size = 2
    if arg.steps > 0:
        config.train.num_steps = arg.steps
    return config
