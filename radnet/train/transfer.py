"""Transfer of the pretrained 3D-RADNet encoder: partial restore and freezing.

**Restore.** ``radnet.train.checkpoint.restore_subtree`` reads only the encoder of a
pretraining checkpoint into the ``encoder`` subtree of a freshly initialised model (the
decoder keeps its fresh initialisation), naming every missing, unexpected and mis-shaped
parameter before it reads an array (big_vision's "loud merge" rule).

**Freezing** (the paper's Table 2 rows)::

    all      stem … block4 frozen            ("Froze all layers")
    block3   stem … block3 frozen            ("Froze to block 3")
    block2   stem … block2 frozen            ("Froze to block 2")
    block1   stem, block1 frozen             ("Froze to block 1")
    none     encoder restored, all trained   ("Weights only")
    scratch  nothing restored, all trained   ("No transfer learning")

Frozen parameters get ``optax.set_to_zero`` through ``optax.multi_transform`` (``freeze``,
also behind ``radnet.pretrained.freeze``; no optimizer state), and the segmentation step
copies them — and the batch statistics of frozen stages — back from the previous state, so
they stay bit-identical whatever the update.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from radnet.models import STAGES

ENCODER = "encoder"
FREEZE_ROWS = ("all", "block3", "block2", "block1", "none", "scratch")
# The paper's Table 2 row names.
FREEZE_LABELS = {
    "all": "Froze all layers",
    "block3": "Froze to block 3",
    "block2": "Froze to block 2",
    "block1": "Froze to block 1",
    "none": "Weights only",
    "scratch": "No transfer learning",
}
FROZEN, TRAINABLE = "frozen", "trainable"


def frozen_stages(freeze: str) -> tuple[str, ...]:
    """Encoder stages whose parameters and batch statistics stay fixed."""
    if freeze not in FREEZE_ROWS:
        raise ValueError(f"unknown freeze option {freeze!r}; choose from {FREEZE_ROWS}")
    if freeze == "all":
        return STAGES
    if freeze.startswith("block"):
        return STAGES[: STAGES.index(freeze) + 1]
    return ()


def restores_encoder(freeze: str) -> bool:
    frozen_stages(freeze)  # validates
    return freeze != "scratch"


def split_path(at: str) -> tuple[str, ...]:
    """``"backbone/encoder"`` → ``("backbone", "encoder")``: where the encoder sits in a model."""
    parts = tuple(p for p in str(at).split("/") if p)
    if not parts:
        raise ValueError(f"at={at!r}: give the encoder's path in the model, e.g. 'encoder' "
                         "or 'backbone/encoder'")
    return parts


def label_tree(tree: Any, stages: Sequence[str], at: str = ENCODER) -> Any:
    """Same structure as ``tree`` (params or batch_stats): FROZEN for the leaves under
    ``at/<stage>`` for a stage in ``stages`` (``at`` may be nested), TRAINABLE elsewhere."""
    stages, parts = tuple(stages), split_path(at)
    n = len(parts)

    def label(path, _):
        names = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
        frozen = len(names) > n and tuple(names[:n]) == parts and names[n] in stages
        return FROZEN if frozen else TRAINABLE

    return jax.tree_util.tree_map_with_path(label, tree)


def check_stages(params: Any, stages: Sequence[str], at: str = ENCODER) -> None:
    """Every stage to freeze must exist in the model (a renamed stage would freeze nothing)."""
    if not stages:
        return
    node, walked = params, []
    for key in split_path(at):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(walked) or "the top level"
            keys = sorted(node) if isinstance(node, Mapping) else []
            raise ValueError(f"cannot freeze {list(stages)}: the params have no {at} "
                             f"({where} holds {keys}); pass at= the encoder's path")
        node, walked = node[key], [*walked, key]
    missing = [s for s in stages if s not in node]
    if missing:
        raise ValueError(f"cannot freeze {missing}: {at!r} has the stages {sorted(node)}")


def freeze(tx: optax.GradientTransformation, stages: Sequence[str],
           at: str = ENCODER) -> optax.GradientTransformation:
    """``tx`` on every parameter except those of ``at/<stage>``, which get zero updates (and
    no optimizer state): after ``optax.apply_updates`` they are the same arrays, bit for bit.
    """
    stages = tuple(stages)
    split_path(at)  # a bad path fails here, not at the first update

    def labels(params):
        check_stages(params, stages, at)
        return label_tree(params, stages, at)

    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def keep_frozen(new: Any, old: Any, labels: Any) -> Any:
    """Frozen leaves from ``old``, the rest from ``new`` (static choice, bit-exact)."""
    return jax.tree.map(lambda lab, n, o: o if lab == FROZEN else n, labels, new, old)


def labels_and_optimizer(model, input_shape: Sequence[int], stages: Sequence[str],
                         tx: optax.GradientTransformation):
    """``(param_labels, stat_labels, optimizer)`` of a transfer task: the frozen/trainable
    label of every parameter and batch statistic of ``model`` (traced on ``input_shape``,
    nothing computed) and ``tx`` with ``stages`` of the encoder frozen."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape),
                                                 train=False))
    return (label_tree(abstract["params"], stages),
            label_tree(abstract.get("batch_stats", {}), stages),
            freeze(tx, stages))


ENCODER_FIELDS = ("depth", "variant", "norm", "width", "dilated", "dtype")


def adopt_pretrained(config: ml_collections.ConfigDict, accepted: Sequence[str] = ENCODER_FIELDS
                     ) -> None:
    """The derived fields every task that transfers the encoder sets (segment, detect,
    slicegroups), in place on ``config``: the frozen stages of ``config.freeze``; the
    encoder fields of the pretraining run's model (those in ``accepted``), so its encoder
    always fits and a scratch run trains the same network with fresh weights (when
    ``config.pretrained.model_fields`` and the run is there); the pretraining step. A freeze
    row that restores an encoder without a run is a ConfigError, before any data is read."""
    from radnet.train import checkpoint as ckpt_lib  # noqa: PLC0415 -- checkpoint is heavy
    from radnet.train import loop  # noqa: PLC0415 -- loop imports checkpoint

    config.model.frozen_stages = frozen_stages(config.freeze)
    pre = config.pretrained
    restores = restores_encoder(config.freeze)
    if restores and not pre.workdir:
        raise loop.ConfigError(f"freeze={config.freeze} restores a pretrained encoder but "
                               "config.pretrained.workdir is empty; give the pretraining run "
                               "(pretrained=RUN), or freeze=scratch to train from scratch")
    if pre.workdir and pre.get("model_fields", True) and (
            restores or os.path.exists(os.path.join(pre.workdir, "config.json"))):
        pre_model = ckpt_lib.load_config(pre.workdir).get("model", {})
        for key in ENCODER_FIELDS:
            if key in pre_model and key in accepted:
                config.model[key] = pre_model[key]
    if restores:
        pre.step = ckpt_lib.resolve_step(pre.workdir, None if pre.step < 0 else pre.step)


def with_pretrained_encoder(variables: dict, config: ml_collections.ConfigDict) -> dict:
    """``variables`` with the encoder of ``config.pretrained`` when ``config.freeze`` restores
    one (every task that transfers the encoder: segment, detect, slicegroups)."""
    if not restores_encoder(config.freeze):
        return variables
    from radnet.train import checkpoint as ckpt_lib  # noqa: PLC0415 -- checkpoint is heavy
    variables, step = ckpt_lib.restore_subtree(config.pretrained.workdir, variables,
                                               config.pretrained.step)
    logging.info("restored the encoder of %s step %d", config.pretrained.workdir, step)
    return variables
