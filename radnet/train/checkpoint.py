"""Every read and write of a run's checkpoints: the one module that opens them.

Layout (docs/interfaces.md)::

    WORKDIR/config.json          the resolved config of the run
    WORKDIR/checkpoints/<step>/  state/      {step, params, batch_stats, opt_state}
                                 data_iter/  the Grain iterator state, one file per process
                                 metrics/    the validation metrics of that step (if evaluated)

Training (radnet.train.loop): ``make_manager`` keeps the latest ``keep_latest`` checkpoints
and the ``keep_best`` best by ``checkpoint.best_metric``; ``save`` / ``restore`` carry the
state and the input iterator's position, so a killed run resumes where it stopped.

Reading a finished run (evaluation, transfer, ``radnet.pretrained``): ``steps``,
``latest_step``, ``best_step``; ``load_variables`` restores parameters and batch statistics
only (the optimizer state stays on disk) onto this process's devices, whatever mesh the
run trained on; ``restore_subtree`` reads one named subtree (the encoder) into a model's
variables and stops with every missing, unexpected or mis-shaped parameter named.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
from typing import Any, Mapping

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
STATE_ITEM = "state"
DATA_ITEM = "data_iter"
VARIABLE_COLLECTIONS = ("params", "batch_stats")

_preservation = ocp.checkpoint_managers.preservation_policy


class MismatchError(ValueError):
    """Two parameter trees do not fit; the message lists every offending name."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


# ----------------------------------------------------------------------------- training

def make_manager(workdir: str, checkpoint_config, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager: latest k + best by ``checkpoint_config.best_metric``."""
    policies = [_preservation.LatestN(n=int(checkpoint_config.keep_latest))]
    if int(checkpoint_config.keep_best) > 0:
        metric = checkpoint_config.best_metric
        mode = _check_mode(checkpoint_config.best_mode)
        policies.append(_preservation.BestN(
            get_metric_fn=lambda metrics: float(metrics[metric]),
            # BestN keeps the tail of the sorted order: descending order for "min".
            reverse=(mode == "min"), n=int(checkpoint_config.keep_best),
            # steps saved between evaluations carry no metric; LatestN decides for them.
            keep_checkpoints_without_metrics=False))
    metric = checkpoint_config.best_metric
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_preservation.AnyPreservationPolicy(policies),
        # Orbax writes a step's metrics (its "metrics" item) only when best_fn is set; without
        # them a resumed manager saw every older step as metric-less and BestN deleted the
        # best one at the next save. best_fn only switches the writing on here: which steps
        # stay is the preservation policy's business.
        best_fn=lambda metrics: float(metrics.get(metric, math.nan)),
        best_mode=_check_mode(checkpoint_config.best_mode),
        enable_async_checkpointing=bool(checkpoint_config.get("async_save", True)),
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=(STATE_ITEM, DATA_ITEM))


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"config.checkpoint.best_mode={mode!r}; choose 'min' or 'max'")
    return mode


class _DropMetricLessWarning(std_logging.Filter):
    """Orbax warns at every save without metrics once best_fn is set; steps between
    evaluations carry none by design (LatestN keeps them)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "did not provide metrics" not in str(record.msg)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None,
         metrics: dict[str, float] | None = None) -> bool:
    """Starts a save of ``state`` (and the data iterator's position) at ``step``; ``metrics``
    (the evaluation of that step, if any) are stored with it for the best-N policy."""
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, _DropMetricLessWarning) for f in absl_logger.filters):
        absl_logger.addFilter(_DropMetricLessWarning())
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iter is not None:
        items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
    """Restores ``state`` onto ``abstract_state``'s shardings; ``data_iter`` is set in place."""
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE_ITEM]


def save_config(workdir: str, config, **extra) -> None:
    """WORKDIR/config.json: the resolved config (plus ``extra`` top-level fields)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    saved = json.loads(config.to_json_best_effort())
    saved.update(extra)
    with open(tmp, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a radnet run directory: {CONFIG_FILE} is missing")
    with open(path) as f:
        raw = json.load(f)
    # JSON turns tuples into lists; mesh and sharding rules are read as sequences anyway.
    return ml_collections.ConfigDict(raw)


# ----------------------------------------------------------------------------- reading a run

def _reader(workdir: str) -> ocp.CheckpointManager:
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir} has no {CHECKPOINT_DIR}/ directory")
    # A handler for the state item, so its metadata (names and shapes) can be read
    # before any array is.
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False),
        item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()})


def steps(workdir: str) -> list[int]:
    """The finished checkpoint steps of a run, ascending."""
    with _reader(workdir) as manager:
        return sorted(manager.all_steps())


def latest_step(workdir: str) -> int:
    found = steps(workdir)
    if not found:
        raise FileNotFoundError(f"{checkpoint_dir(workdir)} holds no finished checkpoint")
    return found[-1]


def best_step(workdir: str) -> int:
    """The step with the best ``checkpoint.best_metric`` of the run's config.json.

    Steps saved without that metric (between evaluations) do not compete; when no step has
    it (a run without validation), the latest step is the best there is.
    """
    config = load_config(workdir)
    metric = config.checkpoint.best_metric
    mode = _check_mode(config.checkpoint.best_mode)
    scored = []
    with _reader(workdir) as manager:
        for step in manager.all_steps():
            value = (manager.metrics(step) or {}).get(metric)
            if value is not None and math.isfinite(float(value)):
                scored.append((float(value), step))
    if not scored:
        return latest_step(workdir)
    if mode == "min":  # ties go to the earliest step
        return min(scored, key=lambda vs: (vs[0], vs[1]))[1]
    return max(scored, key=lambda vs: (vs[0], -vs[1]))[1]


def resolve_step(workdir: str, step: int | None = None, *, prefer: str = "latest") -> int:
    """``step`` itself (checked to exist), else the run's latest or best one (``prefer``)."""
    if step is None:
        if prefer not in ("latest", "best"):
            raise ValueError(f"prefer={prefer!r}; choose 'latest' or 'best'")
        return best_step(workdir) if prefer == "best" else latest_step(workdir)
    found = steps(workdir)
    if step not in found:
        raise ValueError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)}; "
                         f"available: {found}")
    return int(step)


def flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    """Nested dicts → ``{("params", "encoder", "stem", "conv", "kernel"): leaf}``."""
    return traverse_util.flatten_dict(tree) if tree else {}


def leaf_shapes(workdir: str, step: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of every array of the ``state`` item, read from metadata only."""
    with _reader(workdir) as manager:
        meta = manager.item_metadata(step)[STATE_ITEM]
    tree = getattr(meta, "tree", meta)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)  # lists too (the optimizer state)
    return {tuple(jax.tree_util.keystr((key,), simple=True) for key in path):
            tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def compare(expected: Mapping[tuple, tuple], found: Mapping[tuple, tuple],
            found_name: str = "checkpoint") -> list[str]:
    """Problems of ``found`` against ``expected`` (the model), one line each."""
    name = "/".join
    problems = []
    for path in sorted(set(expected) - set(found)):
        problems.append(f"missing in {found_name}: {name(path)} {tuple(expected[path])}")
    for path in sorted(set(found) - set(expected)):
        problems.append(f"unexpected in {found_name}: {name(path)} {tuple(found[path])}")
    for path in sorted(set(expected) & set(found)):
        if tuple(expected[path]) != tuple(found[path]):
            problems.append(f"shape mismatch: {name(path)} model {tuple(expected[path])} "
                            f"vs {found_name} {tuple(found[path])}")
    return problems


def raise_on_problems(problems: list[str], what: str) -> None:
    if problems:
        raise MismatchError(f"{what}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


def _restore_arrays(workdir: str, step: int, abstract: dict) -> dict:
    """Partial restore of the ``state`` item onto ``abstract`` (nested dict of ShapeDtypeStructs,
    with or without shardings); raises if Orbax returns less than asked."""
    with _reader(workdir) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True)}))[STATE_ITEM]
    missing = set(flatten(abstract)) - set(flatten(restored))
    if missing:  # never go on with a silently half-restored tree
        raise MismatchError("restore returned no value for: " +
                            ", ".join("/".join(p) for p in sorted(missing)))
    return restored


def load_variables(workdir: str, step: int | None = None, *, prefer: str = "latest",
                   sharding: jax.sharding.Sharding | None = None):
    """→ (config, {"params", "batch_stats"}, step) of a run, for inference and transfer.

    ``step`` None takes the run's latest (or, ``prefer="best"``, best) checkpoint. Only
    parameters and batch statistics are read; arrays land with ``sharding`` (default:
    replicated on this process's devices) regardless of the training mesh. The model is
    the one config.json describes.
    """
    from radnet.train import sharding as sharding_lib  # noqa: PLC0415
    from radnet.train import state as state_lib  # the model factory; imported on use

    config = load_config(workdir)
    step = resolve_step(workdir, step, prefer=prefer)
    model = state_lib.build_model(config)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, *state_lib.input_shape(config)),
                                                       np.float32), train=False))
    if sharding is None:
        sharding = jax.sharding.NamedSharding(
            sharding_lib.make_mesh([("data", -1)], devices=jax.local_devices()), jax.P())
    target = {c: abstract.get(c, {}) for c in VARIABLE_COLLECTIONS}
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
    restored = _restore_arrays(workdir, step, target)
    variables = {c: restored.get(c, {}) for c in VARIABLE_COLLECTIONS}
    logging.info("loaded %s step %d", workdir, step)
    return config, variables, step


def restore_subtree(workdir: str, variables: Mapping[str, Any], step: int | None = None,
                    at: str = "encoder", *, prefer: str = "latest") -> tuple[dict, int]:
    """``variables`` with subtree ``at`` (of params and batch_stats) replaced by the run's.

    Before any array is read, the names and shapes of both sides are compared and every
    missing, unexpected or mis-shaped parameter is named in one ``MismatchError``: a silently
    half-restored encoder would make every transfer result meaningless. Returns the new
    variables (restored leaves as host NumPy arrays) and the step read.
    """
    targets = {}
    for collection in VARIABLE_COLLECTIONS:
        sub = variables.get(collection, {})
        if at in sub:
            for path, leaf in flatten(sub[at]).items():
                targets[(collection, at, *path)] = leaf
    if not any(p[0] == "params" for p in targets):
        raise MismatchError(f"the model has no params/{at} subtree to restore into")
    step = resolve_step(workdir, step, prefer=prefer)
    found = {p: s for p, s in leaf_shapes(workdir, step).items()
             if len(p) >= 2 and p[0] in VARIABLE_COLLECTIONS and p[1] == at}
    raise_on_problems(compare({p: np.shape(v) for p, v in targets.items()}, found),
                      f"the {at} of {workdir} (step {step}) does not fit the model")
    abstract = traverse_util.unflatten_dict(
        {p: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for p, v in targets.items()})
    restored = flatten(_restore_arrays(workdir, step, abstract))
    merged = {c: flatten(variables.get(c, {})) for c in VARIABLE_COLLECTIONS}
    for path, value in restored.items():
        merged[path[0]][path[1:]] = np.asarray(value)
    return {c: traverse_util.unflatten_dict(v) for c, v in merged.items()}, step
