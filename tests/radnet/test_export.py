"""radnet.export: a real (tiny) pretraining run → one safetensors file → radnet.pretrained.load
gives the same model, the same arrays and the same predictions, bit for bit; the model card
says what the file is, with counts only; mistakes are one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from configs import pretrain as pretrain_config
from radnet import export, labels, pretrained
from radnet.data import schema
from radnet.interop import weightsfile
from radnet.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOLUME_SHAPE = (16, 32, 32)       # the smallest the radnet variant takes
SPLITS = {"train": 6, "val": 2}


def _write_dataset(path: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = sum(SPLITS.values())
    arrays = schema.create(path, n, volume_shape=VOLUME_SHAPE, codec="raw")
    arrays["volume"].write(rng.integers(0, 255, (n, *VOLUME_SHAPE)).astype(np.uint8)).result()
    values = dict(
        sequence=np.array([0, 0, 1, 2, -1, 4, 3, 1], np.int8),
        view=rng.integers(0, len(labels.VIEW), n).astype(np.int8),
        contrast=np.array([0, 1, 1, -1, 0, 1, 0, 0], np.int8),
        coverage=rng.integers(0, 2, (n, len(labels.COVERAGE))).astype(np.int8),
        effective_spacing_mm=np.array([1, 2, np.nan, 4, 5, 6, 7, 8], np.float32),
        split=np.array([0] * SPLITS["train"] + [1] * SPLITS["val"], np.int8))
    for name, v in values.items():
        arrays[name].write(v).result()
    return values


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, label arrays): 2 steps, checkpoints at 1 and 2, validation at 2."""
    from radnet.train import pretrain

    root = tmp_path_factory.mktemp("export")
    dataset = str(root / "dataset")
    values = _write_dataset(dataset)
    config = pretrain_config.get_config(f"tiny,dataset={dataset}")
    config.model.width = 4
    config.train.num_steps = 2
    config.eval.every_steps = 2
    config.checkpoint.every_steps = 1
    config.model.bn_momentum = 0.0       # trained running statistics, so they matter
    workdir = str(root / "run")
    assert pretrain.run(config, workdir) in (0, None)
    assert ckpt_lib.steps(workdir) == [1, 2]
    return workdir, values


def _volumes(batch=2, seed=1):
    return np.random.default_rng(seed).integers(0, 255, (batch, *VOLUME_SHAPE)).astype(np.uint8)


def test_round_trip_gives_identical_arrays_and_predictions(run, tmp_path):
    workdir, _ = run
    out = str(tmp_path / "radnet.safetensors")
    card = export.export(workdir, out)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask   # shareable, as the umask allows
    from_run, from_file = pretrained.load(workdir), pretrained.load(out)
    assert from_file.step == from_run.step == card["source_step"]
    assert from_file.config.model.to_dict() == from_run.config.model.to_dict()
    assert type(from_file.model) is type(from_run.model) and from_file.model == from_run.model
    a, b = ckpt_lib.flatten(from_run.variables), ckpt_lib.flatten(from_file.variables)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))
    volumes = _volumes()
    run_out, file_out = from_run.apply(volumes), from_file.apply(volumes)
    for head in labels.HEADS:
        assert np.asarray(run_out[head]).tobytes() == np.asarray(file_out[head]).tobytes(), head
    # The encoder alone too: same module, same embedding bytes.
    (enc_a, var_a), (enc_b, var_b) = from_run.encoder(), from_file.encoder()
    assert enc_a == enc_b
    x = volumes[..., None].astype(np.float32) / 255
    emb_a = enc_a.apply(var_a, x, train=False)[0]
    emb_b = enc_b.apply(var_b, x, train=False)[0]
    assert np.asarray(emb_a).tobytes() == np.asarray(emb_b).tobytes()
    assert np.abs(np.asarray(emb_a)).sum() > 0


