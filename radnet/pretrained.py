"""The front door: a pretrained radnet encoder inside your own model.

    p = radnet.pretrained.load("runs/demo/pretrain")      # a training workdir → its best checkpoint
    encoder, encoder_variables = p.encoder()             # radnet.models.ResNet3D + its weights
    variables = radnet.pretrained.merge_encoder(my_model.init(rng, x), p)   # at "encoder"
    tx = radnet.pretrained.freeze(["stem", "block1"], optax.adam(1e-3))     # those stay fixed
    volume = p.preprocess(paths_of_one_series)            # uint8 [D, H, W], as build_volumes makes it
    p.predict(volumes)["sequence"]                        # [B, 5] probabilities; embed(volumes): [B, C]

``load`` reads a run's resolved config (``config.json``) and one checkpoint's parameters and
batch statistics (never the optimizer state), onto this process's devices whatever mesh the
run trained on; or an exported weights file (``python -m radnet.export``,
``python -m radnet.interop.convert``: safetensors + model card, docs/interop.md). ``merge_encoder`` is loud: a model whose encoder does not fit the checkpoint's
stops with one error naming every missing, unexpected and mis-shaped array. ``freeze`` keeps
encoder stages bit-identical through ``optax.apply_updates``. ``preprocess`` makes a series'
volume exactly as the run's training volumes were made (the spec travels in config.json:
``input.preprocessing``), ``predict`` and ``embed`` run the model on such volumes. See
docs/pretrained.md and docs/predict.md.

The reading is done by :mod:`radnet.train.checkpoint` and the freezing labels follow
:mod:`radnet.train.transfer`; this module only puts them behind one small API.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from radnet import labels, models
from radnet import preprocess as preprocess_lib
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

    @functools.cached_property
    def volume_options(self) -> preprocess_lib.VolumeOptions:
        """How a series becomes a volume for this model: the run's ``input.preprocessing``
        (see :func:`volume_options`)."""
        return volume_options(self.config, self.source)

    def preprocess(self, files: Sequence[str | os.PathLike],
                   orientation: Sequence[float] | None = None) -> np.ndarray:
        """The DICOM files of one series (any order) → uint8 ``[D, H, W]``: exactly the
        volume ``data_prep.build_volumes`` stores for that series with the run's
        preprocessing (the same code, radnet.preprocess.build_volume).

        ``orientation``: the series' six cosines, needed only when a multi-frame file
        holds several stacks (the index's ``orientation`` column). A series that cannot
        become a volume raises ``radnet.preprocess.SeriesError``; its ``reason`` (and
        the start of its message) is the exclusion reason, e.g. ``too_few_slices``.
        """
        return preprocess_lib.build_volume(
            [os.fspath(f) for f in files], self.volume_options, orientation=orientation,
            workspace=self._workspace()).volume

    def _workspace(self) -> preprocess_lib.Workspace:
        # Buffers kept between calls (radnet.preprocess.Workspace), one per thread.
        local = self.__dict__.setdefault("_local", threading.local())
        if getattr(local, "workspace", None) is None:
            local.workspace = preprocess_lib.Workspace(self.volume_options)
        return local.workspace

    def inference_fn(self):
        """The pure function behind :meth:`predict` and :meth:`embed`, to jit with your
        own shardings: ``fn(variables, volume uint8 [B, D, H, W]) -> dict`` of
        probabilities per head (see :meth:`predict`) and ``"embedding"`` [B, C] float32.
        A model without the 3D-RADNet heads (an encoder, a VNet) gives the embedding only."""
        return _inference_fn(self.model, self.config.model_name)

    @functools.cached_property
    def _jitted(self):
        return jax.jit(self.inference_fn())

    def _check_volumes(self, volumes) -> np.ndarray:
        volumes = np.asarray(volumes)
        shape = tuple(int(s) for s in self.volume_options.volume_shape)
        if volumes.dtype != np.uint8 or volumes.ndim != 4 or tuple(volumes.shape[1:]) != shape:
            raise ValueError(f"expected uint8 volumes [B, {', '.join(map(str, shape))}] (as "
                             f"preprocess makes them), got {volumes.dtype} {list(volumes.shape)}")
        return volumes

    def outputs(self, volumes) -> dict[str, np.ndarray]:
        """:meth:`predict` and :meth:`embed` of one forward pass (``"embedding"`` added)."""
        return {k: np.asarray(v) for k, v in
                jax.device_get(self._jitted(self.variables, self._check_volumes(volumes))).items()}

    def predict(self, volumes) -> dict[str, np.ndarray]:
        """uint8 volumes ``[B, D, H, W]`` (from :meth:`preprocess`) → per class head the
        softmax probabilities ``[B, n_classes]`` (``sequence``, ``view``, ``contrast``, in
        radnet/labels.py order), ``coverage``: the nine sigmoid probabilities ``[B, 9]``,
        ``slice_spacing``: the effective slice spacing in mm ``[B]``. Needs a model with
        the 3D-RADNet heads."""
        if self.config.model_name != "radnet":
            raise ValueError(f"predict needs the 3D-RADNet heads; {self.source} holds a "
                             f"{self.config.model_name!r} model (embed works)")
        out = self.outputs(volumes)
        out.pop("embedding")
        return out

    def embed(self, volumes) -> np.ndarray:
        """uint8 volumes ``[B, D, H, W]`` → the encoder's pooled embedding, float32 ``[B, C]``."""
        return self.outputs(volumes)["embedding"]

    def apply(self, x):
        """The run's model in inference mode on ``x``: float ``[B, D, H, W, 1]`` in [0, 1], or
        uint8 volumes ``[B, D, H, W]`` (scaled on the device as in training). Returns what the
        model returns (RadNet: a dict of float32 logits per head, slice spacing in mm)."""
        from radnet.data import augment  # noqa: PLC0415  (input scaling, imported on use)
        if getattr(x, "dtype", None) == "uint8":
            x = augment.to_unit_float(x)
        return self.model.apply(self.variables, x, train=False)


def _inference_fn(model, model_name: str):
    from radnet.data import augment  # noqa: PLC0415  (training's own input scaling)
    import jax.numpy as jnp  # noqa: PLC0415

    def fn(variables, volume):
        x = augment.to_unit_float(volume)
        if model_name == "radnet":
            # One pass: the heads' logits and the encoder's embedding on the way.
            logits, state = model.apply(
                variables, x, train=False, mutable=["intermediates"],
                capture_intermediates=lambda m, method: m.name == ENCODER and method == "__call__")
            embedding = state["intermediates"][ENCODER]["__call__"][0][0]
            out = {h: jax.nn.softmax(logits[h].astype(jnp.float32), axis=-1)
                   for h in labels.CLASS_HEADS}
            out.update({h: jax.nn.sigmoid(logits[h].astype(jnp.float32))
                        for h in labels.MULTILABEL_HEADS})
            out.update({h: logits[h].astype(jnp.float32) for h in labels.REGRESSION_HEADS})
        elif model_name == "resnet":
            embedding, out = model.apply(variables, x, train=False)[0], {}
        else:  # a model with an encoder submodule (e.g. vnet): the encoder alone
            encoder = models.ResNet3D(**{f: getattr(model, f) for f in _ENCODER_FIELDS
                                         if hasattr(model, f) and f != "frozen_stages"})
            enc_vars = {c: variables.get(c, {}).get(ENCODER, {}) for c in COLLECTIONS}
            embedding, out = encoder.apply(enc_vars, x, train=False)[0], {}
        out["embedding"] = embedding.astype(jnp.float32)
        return out

    return fn


def volume_options(config, source: str = "") -> preprocess_lib.VolumeOptions:
    """The run's preprocessing (``config.input.preprocessing``, written by pretraining
    since the spec travels with the checkpoint) as ``radnet.preprocess.VolumeOptions``.

    A run made before it was stored: read from the build attributes of the run's dataset
    when that is still readable, else the volume builder's defaults (min-max) at the run's
    ``input.volume_shape``; either way a warning says so. The volume shape must agree with
    ``input.volume_shape`` (the model's input).
    """
    from absl import logging  # noqa: PLC0415

    fields = {f.name for f in dataclasses.fields(preprocess_lib.VolumeOptions)}
    inp = config.get("input") or {}
    spec = inp.get("preprocessing")
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec) if spec else None
    trained_shape = inp.get("volume_shape")
    trained_shape = tuple(int(s) for s in trained_shape) if trained_shape else None
    if not spec and config.get("dataset"):
        try:
            from radnet.data import schema  # noqa: PLC0415
            build = (schema.read_attributes(config.dataset).get("build") or {}).get("config")
        except Exception:  # noqa: BLE001  (moved or deleted: fall through to the defaults)
            build = None
        if build:
            spec = {k: v for k, v in build.items() if k in fields}
            logging.warning("%s records no preprocessing (made before it was stored); using "
                            "the build config of its dataset %s", source or "the run",
                            config.dataset)
    if not spec:
        if trained_shape is None:
            raise ValueError(f"{source or 'the run'} records neither its preprocessing nor "
                             "its volume shape; it cannot say how to make its input volumes")
        spec = {"volume_shape": trained_shape}
        logging.warning("%s records no preprocessing and its dataset is not readable; using "
                        "the volume builder's defaults (%s normalisation) at %s",
                        source or "the run", preprocess_lib.VolumeOptions.normalise,
                        trained_shape)
    spec = {k: v for k, v in spec.items() if k in fields}
    for key in ("volume_shape", "percentiles"):
        if key in spec:
            spec[key] = tuple(spec[key])
    options = preprocess_lib.VolumeOptions(**spec)
    if trained_shape is not None and tuple(options.volume_shape) != trained_shape:
        raise ValueError(f"{source or 'the run'}: input.preprocessing.volume_shape "
                         f"{tuple(options.volume_shape)} differs from input.volume_shape "
                         f"{trained_shape}")
    return options


def volume_options_dict(p: Pretrained) -> dict:
    """:attr:`Pretrained.volume_options` as plain JSON values (an exported file's card
    carries it as ``preprocessing.volume``)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(p.volume_options).items()}


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
        "input": {"volume_shape": list(volume_shape) if volume_shape else None,
                  "preprocessing": (card.get("preprocessing") or {}).get("volume")}})
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
