"""JAX's persistent compilation cache, on by default for ``radnet.main``.

Compiling a ResNet50 train step takes 8–22 s on a CPU and is paid again at every start
and every resume. With the cache, XLA's compiled executables are written to a folder
and a later process that builds the same program (same model, shapes, shardings, JAX
version and devices) loads it instead of compiling.

Where: ``--compilation_cache_dir``, else ``$JAX_COMPILATION_CACHE_DIR`` (JAX's own
variable), else ``$XDG_CACHE_HOME/radnet/jax_compilation_cache`` (``~/.cache/…`` when
``XDG_CACHE_HOME`` is unset). Off: ``--nocompilation_cache``. The folder holds only
compiled programs keyed by a hash of the program — no data, no paths of inputs — and
may be deleted at any time (the next run compiles again). See docs/performance.md.
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging

_ENABLED = flags.DEFINE_bool(
    "compilation_cache", True,
    "Keep compiled XLA programs on disk so a second start or a resume does not compile "
    "again (--nocompilation_cache: off).")
_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Folder of the persistent compilation cache; default $JAX_COMPILATION_CACHE_DIR, else "
    "$XDG_CACHE_HOME/radnet/jax_compilation_cache (~/.cache/radnet/...).")

# Programs that compile faster than this are not written (each entry costs a file and a
# hash on every load); the train and eval steps of even the tiny configs take longer.
MIN_COMPILE_TIME_S = 0.5


def default_dir() -> str:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "radnet", "jax_compilation_cache")


def enable(directory: str | None = None,
           min_compile_time_s: float = MIN_COMPILE_TIME_S) -> str:
    """Points JAX's persistent cache at ``directory`` (default :func:`default_dir`);
    returns it. Call before the first compilation."""
    directory = directory or default_dir()
    if "://" not in directory:
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def disable() -> None:
    jax.config.update("jax_compilation_cache_dir", None)


def enable_from_flags() -> str | None:
    """``radnet.main``'s hook: the cache as the flags say; returns the folder or None."""
    if not _ENABLED.value:
        disable()
        logging.info("persistent compilation cache off (--nocompilation_cache)")
        return None
    try:
        directory = enable(_DIR.value)
    except OSError as e:
        # A read-only home or a full disk must not stop a run: it only compiles again.
        logging.warning("persistent compilation cache off: %s", e)
        return None
    logging.debug("persistent compilation cache: %s", directory)  # -v 1 shows it
    return directory
