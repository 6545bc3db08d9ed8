"""Training faults caught where they start (issue 16, points 3 and 10): a non-finite state is
never saved, and config mistakes stop the run before any step."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from radnet.train import checkpoint as ckpt_lib
from radnet.train import loop, pretrain
# compilation_cache (autouse): the session's persistent cache, where test_train's runs of
# the same tiny configs left their compiled steps.
from tests.radnet.test_train import compilation_cache, dataset, tiny_config  # noqa: F401  (fixtures)


def test_nan_guard_never_saves_a_non_finite_state(dataset, tmp_path):  # noqa: F811
    workdir = str(tmp_path / "run")
    good = {"checkpoint.every_steps": 1, "eval.every_steps": 0, "checkpoint.keep_best": 0,
            "checkpoint.async_save": False}
    pretrain.run(tiny_config(dataset, **good, **{"train.stop_at_step": 2}), workdir)
    assert ckpt_lib.steps(workdir) == [1, 2]
    # The same run resumed at a learning rate that overflows float32: the update of step 3
    # makes every parameter non-finite while the loss of step 3 (computed before it) is fine.
    with pytest.raises(loop.NonFiniteLossError, match="not finite after step 3"):
        pretrain.run(tiny_config(dataset, **good, **{
            "optimizer.lr": 1e39, "schedule.name": "constant"}),
            workdir)
    assert ckpt_lib.steps(workdir) == [1, 2]
    for step in (1, 2):
        _, variables, _ = ckpt_lib.load_variables(workdir, step)
        assert bool(loop.all_finite(variables))
    assert not bool(loop.all_finite({"a": np.array([1.0, np.inf], np.float32)}))


@pytest.mark.parametrize("overrides, message", [
    ({"eval.split": "train"}, "best_metric='val/loss' is not a metric this run evaluates"),
    ({"checkpoint.best_metric": "val/los"}, "'val/los' is not a metric this run evaluates"),
    ({"train.num_steps": -5}, "num_steps=-5: train at least 1 step"),
    ({"checkpoint.every_steps": -1}, "checkpoint.every_steps=-1"),
])
def test_config_mistakes_stop_before_any_step(dataset, tmp_path, overrides, message):  # noqa: F811
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        pretrain.run(tiny_config(dataset, **overrides), str(workdir))
    if "best_metric" in message:   # the ways out are named
        assert "/sequence/accuracy" in str(error.value)
    assert not workdir.exists() or not os.listdir(workdir)   # nothing trained, nothing written


def test_every_pretraining_metric_name_is_declared(dataset, tmp_path):  # noqa: F811
    """METRIC_NAMES (what best_metric is checked against) covers what evaluate returns."""
    workdir = str(tmp_path / "run")
    pretrain.run(tiny_config(dataset, **{"train.num_steps": 1, "eval.every_steps": 1,
                                         "checkpoint.every_steps": 1}), workdir)
    from radnet.train import logging_utils
    val = [m for m in logging_utils.read_metrics(workdir) if m["split"] == "val"][0]
    returned = set(val) - {"step", "split"}
    assert returned <= set(pretrain.METRIC_NAMES), returned - set(pretrain.METRIC_NAMES)
    assert {"loss", "sequence/accuracy", "coverage/exact_match"} <= returned


def test_the_best_checkpoint_survives_a_resume(dataset, tmp_path):  # noqa: F811
    """Issue 16 point 4: Orbax kept no metrics on disk (its metadata said "metrics": {}), so a
    resumed run saw its best step as metric-less and deleted it at the next save."""
    workdir = str(tmp_path / "run")
    common = {"train.num_steps": 4, "eval.every_steps": 2, "checkpoint.every_steps": 1,
              "checkpoint.keep_latest": 1, "checkpoint.keep_best": 1,
              "checkpoint.async_save": False}
    pretrain.run(tiny_config(dataset, **common, **{"train.stop_at_step": 2}), workdir)
    assert ckpt_lib.steps(workdir) == [2]           # evaluated at 2: best and latest
    pretrain.run(tiny_config(dataset, **common, **{"train.stop_at_step": 3}), workdir)
    assert ckpt_lib.steps(workdir) == [2, 3]        # 3 is the latest; 2, the best, stays
    assert ckpt_lib.best_step(workdir) == 2         # its metric was read back from disk
    with ckpt_lib._reader(workdir) as manager:
        assert set(manager.metrics(2)) >= {"val/loss"} and manager.metrics(3) is None
