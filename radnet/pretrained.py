"""The front door: a pretrained radnet encoder inside your own model.

    p = radnet.pretrained.load("runs/demo/pretrain")      # a training workdir → its best checkpoint
    encoder, encoder_variables = p.encoder()             # radnet.models.ResNet3D + its weights
    variables = radnet.pretrained.merge_encoder(my_model.init(rng, x), p)   # at "encoder"
    tx = radnet.pretrained.freeze(["stem", "block1"], optax.adam(1e-3))     # those stay fixed

``load`` reads a run's resolved config (``config.json``) and one checkpoint's parameters and
batch statistics (never the optimizer state), onto this process's devices whatever mesh the
run trained on; or an exported weights file (``python -m radnet.export``,
``python -m radnet.interop.convert``: safetensors + model card, docs/interop.md). ``merge_encoder`` is loud: a model whose encoder does not fit the checkpoint's
stops with one error naming every missing, unexpected and mis-shaped array. ``freeze`` keeps
encoder stages bit-identical through ``optax.apply_updates``. See docs/pretrained.md.

The reading is done by :mod:`radnet.train.checkpoint` and the freezing labels follow
:mod:`radnet.train.transfer`; this module only puts them behind one small API.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from radnet import models
from radnet.models import STAGES
from radnet.train import checkpoint as ckpt_lib
from radnet.train import transfer

ENCODER = transfer.ENCODER
COLLECTIONS = ckpt_lib.VARIABLE_COLLECTIONS          # ("params", "batch_stats")
# Exported weight files (radnet.interop.weightsfile).
EXPORT_SUFFIXES = (".safetensors",)
_ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(models.ResNet3D)
                        if f.name not in ("parent", "name"))
_WORKDIR_HINT = ("pass the workdir of a radnet training run (the folder holding config.json "
                 "and checkpoints/, e.g. runs/demo/pretrain) or a .safetensors file made by "
                 "python -m radnet.export or python -m radnet.interop.convert")
# Parameter shapes do not depend on the volume: any input every variant takes will do.
_SHAPE_PROBE = (32, 64, 64)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """One checkpoint of a run: its config, model, variables and step.

    Attributes:
      config: the run's resolved config (``ml_collections.ConfigDict`` of config.json).
      model: the run's whole Linen model (e.g. ``radnet.models.RadNet``: encoder + heads).
      variables: ``{"params", "batch_stats"}`` of ``model`` at ``step``.
      step: the checkpoint step read (of the source run, for an exported file).
      source: the path it was loaded from.
      card: the model card of an exported file (docs/interop.md); None for a workdir.
    """

    config: Any
    model: Any
    variables: dict
    step: int
    source: str
    card: dict | None = None

    def encoder(self, **overrides) -> tuple[models.ResNet3D, dict]:
        """→ (``radnet.models.ResNet3D`` with the run's encoder fields, its
        ``{"params", "batch_stats"}``).

        The module gets the run's architecture (depth, variant, norm, width, dtype, dilated,
        bn_momentum) and ``frozen_stages=()``; ``overrides`` replace fields, e.g.
        ``encoder(frozen_stages=("stem", "block1"))`` or ``encoder(dtype="bfloat16")``.
        Its call is ``(x [B, D, H, W, 1], train) -> (embedding [B, C], stage features)``.
        """
        unknown = sorted(set(overrides) - set(_ENCODER_FIELDS))
        if unknown:
            raise TypeError(f"encoder() got unknown field(s) {unknown}; ResNet3D fields are "
                            f"{list(_ENCODER_FIELDS)}")
        fields = {f: self.config.model[f] for f in _ENCODER_FIELDS if f in self.config.model}
        fields["frozen_stages"] = ()   # a training choice of the run, not part of the weights
        fields.update(overrides)
        fields["frozen_stages"] = tuple(fields["frozen_stages"])
        return models.ResNet3D(**fields), self.encoder_variables()

    def encoder_variables(self) -> dict:
        """The encoder's ``{"params", "batch_stats"}`` (the ``encoder`` subtrees)."""
        if self.config.model_name == "resnet":   # the run's model is the encoder itself
            return {c: self.variables.get(c, {}) for c in COLLECTIONS}
        if ENCODER not in self.variables.get("params", {}):
            raise ValueError(f"the {self.config.model_name!r} model of {self.source} has no "
                             f"{ENCODER!r} submodule; its top level: "
                             f"{sorted(self.variables.get('params', {}))}")
        return {c: self.variables.get(c, {}).get(ENCODER, {}) for c in COLLECTIONS}

    def apply(self, x):
        """The run's model in inference mode on ``x``: float ``[B, D, H, W, 1]`` in [0, 1], or
        uint8 volumes ``[B, D, H, W]`` (scaled on the device as in training). Returns what the
        model returns (RadNet: a dict of float32 logits per head, slice spacing in mm)."""
        from radnet.data import augment  # noqa: PLC0415  (input scaling, imported on use)
        if getattr(x, "dtype", None) == "uint8":
            x = augment.to_unit_float(x)
        return self.model.apply(self.variables, x, train=False)


