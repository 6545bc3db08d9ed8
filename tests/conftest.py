"""Shared pytest set-up: CPU only, quiet JAX, and a compilation cache of this session only.

radnet.main turns on JAX's persistent compilation cache (radnet/compile_cache.py); the
suite points it at a fresh temporary folder, so a test run starts cold like a fresh machine,
shares compiled programs between its own subprocesses, and writes nothing to ~/.cache.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="radnet-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Command lines that run models restart themselves once with glibc's malloc tunables
# (radnet/host_memory.py); the suite's many short subprocesses skip that restart (~1 s each).
# tests/radnet/test_host_memory.py runs the restart and measures what it does.
os.environ.setdefault("RADNET_HOST_MEMORY", "system")
