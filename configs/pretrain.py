"""3D-RADNet pretraining: the paper's setting by default.

    python -m radnet.main --config=configs/pretrain.py --workdir=runs/x
    python -m radnet.main --config=configs/pretrain.py:depth=18,norm=group --workdir=...
    python -m radnet.main --config=configs/pretrain.py:tiny --workdir=...   # CPU-sized

Any field can also be overridden on the command line: --config.train.batch_size=4.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, depth=50, variant="radnet", norm="batch", tiny=False,
                           dataset="runs/demo/dataset")
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.seed = 0
    config.dataset = arg.dataset

    config.model_name = "radnet"
    config.model = ml_collections.ConfigDict(dict(
        depth=arg.depth, variant=arg.variant, norm=arg.norm, width=64, hidden=1000,
        dtype="float32"))

    config.train = ml_collections.ConfigDict(dict(batch_size=8, num_steps=100_000, lr=1e-4))

    if arg.tiny:
        config.model.depth = 10
        config.model.width = 8
        config.model.hidden = 32
        config.train.batch_size = 2
        config.train.num_steps = 4
    return config
