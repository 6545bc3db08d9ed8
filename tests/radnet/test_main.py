"""The entrypoint parses configs and overrides and reaches the task dispatch."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs import common
from radnet import main as radnet_main

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "radnet.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_helpfull_lists_config_flags():
    out = _run("--helpfull")
    assert out.returncode in (0, 1), out.stderr  # absl exits 1 after printing help
    text = out.stdout + out.stderr
    for flag in ("--config:", "--config.<field>=value", "--workdir:", "print_config"):
        assert flag in text, flag


def test_command_line_overrides_parse(tmp_path):
    out = _run("--config=configs/pretrain.py", "--config.train.batch_size=3",
               f"--workdir={tmp_path}", "--print_config")
    assert out.returncode == 0, out.stderr
    assert '"batch_size": 3' in out.stdout
    assert "dispatch: task 'pretrain' -> radnet.train.pretrain:run" in out.stdout


def test_overrides_and_config_args_reach_dispatch(monkeypatch, tmp_path):
    """Flags are parsed in-process and the dispatched task sees the overridden config."""
    seen = {}

    def fake_resolve(task):
        def task_fn(config, workdir):
            seen.update(task=task, batch_size=config.train.batch_size,
                        depth=config.model.depth, norm=config.model.norm, workdir=workdir)
            return 0
        return task_fn

    monkeypatch.setattr(radnet_main, "resolve_task", fake_resolve)
    from absl import flags
    argv = ["radnet.main", f"--config={ROOT}/configs/pretrain.py:depth=18,norm=group",
            "--config.train.batch_size=3", f"--workdir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides from sys.argv
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
        assert radnet_main.main([argv[0]]) == 0
    finally:
        flags.FLAGS.unparse_flags()
    assert seen == {"task": "pretrain", "batch_size": 3, "depth": 18, "norm": "group",
                    "workdir": str(tmp_path)}


def test_unknown_task_exits_nonzero_with_one_line(tmp_path):
    out = _run("--config=configs/pretrain.py", "--config.task=nonexistent", f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert "unknown task 'nonexistent'" in out.stderr


def test_parse_arg_types_and_typos():
    arg = common.parse_arg("depth=18,tiny,lr=0.5,name=x", depth=50, tiny=False, lr=1.0, name="y")
    assert (arg.depth, arg.tiny, arg.lr, arg.name) == (18, True, 0.5, "x")
    with pytest.raises(KeyError, match="unknown config argument 'dpeth'"):
        common.parse_arg("dpeth=3", depth=50)


def test_a_missing_input_is_one_line_and_exit_2(tmp_path):
    out = _run(f"--config=configs/liver.py:tiny,dataset={tmp_path}/none,pretrained={tmp_path}/no_run",
               f"--workdir={tmp_path}/w")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [l for l in out.stderr.splitlines() if l.startswith("radnet: error:")]
    assert len(errors) == 1 and "no_run" in errors[0] and "config.json" in errors[0]


def test_a_config_the_run_cannot_honour_is_one_line_and_exit_2(tmp_path):
    from tests.radnet.test_train import make_dataset
    dataset = make_dataset(str(tmp_path / "ds"))
    out = _run(f"--config=configs/pretrain.py:tiny,dataset={dataset}",
               "--config.checkpoint.best_metric=val/los", f"--workdir={tmp_path}/w")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "radnet: error: config.checkpoint.best_metric='val/los'" in out.stderr


def test_config_json_gets_absolute_paths(tmp_path, monkeypatch):
    """Relative dataset/checkpoint paths that exist become absolute before the task sees the
    config (and writes config.json); URLs and missing paths stay as typed."""
    import importlib
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "run").mkdir()
    config = importlib.import_module("configs.liver").get_config("tiny,dataset=ds,pretrained=run")
    config.proposal.path = "missing.csv"
    radnet_main.absolute_paths(config)
    assert config.dataset == str(tmp_path / "ds")
    assert config.pretrained.workdir == str(tmp_path / "run")
    assert config.proposal.path == "missing.csv"
    config = importlib.import_module("configs.evaluate").get_config("tiny")
    config.checkpoint, config.dataset = "gs://bucket/run", "ds"
    radnet_main.absolute_paths(config)
    assert config.checkpoint == "gs://bucket/run" and config.dataset == str(tmp_path / "ds")
