"""Package boundaries: the library never imports the offline tools or the configs, and
every data_prep stage answers on its command line with the shared flag spellings."""

from __future__ import annotations

import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys

import pytest

import radnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ("data_prep", "configs")


def imported_packages(source: str, module: str) -> set[str]:
    """Top-level packages ``source`` imports anywhere (module level, inside functions,
    relative imports resolved against ``module``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the importing module's own package
                found.add(module.split(".")[0])
            elif node.module:
                found.add(node.module.split(".")[0])
    return found


def _radnet_modules():
    yield radnet.__name__
    for info in pkgutil.walk_packages(radnet.__path__, radnet.__name__ + "."):
        yield info.name


def test_the_import_walk_sees_imports_inside_functions():
    source = "import os\ndef f():\n    from data_prep.index import series\n    import configs.pretrain\n"
    assert {"os", "data_prep", "configs"} <= imported_packages(source, "radnet.x")


def test_radnet_imports_neither_data_prep_nor_configs():
    offenders, modules = [], 0
    for name in _radnet_modules():
        origin = importlib.util.find_spec(name).origin
        with open(origin, encoding="utf-8") as f:
            used = imported_packages(f.read(), name)
        modules += 1
        offenders += [f"{name} imports {p}" for p in FORBIDDEN if p in used]
    assert modules > 30  # the walk reached the whole library
    assert not offenders, offenders


STAGES = {
    "index": ["--dicom_root=x", "--out=y"],
    "build_volumes": ["--index=x", "--dicom_root=y", "--out=z"],
    "phantoms": ["--out=x"],
    "lits": ["--lits_dir=x", "--out=y"],
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_command_line_parses_and_spells_shared_flags_alike(stage):
    command = [sys.executable, "-m", f"data_prep.{stage}"]
    # --only_check_args: absl parses and validates every flag, then exits 0 before main.
    checked = subprocess.run(command + STAGES[stage] + ["--only_check_args"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr[-2000:]
    # --help prints the usage; absl ends it with status 1 by design (not a crash).
    shown = subprocess.run(command + ["--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr, shown.stderr[-2000:]
    for flag in ("--[no]progress:", "--workers:", "--out:"):
        assert flag in shown.stdout, (stage, flag)