def load(path: str | os.PathLike, step: int | None = None) -> Pretrained:
    """A pretrained radnet from ``path``.

    ``path`` is a training workdir (config.json + checkpoints/): ``step=None`` reads its
    best checkpoint by the run's ``checkpoint.best_metric`` (the latest one when no step was
    evaluated), ``step=N`` exactly checkpoint N. Or ``path`` is an exported weights file
    (``.safetensors`` with a radnet model card): it loads as the workdir it came from did,
    the same arrays onto the same devices (``step`` must be None or the file's step).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; {_WORKDIR_HINT}")
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        if suffix in EXPORT_SUFFIXES:
            return _load_file(path, step)
        raise ValueError(f"{path} is a file of a type radnet cannot load ({suffix or 'no suffix'}); "
                         f"{_WORKDIR_HINT}")
    if not os.path.isfile(os.path.join(path, ckpt_lib.CONFIG_FILE)):
        raise FileNotFoundError(f"{path} is not a radnet run directory (no "
                                f"{ckpt_lib.CONFIG_FILE}); {_WORKDIR_HINT}")
    config, variables, step = ckpt_lib.load_variables(path, step, prefer="best")
    from radnet.train import state as state_lib  # noqa: PLC0415  (the one model factory)
    return Pretrained(config=config, model=state_lib.build_model(config), variables=variables,
                      step=int(step), source=path)


def _load_file(path: str, step: int | None) -> Pretrained:
    from radnet.interop import weightsfile  # noqa: PLC0415  (safetensors, on use)
    from radnet.train import sharding as sharding_lib  # noqa: PLC0415
    from radnet.train import state as state_lib  # noqa: PLC0415

    tensors, card = weightsfile.read(path)
    file_step = int(card.get("source_step") or 0)
    if step is not None and int(step) != file_step:
        raise ValueError(f"{path} holds step {file_step} only (step={step} was asked); load "
                         "the run's workdir for other steps")
    volume_shape = (card.get("preprocessing") or {}).get("volume_shape")
    config = ml_collections.ConfigDict({
        "model_name": card["model_name"], "model": card["model"],
        "input": {"volume_shape": list(volume_shape) if volume_shape else None}})
    model = state_lib.build_model(config)
    # Names and shapes against the model the card describes, before anything is placed.
    probe = np.zeros((1, *(volume_shape or _SHAPE_PROBE), 1), np.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), probe, train=False))
    expected = {tuple(k): a.shape for c in COLLECTIONS
                for k, a in ckpt_lib.flatten({c: abstract.get(c, {})}).items()}
    found = {tuple(k.split(weightsfile.SEP)): v.shape for k, v in tensors.items()}
    ckpt_lib.raise_on_problems(ckpt_lib.compare(expected, found, "file"),
                               f"{path} does not fit the {card['model_name']!r} model its card "
                               "describes")
    # The same placement as a workdir's load_variables: replicated on this process's devices.
    sharding = jax.sharding.NamedSharding(
        sharding_lib.make_mesh([("data", -1)], devices=jax.local_devices()), jax.P())
    variables = traverse_util.unflatten_dict(
        {k: jax.device_put(v, sharding) for k, v in tensors.items()}, sep=weightsfile.SEP)
    variables = {c: variables.get(c, {}) for c in COLLECTIONS}
    return Pretrained(config=config, model=model, variables=variables, step=file_step,
                      source=path, card=card)


# ----------------------------------------------------------------------------- merge

def _subtree(tree: Mapping, parts: Sequence[str]):
    node = tree
    for i, key in enumerate(parts):
        if not isinstance(node, Mapping) or key not in node:
            return None, "/".join(parts[:i]) or "<top level>", (
                sorted(node) if isinstance(node, Mapping) else [])
        node = node[key]
    return node, None, None


def merge_encoder(variables: Mapping[str, Any], pretrained: Pretrained | Mapping[str, Any],
                  at: str = ENCODER) -> dict:
    """``variables`` (your model's, e.g. from ``init``) with the pretrained encoder at ``at``.

    ``pretrained`` is a :class:`Pretrained` or encoder variables ``{"params", "batch_stats"}``.
    ``at`` is the path of the encoder in your model (``"encoder"``, ``"backbone/encoder"``);
    both params and batch statistics are replaced there. Before anything is copied the names
    and shapes are compared, and one ``radnet.train.checkpoint.MismatchError`` names every
    missing, unexpected or mis-shaped array. Returns a new tree; ``variables`` is untouched.
    """
    parts = transfer.split_path(at)
    if isinstance(pretrained, Pretrained):
        source = f"{pretrained.source} (step {pretrained.step})"
        encoder_variables = pretrained.encoder_variables()
    else:
        source = "the given encoder variables"
        encoder_variables = pretrained
    params_sub, where, keys = _subtree(variables.get("params", {}), parts)
    if params_sub is None:
        raise ckpt_lib.MismatchError(
            f"your model has no params/{'/'.join(parts)} to merge the encoder into: "
            f"params/{where} holds {keys}; pass at= the encoder's path in your model")
    expected, found = {}, {}
    for c in COLLECTIONS:
        sub, _, _ = _subtree(variables.get(c, {}), parts)
        for p, leaf in ckpt_lib.flatten(sub or {}).items():
            expected[(c, *parts, *p)] = jax.numpy.shape(leaf)
        for p, leaf in ckpt_lib.flatten(encoder_variables.get(c, {})).items():
            found[(c, *parts, *p)] = (jax.numpy.shape(leaf), leaf)
    ckpt_lib.raise_on_problems(
        ckpt_lib.compare(expected, {p: s for p, (s, _) in found.items()}, "pretrained encoder"),
        f"the pretrained encoder of {source} does not fit your model at {'/'.join(parts)!r}")
    merged = dict(variables)
    for c in COLLECTIONS:
        if c not in variables:
            continue
        flat = ckpt_lib.flatten(variables[c])
        flat.update({p[1:]: leaf for p, (_, leaf) in found.items() if p[0] == c})
        merged[c] = traverse_util.unflatten_dict(flat)
    return merged


# ----------------------------------------------------------------------------- freeze

def _stage_names(stages: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(stages, str):
        stages = STAGES if stages == "all" else (stages,)
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"cannot freeze {unknown}: encoder stages are {STAGES} (or 'all')")
    return stages


def freeze(stages: str | Sequence[str], tx: optax.GradientTransformation | None = None,
           at: str = ENCODER) -> optax.GradientTransformation:
    """``tx`` on every parameter except those of the encoder stages ``stages``
    (``"stem"``, ``"block1"`` … ``"block4"``, or ``"all"``) under ``at``, which get zero
    updates and no optimizer state, so ``optax.apply_updates`` leaves them bit-identical.

    ``tx=None`` returns the masking alone, to end a chain: ``optax.chain(opt, freeze(...))``
    (then ``opt`` keeps state for the frozen parameters too). Parameters only: the batch
    statistics of frozen stages still update in ``train=True`` unless your ResNet3D has
    ``frozen_stages`` (docs/pretrained.md).
    """
    return transfer.freeze(optax.identity() if tx is None else tx, _stage_names(stages), at)
