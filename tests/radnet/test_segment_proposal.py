"""Region proposal: window placement, selection rule, and the right window on a synthetic case."""

import numpy as np
import pytest

from data_prep.lits import build as lits_build
from radnet.data import lits
from radnet import proposal


def test_window_starts():
    assert proposal.window_starts(100, 48, 8) == [0, 8, 16, 24, 32, 40, 48, 52]
    assert proposal.window_starts(96, 48, 8) == [0, 8, 16, 24, 32, 40, 48]
    assert proposal.window_starts(48, 48, 8) == [0]
    assert proposal.window_starts(40, 48, 8) == [-4]       # centred, 4 blank slices each side
    with pytest.raises(ValueError):
        proposal.window_starts(0)


def test_select_threshold_or_best():
    assert proposal.select([0.1, 0.95, 0.9, 0.3]) == [1, 2]
    assert proposal.select([0.1, 0.7, 0.2]) == [1]
    with pytest.raises(ValueError, match="NaN"):
        proposal.select([0.5, float("nan")])


def _synthetic_dataset(tmp_path, liver_slices):
    """One case of 100 slices; the 'liver' (bright, masked) occupies ``liver_slices``."""
    image = np.full((100, 6, 6), 20, np.uint8)
    mask = np.zeros_like(image)
    image[liver_slices] = 200
    mask[liver_slices] = 1
    out = str(tmp_path / "ds")
    lits_build.write_group(out, {"kind": "lits", "in_plane": 6})
    lits_build.write_case(out, "lits-000", lits.PreparedCase(image, mask, {}))
    return out


def _coverage_score(windows):
    # Fraction of the case's bright slab inside each window: a stand-in for the network's
    # "covers the whole liver" probability with a known right answer.
    return (windows[:, :, 0, 0] == 200).sum(axis=1) / _coverage_score.liver_len


def test_proposal_picks_the_windows_covering_the_liver(tmp_path):
    ds = _synthetic_dataset(tmp_path, slice(40, 76))          # 36 slices of liver
    _coverage_score.liver_len = 36.0
    found = proposal.propose(ds, ["lits-000"], proposal.numpy_scorer(_coverage_score),
                             batch_size=3)["lits-000"]
    assert [w.start for w in found] == [0, 8, 16, 24, 32, 40, 48, 52]
    # Only windows starting at 32 and 40 hold the whole slab [40, 76); 24 holds 32/36 < 0.9.
    assert [w.start for w in found if w.selected] == [32, 40]
    assert found[3].score == pytest.approx(32 / 36)

    path = str(tmp_path / "proposals.csv")
    proposal.write_csv(path, {"lits-000": found})
    assert proposal.read_csv(path)["lits-000"] == [
        proposal.Window(w.case_id, w.start, w.num_slices, round(w.score, 6), w.selected)
        for w in found]


def test_proposal_falls_back_to_the_best_window(tmp_path):
    ds = _synthetic_dataset(tmp_path, slice(30, 90))          # 60 slices: no window holds all
    _coverage_score.liver_len = 60.0
    found = proposal.propose(ds, ["lits-000"], proposal.numpy_scorer(_coverage_score))["lits-000"]
    chosen = [w for w in found if w.selected]
    assert len(chosen) == 1
    assert chosen[0].start in (32, 40)          # both hold 48/60; the first best is kept
    assert chosen[0].start == 32 and chosen[0].score == pytest.approx(0.8)
