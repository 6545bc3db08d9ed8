"""Every module imports, all together in one process, without side effects.

The data_prep command-line tools share flag names (--out, --workers); they must
define them only when run as programs, or importing two of them clashes.
"""

import importlib
import pkgutil

import radnet
import data_prep


def _modules(package):
    yield package.__name__
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        yield info.name


def test_all_modules_import_together():
    names = [*_modules(radnet), *_modules(data_prep)]
    assert "data_prep.index" in names and "data_prep.phantoms" in names
    for name in names:
        importlib.import_module(name)


def test_importing_radnet_starts_no_jax_backend():
    import subprocess
    import sys
    code = ("import radnet, radnet.labels, radnet.main, radnet.distributed;"
            "from jax._src import xla_bridge as xb; print(xb.backends_are_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
