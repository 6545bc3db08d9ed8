"""Twenty-odd mistaken command lines, as a new user types them: each ends in exit status 2 and
ONE line on stderr, ``radnet: error: ...``, never a traceback (radnet/cli.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# (command, a word the one line must hold, so that it says what went wrong)
MISTAKES = [
    # radnet.main: config arguments, fields, files, required flags, paths
    (["-m", "radnet.main", "--config=configs/pretrain.py:depht=18", "--workdir={w}"], "depht"),
    (["-m", "radnet.main", "--config=configs/pretrain.py", "--config.train.batchsize=3",
      "--workdir={w}"], "batch_size"),
    (["-m", "radnet.main", "--config=configs/pretrain.py", "--config.train.batch_size=four",
      "--workdir={w}"], "batch_size"),
    (["-m", "radnet.main", "--config=configs/pretrian.py", "--workdir={w}"], "pretrian.py"),
    (["-m", "radnet.main", "--workdir={w}"], "--config is required"),
    (["-m", "radnet.main", "--config=configs/pretrain.py"], "--workdir is required"),
    (["-m", "radnet.main", "--config=configs/pretrain.py", "--wrkdir={w}"], "wrkdir"),
    (["-m", "radnet.main", "--config=configs/pretrain.py", "--config.task=pretrian",
      "--workdir={w}"], "unknown task"),
    (["-m", "radnet.main", "--config=configs/pretrain.py:tiny,dataset={t}/no_dataset",
      "--workdir={w}"], "no_dataset"),
    (["-m", "radnet.main", "--config=configs/evaluate.py:tiny", "--config.checkpoint={t}/no_run",
      "--config.dataset={t}/no_dataset", "--workdir={w}"], "no_"),
    (["-m", "radnet.main", "--config=configs/pretrain.py", "--workdir={w}", "stray"], "stray"),
    (["-m", "radnet.main", "--config=configs/predict.py", "--config.checkpoint={t}/no_run",
      "--config.dicom_root={t}", "--config.qc_calibration={t}/no_cal.json", "--workdir={w}"],
     "no_cal.json"),   # checked before the model loads or any file is read
    # data_prep tools
    (["-m", "data_prep.index", "--dicom_root={t}/no_archive", "--out={t}/index", "--workers=0"],
     "no_archive"),
    (["-m", "data_prep.index", "--out={t}/index"], "--dicom_root"),
    (["-m", "data_prep.index", "--dicom_root={t}", "--out={t}/index",
      "--config.split.trian=0.7"], "trian"),
    (["-m", "data_prep.build_volumes", "--index={t}/no_index", "--dicom_root={t}",
      "--out={t}/ds", "--workers=0"], "no_index"),
    (["-m", "data_prep.build_volumes", "--index={t}", "--dicom_root={t}", "--out={t}/ds",
      "--config=configs/build_volumes.py:sze=32"], "sze"),
    (["-m", "data_prep.phantoms", "--patients=3"], "--out"),
    (["-m", "data_prep.phantoms", "--out={t}/pacs", "--patients=0"], "patients"),
    (["-m", "data_prep.lits", "--lits_dir={t}/no_lits", "--out={t}/liver"], "no_lits"),
    (["-m", "radnet.export", "--workdir={t}/no_run", "--out={t}/x.safetensors"], "no_run"),
    # launchers
    (["launch/local_multiprocess.sh", "-n", "two", "--", "--config=configs/pretrain.py:tiny",
      "--workdir={w}"], "-n"),
    (["launch/tpu_pod.sh", "--dry_run", "--workdir=gs://b/w"], "--config"),
]


@pytest.mark.parametrize("argv,needle", MISTAKES,
                         ids=[" ".join(a[:3]).replace("/", "_") for a, _ in MISTAKES])
def test_a_mistake_is_one_line_and_exit_2(argv, needle, tmp_path):
    filled = [a.format(t=tmp_path, w=tmp_path / "work") for a in argv]
    cmd = ["bash", *filled] if filled[0].endswith(".sh") else [PY, *filled]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=PY)
    env.pop("RADNET_DEBUG", None)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr + out.stdout
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("radnet: error: ") and needle in lines[0], lines[0]
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_debug_shows_the_traceback(tmp_path):
    out = subprocess.run([PY, "-m", "radnet.main", "--config=configs/pretrain.py:depht=18",
                          f"--workdir={tmp_path}", "--debug"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0 and "Traceback" in out.stderr and "depht" in out.stderr


def test_help_lists_tasks_and_config_files():
    out = subprocess.run([PY, "-m", "radnet.main", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    text = out.stdout + out.stderr
    for word in ("pretrain", "evaluate", "segment", "configs/pretrain.py", "configs/liver.py",
                 "--print_config"):
        assert word in text, word


def test_print_config_needs_no_workdir():
    out = subprocess.run([PY, "-m", "radnet.main", "--config=configs/pretrain.py:tiny",
                          "--print_config"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert "dispatch: task 'pretrain'" in out.stdout


def test_library_info_is_quiet_and_expected_warnings_are_dropped():
    """radnet.cli's filter: INFO only from the project's code, WARNING from anyone but the
    expected ones (Orbax's restore notes), everything with --verbosity=1."""
    import logging

    from absl import flags

    from radnet import cli

    def record(path, level, msg):
        return logging.LogRecord("absl", level, path, 1, msg, None, None)

    site = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    own = str(ROOT / "radnet" / "train" / "loop.py")
    quiet = cli._QuietLibraries()
    assert not quiet.filter(record(site, logging.INFO, "Saving checkpoint"))
    assert quiet.filter(record(own, logging.INFO, "step 100/1500"))
    assert quiet.filter(record(site, logging.WARNING, "disk nearly full"))
    assert not quiet.filter(record(site, logging.WARNING,
                                   "Sharding info not provided when restoring"))
    assert not quiet.filter(record(site, logging.WARNING,
                                   'Item "data_iter" could not be restored'))
    assert not quiet.filter(record(site, logging.WARNING,
                                   "Given directory is read only=/runs/x/checkpoints"))
    # a .venv inside the checkout is still a library
    venv = str(ROOT / ".venv" / "lib" / "site-packages" / "orbax" / "x.py")
    assert not quiet.filter(record(venv, logging.INFO, "Saving"))
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", "--verbosity=1"])
    try:
        assert quiet.filter(record(site, logging.INFO, "Saving checkpoint"))
    finally:
        flags.FLAGS.unparse_flags()


def test_eta_ignores_the_compiling_first_interval(monkeypatch):
    from radnet.train import logging_utils

    clock = iter([0.0, 60.0, 70.0, 80.0])  # 60 s of compile + 50 steps, then 10 s per 50 steps
    monkeypatch.setattr(logging_utils.time, "perf_counter", lambda: next(clock))
    t = logging_utils.Throughput(global_batch_size=8, total_steps=1000, start_step=0)
    assert logging_utils.format_eta(t.report(50)["eta_s"]) == "?"
    assert t.report(100)["eta_s"] == pytest.approx(900 / 5.0)   # 5 steps/s steady
    assert t.report(150)["eta_s"] == pytest.approx(850 / 5.0)


def test_dasks_busy_port_warning_is_dropped_and_others_kept():
    import warnings

    from absl import flags

    from radnet import cli

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog"])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli.quiet_libraries()
            warnings.warn("Port 8787 is already in use.\nPerhaps you already have a cluster "
                          "running?", UserWarning)
            warnings.warn("a real problem", UserWarning)
    finally:
        flags.FLAGS.unparse_flags()
    assert [str(w.message) for w in caught] == ["a real problem"]
