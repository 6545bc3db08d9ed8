"""Transfer of the pretrained 3D-RADNet encoder: partial restore and freezing.

**Restore.** ``restore_encoder`` reads only the encoder of a pretraining checkpoint
(``WORKDIR/checkpoints``, item ``state`` = {step, params, batch_stats, opt_state}) with
Orbax's partial restore, into the ``encoder`` subtree of a freshly initialised model
(the decoder keeps its fresh initialisation). Before reading any array it compares the
names and shapes on both sides and raises ``TransferError`` listing *every* missing,
unexpected and mis-shaped parameter (big_vision's "loud merge" rule): a silently
half-restored encoder would make Table 2 meaningless.

**Freezing** (the paper's Table 2 rows)::

    all      stem … block4 frozen            ("Froze all layers")
    block3   stem … block3 frozen            ("Froze to block 3")
    block2   stem … block2 frozen            ("Froze to block 2")
    block1   stem, block1 frozen             ("Froze to block 1")
    none     encoder restored, all trained   ("Weights only")
    scratch  nothing restored, all trained   ("No transfer learning")

Frozen parameters get ``optax.set_to_zero`` through ``optax.multi_transform`` (and no
optimizer state), and the train step copies them — and the batch statistics of frozen
stages — back from the previous state, so they stay bit-identical whatever the update.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import optax

ENCODER = "encoder"
STAGES = ("stem", "block1", "block2", "block3", "block4")
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


class TransferError(ValueError):
    """The checkpoint's encoder and the model's encoder do not match; lists every name."""


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


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    """Nested dict → ``{("params", "encoder", "stem", "conv", "kernel"): leaf}``."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path): leaf for path, leaf in flat}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _name(path: Iterable[str]) -> str:
    return "/".join(path)


def label_tree(params: Any, freeze: str) -> Any:
    """Same structure as ``params`` (or batch_stats): FROZEN / TRAINABLE per leaf."""
    stages = frozen_stages(freeze)

    def label(path, _):
        names = tuple(_key_name(k) for k in path)
        frozen = len(names) >= 2 and names[0] == ENCODER and names[1] in stages
        return FROZEN if frozen else TRAINABLE

    return jax.tree_util.tree_map_with_path(label, params)


def check_encoder_layout(params: Any, freeze: str) -> None:
    """Every frozen stage must exist in the model (a renamed stage would freeze nothing)."""
    if ENCODER not in params:
        raise TransferError(f"the model has no {ENCODER!r} subtree; top level: {sorted(params)}")
    missing = [s for s in frozen_stages(freeze) if s not in params[ENCODER]]
    if missing:
        raise TransferError(f"freeze={freeze!r} names encoder stages {missing} that the model "
                            f"lacks; its stages are {sorted(params[ENCODER])}")


def make_optimizer(tx: optax.GradientTransformation, params: Any,
                   freeze: str) -> optax.GradientTransformation:
    """``tx`` on trainable parameters, zero updates (and no state) on frozen ones."""
    check_encoder_layout(params, freeze)
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                                 label_tree(params, freeze))


def keep_frozen(new: Any, old: Any, labels: Any) -> Any:
    """Frozen leaves from ``old``, the rest from ``new`` (static choice, bit-exact)."""
    return jax.tree.map(lambda lab, n, o: o if lab == FROZEN else n, labels, new, old)


# ----------------------------------------------------------------------------- restore

def _checkpoint_manager(workdir: str):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no pretraining checkpoints at {directory}")
    return ocp, ocp.CheckpointManager(
        directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True))


