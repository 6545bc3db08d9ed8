"""oneDNN 3D convolutions for XLA:CPU (``onednn_conv3d.cc``), built once per environment.

XLA:CPU's own 3D convolutions run 3–10× slower than oneDNN's on the layers of a 3D
ResNet (docs/performance.md), so on the CPU radnet calls oneDNN through three XLA FFI
custom calls: forward, input gradient, kernel gradient. The library is optional: when it
is not built (no compiler, no oneDNN), :func:`available` is False and
``radnet.models.conv`` uses its XLA formulations, with the same parameters and numbers.

Build: ``python -m radnet.native`` (``make venv`` runs it). It compiles
``onednn_conv3d.cc`` against the oneDNN of the ``onednn-devel-cpu-gomp`` wheel in the
environment (headers in ``<prefix>/include``, ``libdnnl.so`` in ``<prefix>/lib``) and
JAX's FFI headers, into ``build/onednn_conv3d.so`` beside this file. Threads: oneDNN's
OpenMP uses ``OMP_NUM_THREADS`` (default: every core), like PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("onednn_conv3d.cc")
# In a folder without __init__.py: not a Python module, so package walks skip it.
LIBRARY = Path(__file__).with_name("build") / "onednn_conv3d.so"
TARGETS = {"radnet_conv3d_fwd": "RadnetConv3dForward",
           "radnet_conv3d_bwd_data": "RadnetConv3dBackwardData",
           "radnet_conv3d_bwd_weights": "RadnetConv3dBackwardWeights"}


def _prefix() -> Path:
    return Path(sysconfig.get_path("data"))


def build(compiler: str | None = None) -> Path:
    """Compile the custom calls; returns the library path. Raises ``RuntimeError`` with
    the compiler's message when oneDNN's headers or the compiler are missing."""
    import jax.ffi  # noqa: PLC0415

    prefix = _prefix()
    if not (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists():
        raise RuntimeError(f"oneDNN headers not found under {prefix / 'include'}; install "
                           f"onednn-devel-cpu-gomp (requirements.txt)")
    compiler = compiler or os.environ.get("CXX", "g++")
    LIBRARY.parent.mkdir(exist_ok=True)
    tmp = LIBRARY.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
           "-isystem", jax.ffi.include_dir(), "-isystem", str(prefix / "include"),
           str(SOURCE), "-L", str(prefix / "lib"), "-ldnnl",
           f"-Wl,-rpath,{prefix / 'lib'}", "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"cannot run {compiler}: {e}") from e
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        raise RuntimeError(f"{compiler} failed: {(errors or [done.stderr.strip()])[0]}")
    tmp.replace(LIBRARY)  # atomic: a concurrent loader sees the old file or the new one
    return LIBRARY


@functools.cache
def available() -> bool:
    """True when the library is built and its custom calls are registered with JAX."""
    if not LIBRARY.exists():
        return False
    import jax  # noqa: PLC0415

    try:
        lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError) as e:
        print(f"radnet.native: {LIBRARY} does not load ({e}); using XLA's convolutions. "
              f"Rebuild with `python -m radnet.native`.", file=sys.stderr)
        return False
    return True


def _result(shape, dtype, batch_like):
    """The result type: for activations the batch sharding of ``batch_like`` under explicit
    sharding (``sharding.traced_batch_sharding``); a kernel gradient (``batch_like`` None)
    replicated. XLA gathers a custom call's operands where they are split over devices."""
    import jax  # noqa: PLC0415

    from radnet.train import sharding as sharding_lib  # noqa: PLC0415
    sharding = (None if batch_like is None
                else sharding_lib.traced_batch_sharding(batch_like, len(shape)))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _call(target, shape, dtype, a, b, strides, pads, batch_like):
    import jax  # noqa: PLC0415

    if not available():
        raise RuntimeError(f"radnet's oneDNN convolutions are not built ({LIBRARY} missing "
                           f"or not loadable): run `python -m radnet.native`")
    lo = np.asarray([p[0] for p in pads], np.int64)
    hi = np.asarray([p[1] for p in pads], np.int64)
    return jax.ffi.ffi_call(target, _result(shape, dtype, batch_like))(
        a, b, strides=np.asarray(strides, np.int64), pads_lo=lo, pads_hi=hi)


def conv3d_forward(x, kernel, strides, pads):
    """``x [B, D, H, W, C]`` ⊛ ``kernel [kd, kh, kw, C, F]`` (float32, dilation 1)."""
    out = [(n + lo + hi - k) // s + 1
           for n, (lo, hi), k, s in zip(x.shape[1:4], pads, kernel.shape[:3], strides)]
    return _call("radnet_conv3d_fwd", (x.shape[0], *out, kernel.shape[-1]), x.dtype,
                 x, kernel, strides, pads, batch_like=x)


def conv3d_backward_data(dy, kernel, x_shape, strides, pads):
    """The input gradient of :func:`conv3d_forward` for the output cotangent ``dy``."""
    return _call("radnet_conv3d_bwd_data", tuple(x_shape), dy.dtype, dy, kernel, strides,
                 pads, batch_like=dy)


def conv3d_backward_weights(x, dy, kernel_shape, strides, pads):
    """The kernel gradient of :func:`conv3d_forward` for the output cotangent ``dy``."""
    return _call("radnet_conv3d_bwd_weights", tuple(kernel_shape), x.dtype, x, dy, strides,
                 pads, batch_like=None)
