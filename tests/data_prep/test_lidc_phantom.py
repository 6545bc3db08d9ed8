"""Phantom chest CTs → data_prep.lidc: every truth nodule recovered with its reader count
and median malignancy exactly; every file, XML and annotation accounted for."""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import slicegroups as sg_config
from data_prep.index import salt as salt_lib
from data_prep.lidc import build
from data_prep.phantoms import chest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_lidc(root, studies=4):
    """Phantom archive (``root/lidc``) with three stray inputs, built into ``root/ds``."""
    summary = chest.generate(str(root / "lidc"), studies, seed=0)
    extra = root / "lidc" / "extra"
    extra.mkdir()
    (extra / "broken.xml").write_text("<LidcReadMessage><ResponseHeader>")
    (extra / "cxr.xml").write_text("<IdriReadMessage><ResponseHeader/></IdriReadMessage>")
    (extra / "notes.txt").write_text("not an image")
    orphan = root / "lidc" / "extra" / "orphan.xml"
    chest.readxml.write(str(orphan), "2.25.1", "2.25.2", [[
        {"kind": "non_nodule", "id": "x", "z_mm": 0.0, "sop_uid": "2.25.3", "xy": (5, 6)}]],
        namespace=False)
    salt = root / "salt"
    salt.write_text("0123456789abcdef0123456789abcdef\n")
    secret = salt_lib.load_salt(str(salt))
    config = sg_config.get_config()
    build.build(str(root / "lidc"), str(root / "ds"), config, secret)
    return summary, secret


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc")
    summary, secret = make_lidc(root)
    return root, summary, secret


def test_every_truth_nodule_recovered_exactly(built):
    root, summary, secret = built
    studies = {r["study"]: r for r in _rows(root / "lidc" / "truth" / "studies.csv")}
    truth = _rows(root / "lidc" / "truth" / "nodules.csv")
    got = _rows(root / "ds" / "nodules.csv")
    assert summary["nodules"] >= 3 and len(got) == len(truth)
    assert {int(r["namespace"]) for r in studies.values()} == {0, 1}   # both XML forms
    for t in truth:
        key = build.series_key(secret, studies[t["study"]]["series_uid"])
        centre = np.array([float(t[k]) for k in ("x_mm", "y_mm", "z_mm")])
        mine = [g for g in got if g["series_key"] == key]
        g = min(mine, key=lambda g: np.linalg.norm(
            np.array([float(g[k]) for k in ("x_mm", "y_mm", "z_mm")]) - centre))
        assert np.linalg.norm(np.array([float(g[k]) for k in ("x_mm", "y_mm", "z_mm")])
                              - centre) < max(float(t["diameter_mm"]), 5.0)
        assert int(g["n_readers"]) == int(t["n_readers"]), t
        assert g["malignancy_ratings"] == t["ratings"], t
        if t["kind"] == "nodule":
            assert g["kind"] == "nodule"
            assert float(g["malignancy_median"]) == float(t["malignancy_median"]), t
            assert float(g["z_min_mm"]) == pytest.approx(float(t["z_min_mm"]), abs=0.01)
            assert float(g["z_max_mm"]) == pytest.approx(float(t["z_max_mm"]), abs=0.01)
            assert 0 < float(g["diameter_mm"]) < 1.5 * float(t["diameter_mm"]) + 6
        else:
            assert g["kind"] == "small_nodule" and g["malignancy_median"] == ""
    assert any(int(t["n_readers"]) == 3 for t in truth if t["kind"] == "nodule")