def test_names_are_flat_and_documented_and_the_card_tells_what_the_file_is(run, tmp_path):
    workdir, values = run
    out = str(tmp_path / "step1.safetensors")
    export.export(workdir, out, step=1)
    with safe_open(out, framework="numpy") as f:
        names = set(f.keys())
        card = json.loads(f.metadata()[weightsfile.CARD_KEY])
    assert "params.encoder.block1.unit1.conv1.kernel" in names
    assert "params.encoder.stem.conv.kernel" in names
    assert "batch_stats.encoder.stem.norm.mean" in names and "params.heads.sequence.kernel" in names
    assert all(n.split(".")[0] in ("params", "batch_stats") for n in names)
    assert card["format"] == weightsfile.FORMAT and card["source_step"] == 1
    assert pretrained.load(out).step == 1
    assert card["radnet_version"] and card["model_name"] == "radnet"
    assert card["model"]["depth"] == 10 and card["model"]["width"] == 4
    assert card["labels"]["heads"] == list(labels.HEADS)
    assert card["labels"]["classes"]["sequence"] == list(labels.SEQUENCE)
    assert card["labels"]["classes"]["coverage"] == list(labels.COVERAGE)
    assert card["preprocessing"]["volume_shape"] == list(VOLUME_SHAPE)
    assert "/ 255" in card["preprocessing"]["normalisation"]
    training = card["training"]
    assert training["num_steps"] == 2 and training["task"] == "pretrain"
    counts = training["label_counts"]
    assert counts["volumes"] == {"train": 6, "val": 2, "test": 0}
    train = slice(0, SPLITS["train"])           # the first six volumes are the training split
    seq = values["sequence"][train]
    assert counts["sequence"] == {**{n: int((seq == i).sum()) for i, n in enumerate(labels.SEQUENCE)},
                                  "unknown": 1}
    assert counts["contrast"] == {"no_contrast": 2, "contrast": 3, "unknown": 1}
    assert counts["coverage"]["brain"] == int((values["coverage"][train, 0] == 1).sum())
    assert counts["slice_spacing"] == {"known": 5, "unknown": 1}
    # Counts only: the card holds no paths (the dataset's, the workdir's) or identifiers.
    text = json.dumps(card)
    assert workdir not in text and "dataset" not in json.dumps(card["model"])
    assert os.path.dirname(workdir) not in text


def test_a_run_whose_dataset_is_gone_still_exports_and_says_why_counts_are_missing(run, tmp_path):
    workdir, _ = run
    p = pretrained.load(workdir)
    config = p.config.copy_and_resolve_references()
    config.dataset = str(tmp_path / "moved-away")
    card = export.model_card(pretrained.Pretrained(config, p.model, p.variables, p.step, workdir))
    assert card["training"]["label_counts"] is None
    assert "not readable" in card["training"]["label_counts_note"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "radnet.export", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_command_line_writes_the_file_and_mistakes_are_one_line_exit_2(run, tmp_path):
    workdir, _ = run
    out = str(tmp_path / "cli.safetensors")
    done = _cli(f"--workdir={workdir}", "--step=2", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert pretrained.load(out).step == 2
    done = _cli(f"--workdir={tmp_path / 'nowhere'}", f"--out={out}")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in done.stderr, lines
    # The other mistakes, in process (each is the one line the command prints).
    with pytest.raises(ValueError, match="no checkpoint at step 7"):
        export.export(workdir, out, step=7)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export.export(workdir, str(tmp_path / "x.pt"))


def test_loading_a_file_that_is_not_radnet_weights_is_one_clear_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pretrained.load(str(junk))
    foreign = str(tmp_path / "foreign.safetensors")
    from safetensors.numpy import save_file
    save_file({"conv1.weight": np.zeros((2, 1, 7, 7, 7), np.float32)}, foreign)
    with pytest.raises(ValueError, match="without a radnet model card.*radnet.interop.convert"):
        pretrained.load(foreign)
