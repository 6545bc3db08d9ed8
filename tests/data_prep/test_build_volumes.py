"""data_prep.build_volumes: the dataset, manifest and reasons, resume on a LocalCluster and after kill -9,
and the phantom PACS end to end (index → volumes equal to the phantom's reference).

The expected volumes are computed independently of the builder
(data_prep.phantoms.volume_synth.reference_uint8: scipy's map_coordinates, numpy min-max).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tensorstore as ts

from configs import build_volumes as config_lib
from data_prep.phantoms import volume_synth as synth
from data_prep.phantoms.volume_synth import fill_padded, reference_uint8
from data_prep.volumes import builder as volume_builder
from radnet import labels
from radnet.data import schema

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- the dataset


def make_archive(root: Path, num_series: int = 6, n_slices=None, size: int = 32, seed: int = 0):
    """A small archive + index; returns the truths per series key."""
    rng = np.random.default_rng(seed)
    dicom, series, truths = root / "dicom", [], {}
    views = (synth.AXIAL, synth.CORONAL, synth.SAGITTAL)
    for k in range(num_series):
        n = n_slices or int(rng.integers(6, 40))
        spacing = 30.0 if k == 3 else float(rng.choice([1.0, 2.5, 5.0]))
        paths, truth = synth.write_body_series(
            str(dicom / f"s{k}"), n, size, size, orientation=views[k % 3], slice_spacing_mm=spacing,
            slopes=rng.choice([1.0, 2.0], n), enhanced=(k == 4), rng=rng)
        key = f"{rng.bytes(8).hex()}"
        truths[key] = truth
        series.append(dict(series_key=key, paths=paths, patient_key=f"p{k % 4}",
                           split=labels.SPLITS[k % 3], view=labels.VIEW[k % 3],
                           coverage="liver;kidney" if k % 2 else ""))
    bad = dicom / "s0" / "broken"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02" * 40)  # an unreadable file inside series 0
    series[0]["paths"].append(str(bad))
    synth.write_index(str(root / "index"), str(dicom), series)
    return truths


def tiny_config(**kw):
    config = config_lib.get_config("tiny")
    config.volume_shape = (8, 16, 16)
    config.min_slices = 4
    config.update(kw)
    return config


def read_dataset(path) -> dict:
    arrays = schema.open_arrays(str(path))
    out = {name: arr.read().result() for name, arr in arrays.items()}
    for name in ("manifest.csv", "errors.csv", "summary.json"):
        out[name] = (Path(path) / name).read_text()
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name


def test_build_writes_dataset_manifest_and_reasons(tmp_path):
    truths = make_archive(tmp_path)
    out = tmp_path / "ds"
    run = volume_builder.build(str(tmp_path / "index"), str(tmp_path / "dicom"), str(out),
                               tiny_config(), workers=0, progress=False)
    assert run["finalized"] and run["dataset"]["num_series"] == 6
    data = read_dataset(out)
    rows = list(csv.DictReader(data["manifest.csv"].splitlines()))
    assert list(rows[0]) == list(volume_builder.MANIFEST_COLUMNS)
    assert [r["series_key"] for r in rows] == sorted(truths)
    for i, r in enumerate(rows):
        assert int(r["index"]) == i
        if r["status"] == "included":
            ref = reference_uint8(truths[r["series_key"]], (8, 16, 16))
            assert np.abs(data["volume"][i].astype(int) - ref).max() <= 2
            assert data["split"][i] == labels.split_index(r["split"])
            assert data["effective_spacing_mm"][i] == pytest.approx(float(r["effective_spacing_mm"]), abs=1e-3)
        else:
            assert data["split"][i] == -1 and r["split"] == ""
            assert not data["volume"][i].any()
        assert data["view"][i] == labels.to_index("view", r["view"])
        assert list(data["coverage"][i]) == labels.coverage_to_multihot(r["coverage"])
    reasons = {r["reason"] for r in rows if r["status"] == "excluded"}
    assert reasons == {"decode_failed", "spacing_too_large"}
    # No PHI and no paths anywhere in the outputs.
    for name in ("manifest.csv", "errors.csv", "summary.json"):
        assert str(tmp_path) not in data[name] and "SYNTH" not in data[name] and "dicom" not in data[name]
    # Readable by zarr-python and plain TensorStore alike.
    import zarr  # requirements-dev.txt
    group = zarr.open_group(schema.zarr_root(str(out)), mode="r")
    np.testing.assert_array_equal(group["volume"][:], data["volume"])
    assert group.attrs["volume_shape"] == [8, 16, 16]
    plain = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / schema.ZARR_GROUP / "split")}}).result()
    np.testing.assert_array_equal(plain.read().result(), data["split"])


def test_multi_stack_file_builds_the_series_of_its_index_row(tmp_path):
    """An enhanced file holding an axial and a coronal stack, listed by the index once
    (under the coronal series): that series builds, the axial one has no files."""
    both, _ = synth.write_two_stack_file(str(tmp_path))
    synth.write_index(str(tmp_path / "index"), str(tmp_path), [
        dict(series_key="a" * 32, paths=[], orientation="1;0;0;0;1;0"),
        dict(series_key="c" * 32, paths=[both], orientation=";".join(map(str, synth.CORONAL)))])
    run = volume_builder.build(str(tmp_path / "index"), str(tmp_path), str(tmp_path / "ds"),
                               tiny_config(), progress=False)
    errors = (tmp_path / "ds" / "errors.csv").read_text()
    assert run["dataset"]["built"] == 1 and "files.csv lists no included file" in errors


def test_resume_on_a_local_cluster_reproduces_single_build(tmp_path):
    make_archive(tmp_path, num_series=5, n_slices=10)
    index, dicom = str(tmp_path / "index"), str(tmp_path / "dicom")
    volume_builder.build(index, dicom, str(tmp_path / "one"), tiny_config(), progress=False)
    pooled = tmp_path / "pooled"
    first = volume_builder.build(index, dicom, str(pooled), tiny_config(), workers=2,
                                 progress=False)  # a LocalCluster of 2 processes
    assert first["finalized"] and first["series_this_run"] == 5
    assert_same(read_dataset(tmp_path / "one"), read_dataset(pooled))
    # Two series without their done marker (as if their worker was lost with the
    # write in flight): only they are built again, and the dataset is the same.
    for i in (1, 3):
        (pooled / "_build" / "done" / f"{i:09d}.json").unlink()
    second = volume_builder.build(index, dicom, str(pooled), tiny_config(), progress=False)
    assert second["finalized"] and second["series_this_run"] == 2
    assert_same(read_dataset(tmp_path / "one"), read_dataset(pooled))
    again = volume_builder.build(index, dicom, str(pooled), tiny_config(), progress=False)
    assert again["series_this_run"] == 0
    with pytest.raises(ValueError, match="--overwrite"):
        volume_builder.build(index, dicom, str(pooled), tiny_config(normalise="percentile"),
                             progress=False)


def test_kill_minus_9_then_rerun_gives_identical_dataset(tmp_path):
    make_archive(tmp_path, num_series=24, n_slices=12, size=48)
    index, dicom = str(tmp_path / "index"), str(tmp_path / "dicom")
    reference = tmp_path / "uninterrupted"
    volume_builder.build(index, dicom, str(reference), tiny_config(), progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep.build_volumes", f"--index={index}",
           f"--dicom_root={dicom}", f"--out={out}", "--workers=2", "--noprogress",
           "--config=configs/build_volumes.py:tiny", "--config.volume_shape=(8,16,16)"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = out / "_build" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(list(markers.glob("*.json"))) >= 3:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, mid-build
    assert proc.wait() == -signal.SIGKILL, "the build ended before it could be killed"
    done_at_kill = len(list(markers.glob("*.json")))  # not TensorStore's temporary files
    assert 3 <= done_at_kill < 24
    assert not (out / "manifest.csv").exists()
    # Before every series is done, nothing is usable for training.
    assert np.all(schema.read_labels(str(out))["split"] == -1)
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["finalized"] and summary["series_this_run"] == 24 - done_at_kill
    assert_same(read_dataset(reference), read_dataset(out))


# --------------------------------------------------------------- phantom acceptance


@pytest.fixture(scope="module")
def phantom_archive(tmp_path_factory):
    from data_prep.phantoms import pacs
    out = tmp_path_factory.mktemp("phantom_pacs")
    pacs.generate(str(out), patients=3, seed=4, lits_cases=0, workers=1)
    return out


def real_index(archive: Path, index_dir: Path) -> tuple[list[dict], list[dict]]:
    """Runs data_prep.index (its command line, salt file in the temporary folder).

    Through the command line on purpose: the builder must accept what a user's index run
    writes, flags and all.
    Returns (files.csv rows, series.csv rows).
    """
    salt = index_dir.parent / "salt"
    salt.write_text("volume-builder-test-salt-0123456789\n")
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.index", f"--dicom_root={archive / 'dicom'}",
         f"--out={index_dir}", "--workers=0", f"--salt_file={salt}", "--noprogress",
         f"--collections={archive / 'collections.csv'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [list(csv.DictReader(open(index_dir / name))) for name in ("files.csv", "series.csv")]
    return rows[0], rows[1]


def padded_pixels(first_file: Path, physical: np.ndarray) -> np.ndarray:
    """bool mask of a reference volume's padded pixels, by the standard's rule.

    reference_volume gives physical values (GE padding -2000 → -3024 HU); padding is
    defined on stored values, so the values are mapped back with the file's rescale
    (the phantom's CT rescale is the same for every slice) and compared there.
    """
    ds = pydicom.dcmread(first_file, stop_before_pixels=True)
    if "PixelPaddingValue" not in ds:
        return np.zeros(physical.shape, bool)
    stored = np.rint((physical.astype(np.float64) - float(ds.get("RescaleIntercept", 0)))
                     / float(ds.get("RescaleSlope", 1)))
    low = high = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        low, high = sorted((low, int(ds.PixelPaddingRangeLimit)))
    return (stored >= low) & (stored <= high)


def test_phantom_pacs_volumes_match_reference(phantom_archive, tmp_path):
    """The real index of the phantom PACS → every included series builds and matches its reference."""
    from data_prep.phantoms.pacs import reference_volume

    files, series = real_index(phantom_archive, tmp_path / "index")
    # Index series ↔ phantom truth, through the truth's first file of each series.
    key_of = {r["path"]: r["series_key"] for r in files}
    truth = {key_of[t["first_file"]]: t for t in csv.DictReader(open(phantom_archive / "truth.csv"))}
    included = {r["series_key"]: r for r in series if r["status"] == "included"}
    assert included and set(included) <= set(truth)
    assert {truth[k]["view"] for k in included} == set(labels.VIEW)
    shape = (48, 32, 32)  # the paper's 48 slices, so truth's effective spacing applies
    config = config_lib.get_config("size=32")
    run = volume_builder.build(str(tmp_path / "index"), str(phantom_archive / "dicom"),
                               str(tmp_path / "ds"), config, workers=0, progress=False)
    assert run["finalized"]
    # Every series the index includes builds: no decode failure, no geometry rejection.
    assert run["dataset"]["built"] == len(included) and run["dataset"]["excluded"] == {}
    data = read_dataset(tmp_path / "ds")
    rows = list(csv.DictReader(data["manifest.csv"].splitlines()))
    assert [r["series_key"] for r in rows] == sorted(included)
    padded_series = 0
    for i, r in enumerate(rows):
        t, s = truth[r["series_key"]], included[r["series_key"]]
        assert r["status"] == "included", (t["series_id"], r["reason"])
        # The builder's re-measured geometry agrees with the index's header reading.
        for col in ("n_slices", "rows", "columns"):
            assert r[col] == s[col], (t["series_id"], col)
        for col in ("slice_spacing_mm", "effective_spacing_mm"):
            assert float(r[col]) == pytest.approx(float(s[col]), abs=0.01), (t["series_id"], col)
            assert float(r[col]) == pytest.approx(float(t[col]), abs=0.01), (t["series_id"], col)
        assert data["split"][i] == labels.split_index(s["split"])
        ref = reference_volume(str(phantom_archive), t["series_id"])
        assert int(r["n_slices"]) == ref.shape[0] and (int(r["rows"]), int(r["columns"])) == ref.shape[1:]
        padded = padded_pixels(phantom_archive / "dicom" / t["first_file"], ref)
        if padded.any():
            padded_series += 1
            ref = fill_padded(ref, padded)
        expected = reference_uint8(ref, shape)
        got = data["volume"][i].astype(int)
        diff = np.abs(got - expected).max()
        corr = np.corrcoef(got.ravel(), expected.ravel())[0, 1]
        assert diff <= 2, (t["series_id"], diff, corr)  # same interpolation: must agree closely
    assert padded_series > 0  # GE-style axial CT with padding outside the circle was built
