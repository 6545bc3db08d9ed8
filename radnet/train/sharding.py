"""Device mesh and shardings from the config.

``config.mesh`` is a list of ``(axis_name, size)``; one size may be -1 ("all the devices
left"). The batch is split over ``config.sharding.batch_axes`` (default ``("data",)``).
Parameters are replicated unless a rule in ``config.sharding.rules`` matches their path
(``"encoder/block1/conv1/kernel"``): each rule is ``(regex, spec)`` with ``spec`` one entry
per array dimension (an axis name, a tuple of names, or None). ``config.sharding.fsdp_axis``
("" = off) shards every other array of at least ``fsdp_min_size`` elements along its
largest dimension divisible by that axis (FSDP / ZeRO-3 style); XLA inserts the gathers.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding


def make_mesh(mesh_config: Sequence[Sequence[Any]], devices=None) -> jax.sharding.Mesh:
    """``[("data", -1)]`` → a Mesh over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(str(n) for n, _ in mesh_config)
    sizes = [int(s) for _, s in mesh_config]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {mesh_config}: at most one axis may have size -1")
    known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh {mesh_config}: {len(devices)} devices are not a "
                             f"multiple of the fixed axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"config.mesh {mesh_config} needs {int(np.prod(sizes))} devices; "
                         f"{len(devices)} are available")
    # Auto axes: jit's partitioner propagates the input/parameter shardings through the
    # model, which stays free of sharding annotations (explicit axes would require them).
    return jax.make_mesh(tuple(sizes), names, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh, batch_axes: Sequence[str] = ("data",)) -> NamedSharding:
    """Leading (batch) dimension split over ``batch_axes``; the rest replicated."""
    return NamedSharding(mesh, jax.P(tuple(batch_axes)))


def traced_batch_sharding(like, ndim: int):
    """Under explicit sharding (``jax.sharding.AxisType.Explicit``, as evaluation runs), the
    sharding of an ``ndim``-dimensional result split like ``like``'s batch axis and
    replicated otherwise; None when ``like`` carries no explicit sharding. Results of custom
    calls and general reshapes must state it there."""
    from jax.sharding import AxisType, PartitionSpec  # noqa: PLC0415

    sharding = getattr(jax.typeof(like), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    spec = sharding.spec
    return NamedSharding(mesh, PartitionSpec(spec[0] if len(spec) else None,
                                             *([None] * (ndim - 1))))


def batch_divisor(mesh, batch_axes: Sequence[str] = ("data",)) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes]))


def path_name(path) -> str:
    """A key path → ``"a/b/c"`` (dict keys, attributes and sequence indices)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _spec_for(name: str, shape, mesh, rules, fsdp_axis: str, fsdp_min_size: int):
    for pattern, spec in rules:
        if re.search(pattern, name):
            spec = tuple(spec)
            if len(spec) > len(shape):
                raise ValueError(f"sharding rule {pattern!r} → {spec} has more entries than "
                                 f"{name} has dimensions {tuple(shape)}")
            for dim, axes in zip(shape, spec):
                if axes is None:
                    continue
                size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, (tuple, list)) else (axes,))]))
                if dim % size:
                    raise ValueError(f"sharding rule {pattern!r}: dimension {dim} of {name} "
                                     f"{tuple(shape)} is not divisible by mesh size {size}")
            return jax.P(*[tuple(a) if isinstance(a, list) else a for a in spec])
    if fsdp_axis and int(np.prod(shape, dtype=np.int64)) >= fsdp_min_size:
        size = mesh.shape[fsdp_axis]
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % size == 0 and shape[dim] >= size:
                spec = [None] * len(shape)
                spec[dim] = fsdp_axis
                return jax.P(*spec)
    return jax.P()


def tree_shardings(abstract_tree, mesh, sharding_config) -> Any:
    """Shardings for every leaf of ``abstract_tree`` (ShapeDtypeStructs) from the config rules."""
    rules = [tuple(r) for r in sharding_config.get("rules", ())]
    fsdp_axis = sharding_config.get("fsdp_axis", "") or ""
    fsdp_min_size = int(sharding_config.get("fsdp_min_size", 2 ** 18))

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, _spec_for(path_name(path), shape, mesh, rules,
                                             fsdp_axis, fsdp_min_size))

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows → global arrays sharded over the batch axes (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