def encoder_metadata(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, ``{path: shape}``) of the encoder's params and batch_stats in a checkpoint."""
    _, manager = _checkpoint_manager(workdir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint step under {workdir}/checkpoints")
        meta = manager.item_metadata(step)["state"]
    finally:
        manager.close()
    tree = getattr(meta, "tree", meta)
    shapes = {}
    for path, leaf in flatten(tree).items():
        if len(path) >= 2 and path[0] in ("params", "batch_stats") and path[1] == ENCODER:
            shapes[path] = tuple(leaf.shape)
    return step, shapes


def compare(expected: Mapping[tuple, tuple], found: Mapping[tuple, tuple]) -> list[str]:
    """Problems of ``found`` (checkpoint) against ``expected`` (model), one line each."""
    problems = []
    for path in sorted(set(expected) - set(found)):
        problems.append(f"missing in checkpoint: {_name(path)} {expected[path]}")
    for path in sorted(set(found) - set(expected)):
        problems.append(f"unexpected in checkpoint: {_name(path)} {found[path]}")
    for path in sorted(set(expected) & set(found)):
        if tuple(expected[path]) != tuple(found[path]):
            problems.append(f"shape mismatch: {_name(path)} model {tuple(expected[path])} "
                            f"vs checkpoint {tuple(found[path])}")
    return problems


def restore_encoder(workdir: str, variables: Mapping[str, Any],
                    step: int | None = None) -> tuple[dict, int]:
    """Fresh ``{"params", "batch_stats"}`` with the encoder replaced by the checkpoint's.

    Raises ``TransferError`` naming every missing, unexpected or mis-shaped parameter.
    Returns the new variables (host NumPy arrays where restored) and the step read.
    """
    targets = {}
    for collection in ("params", "batch_stats"):
        sub = variables.get(collection, {})
        if ENCODER in sub:
            for path, leaf in flatten(sub[ENCODER]).items():
                targets[(collection, ENCODER, *path)] = leaf
    if not any(p[0] == "params" for p in targets):
        raise TransferError(f"the model has no params/{ENCODER} subtree to restore into")
    step, found = encoder_metadata(workdir, step)
    problems = compare({p: tuple(np.shape(v)) for p, v in targets.items()}, found)
    if problems:
        raise TransferError(
            f"the encoder of {workdir} (step {step}) does not fit the model: "
            f"{len(problems)} problem(s)\n  " + "\n  ".join(problems))

    ocp, manager = _checkpoint_manager(workdir)
    abstract = _unflatten({p: jax.ShapeDtypeStruct(np.shape(v), v.dtype)
                           for p, v in targets.items()})
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, partial_restore=True)))["state"]
    finally:
        manager.close()
    restored_flat = flatten(restored)
    missing_after = set(targets) - set(restored_flat)
    if missing_after:  # Orbax returned less than it was asked for: never go on silently.
        raise TransferError("restore returned no value for: " +
                            ", ".join(_name(p) for p in sorted(missing_after)))
    merged = {c: flatten(variables.get(c, {})) for c in ("params", "batch_stats")}
    for path, value in restored_flat.items():
        merged[path[0]][path[1:]] = np.asarray(value)
    return {c: _unflatten(v) for c, v in merged.items()}, step


def pretrained_model_config(workdir: str) -> dict:
    """The ``model`` section of the pretraining run's ``config.json`` ({} if absent)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(json.load(f).get("model", {}))


def load_classifier(workdir: str, step: int | None = None):
    """(model, ``{"params", "batch_stats"}``, step) of a pretraining run, for inference.

    The checkpoint is read by radnet.train.checkpoint.load_for_inference (params and
    batch statistics only); the model is the one its config.json describes.
    """
    from radnet.train import checkpoint as ckpt_lib  # noqa: PLC0415
    from radnet.train import state as state_lib  # noqa: PLC0415

    if step is None:
        _, manager = _checkpoint_manager(workdir)
        try:
            step = manager.latest_step()
        finally:
            manager.close()
        if step is None:
            raise FileNotFoundError(f"no checkpoint step under {workdir}/checkpoints")
    config, variables = ckpt_lib.load_for_inference(workdir, step)
    return state_lib.build_model(config), variables, step