def test_every_input_has_a_row(built):
    root, _, _ = built
    on_disk = sorted(os.path.relpath(os.path.join(d, f), root / "lidc")
                     for d, _, fs in os.walk(root / "lidc") for f in fs)
    files = _rows(root / "ds" / "files.csv")
    assert sorted(r["path"] for r in files) == on_disk
    reasons = {r["path"]: r["reason"] for r in files}
    assert reasons["extra/notes.txt"] == "not_dicom"
    assert reasons["truth/nodules.csv"] == "not_dicom"
    xml = {r["path"]: r for r in _rows(root / "ds" / "xml.csv")}
    assert xml["extra/broken.xml"]["reason"] == "xml_parse_error"
    assert xml["extra/cxr.xml"]["reason"] == "not_a_ct_reading"
    assert xml["extra/orphan.xml"]["reason"] == "no_matching_series"
    included = [r for r in xml.values() if r["status"] == "included"]
    assert len(included) == 4
    ann = _rows(root / "ds" / "annotations.csv")
    assert len(ann) == sum(int(r["n_annotations"]) for r in xml.values())
    assert [r["reason"] for r in ann if r["xml_path"] == "extra/orphan.xml"] == [
        "xml_no_matching_series"]
    assert all(r["status"] in ("included", "excluded") for r in ann)
    assert {r["kind"] for r in ann} == {"nodule", "small_nodule", "non_nodule"}
    manifest = _rows(root / "ds" / "manifest.csv")
    assert [r["status"] for r in manifest] == ["included"] * 4
    assert sorted(r["split"] for r in manifest) == ["test", "train", "train", "val"]


def test_outputs_hold_no_uid_or_name(built):
    root, _, _ = built
    secrets = set()
    for r in _rows(root / "lidc" / "truth" / "studies.csv"):
        secrets |= {r["series_uid"], r["study_uid"]}
    for name in ("manifest.csv", "files.csv", "xml.csv", "annotations.csv", "nodules.csv"):
        text = (root / "ds" / name).read_text()
        assert not any(s in text for s in secrets), name
        assert "2.25." not in text and "Nodule 00" not in text, name


def test_missing_root_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep.lidc", f"--lidc_root={tmp_path}/no",
                        f"--out={tmp_path}/ds", f"--salt_file={tmp_path}/salt"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("radnet: error: --lidc_root=")


def test_nodules_show_their_diameter():
    """At its widest slice a nodule of ≥ 8 mm covers at least half the disc of its diameter
    whatever its shape: the diameter is the solid extent a reader outlines (lobes and spikes
    on a core of most of it), not a halo around a core of a few pixels."""
    checked = set()
    for k in range(12):
        plan = chest.plan_study(0, k)
        for nod in plan["nodules"]:
            sh = nod["shape"]
            if nod["kind"] != "nodule" or sh.d < 8:
                continue
            area = max(m.sum() for m in chest._nodule_masks(plan, nod).values())
            disc = np.pi * (sh.d / 2) ** 2 / plan["pix"] ** 2
            assert area >= 0.5 * disc, (k, sh.kind, sh.d, int(area), round(disc, 1))
            checked.add(sh.kind)
    assert checked == set(chest.SHAPES)


def test_partial_volume_keeps_a_nodules_volume():
    """Each voxel holds the share of the nodule inside it: the nodule's HU excess over the
    same study rendered without it, summed, is its volume × contrast — for a 2.5 mm nodule
    (smaller than a voxel) as for a 29 mm one. Nodules touching a vessel are not checked
    (the vessel hides part of them)."""
    sizes = []
    for k in range(4):
        plan = chest.plan_study(0, k)
        vol = chest.render(plan)
        for nod in plan["nodules"]:
            if nod["shape"].kind not in ("smooth", "small"):
                continue
            without = chest.render(dict(plan, nodules=[n for n in plan["nodules"]
                                                       if n is not nod]))
            share = (vol - without) / (nod["hu"] - without)
            if without[share > 0.01].max() > -500:
                continue
            semi_axes = nod["shape"].parts[0][1]
            want = 4 / 3 * np.pi * np.prod(semi_axes)
            got = share.sum() * plan["pix"] ** 2 * plan["dz"]
            assert got == pytest.approx(want, rel=0.1), (k, nod["shape"].d)
            assert share.max() <= 1.1
            sizes.append(nod["shape"].d)
    assert min(sizes) < 3 and max(sizes) > 20
