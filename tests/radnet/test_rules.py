"""The label rules one by one, on small hand-made header facts (edge cases included)."""

import math

import pytest

from configs import index as index_config
from radnet import rules
from radnet.dicom import geometry


@pytest.fixture(scope="module")
def cfg():
    return index_config.get_config()


def mr(**kw):
    facts = {"modality": "MR", "ss": ["SE"], "tr": 500.0, "te": [12.0], "ti": None,
             "series_description": "AX", "protocol_name": "", "study_description": "",
             "image_type": ["ORIGINAL", "PRIMARY"], "frame_type": [], "bvalues": []}
    facts.update(kw)
    return facts


# --- word matching ---------------------------------------------------------------------

def test_words_are_whole_words_and_longest_first():
    assert rules.has_word("AX_T2_TSE", rules.T2_WORDS) == ["T2"]
    assert rules.has_word("T2* GRE", rules.T2_WORDS) == []          # T2* is gradient echo
    assert rules.has_word("T22 map", rules.T2_WORDS) == []
    regions, words = rules.regions_from_text("CT Head-Neck w/ contrast")
    assert regions == {"upper_head_neck", "lower_head_neck"}       # not brain
    assert words == ["HEAD NECK"]


# --- sequence --------------------------------------------------------------------------

@pytest.mark.parametrize("ss,tr,te,ti,expected", [
    (["SE"], 500, [12], None, "T1-SE"),
    (["SE"], 4000, [240], None, "T2-SE"),              # MR_small's values
    (["SE"], 1000, [30], None, "T1-SE"),               # exactly at the short bounds
    (["SE", "IR"], 9000, [120], 2500, "T2-FLAIR"),
    (["IR"], 2000, [10], 800, "T1-FLAIR"),
    (["IR", "SE"], 2200, [45], 900, "T1-FLAIR"),       # TE in between: TR decides
    (["IR"], 8000, [45], 2200, "T2-FLAIR"),
])
def test_sequence_from_tags(cfg, ss, tr, te, ti, expected):
    r = rules.sequence_rule(mr(ss=ss, tr=float(tr), te=[float(t) for t in te],
                               ti=None if ti is None else float(ti)), cfg)
    assert r.value == expected
    assert r.reasons == []
    assert r.provenance.startswith(f"sequence={expected}<-tags")


@pytest.mark.parametrize("ss,tr,te,ti,why", [
    (["GR"], 30, [5], None, "gradient echo"),
    (["GR", "IR"], 2000, [3], 900, "gradient echo"),   # MPRAGE
    (["SE", "EP"], 8000, [90], None, "echo-planar"),   # diffusion
    (["IR"], 4000, [40], 150, "STIR"),
    (["SE"], 3000, [15], None, "proton density"),
    (["RM"], 100, [10], None, "not SE/IR"),
])
def test_excluded_sequences(cfg, ss, tr, te, ti, why):
    r = rules.sequence_rule(mr(ss=ss, tr=float(tr), te=[float(t) for t in te],
                               ti=None if ti is None else float(ti)), cfg)
    assert r.reasons == ["excluded_sequence"]
    assert r.value == ""
    assert why in r.provenance


def test_missing_tr_te_falls_back_to_description(cfg):
    r = rules.sequence_rule(mr(tr=None, te=None, series_description="AX T1 POST"), cfg)
    assert r.value == "T1-SE" and r.reasons == []
    assert "description" in r.provenance
    r = rules.sequence_rule(mr(tr=None, te=None, series_description="AX"), cfg)
    assert r.value == "" and r.reasons == ["excluded_sequence"]
    assert r.review and "no rule matched" in r.review[0]


def test_missing_scanning_sequence_uses_words(cfg):
    assert rules.sequence_rule(mr(ss=[], series_description="FLAIR AX"), cfg).value == "T2-FLAIR"
    r = rules.sequence_rule(mr(ss=[], series_description="T1 VIBE"), cfg)
    assert r.value == "" and r.reasons == ["excluded_sequence"]


def test_te_given_as_a_list(cfg):
    agree = rules.sequence_rule(mr(tr=5000.0, te=[90.0, 110.0]), cfg)
    assert agree.value == "T2-SE"
    dual = rules.sequence_rule(mr(tr=3000.0, te=[15.0, 90.0]), cfg)   # PD/T2 dual echo
    assert dual.value == "" and dual.reasons == ["excluded_sequence"]
    assert "disagree" in dual.provenance


def test_description_conflict_is_recorded_tags_win(cfg):
    r = rules.sequence_rule(mr(tr=500.0, te=[12.0], series_description="AX T2"), cfg)
    assert r.value == "T1-SE"
    assert "conflict" in r.provenance and "T2-SE" in r.review[0]


def test_purpose_words_and_image_types_exclude_whatever_the_tags(cfg):
    r = rules.sequence_rule(mr(series_description="LOCALIZER"), cfg)
    assert r.value == "T1-SE" and r.reasons == ["excluded_sequence"]   # label kept for audit
    r = rules.sequence_rule(mr(image_type=["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]), cfg)
    assert r.reasons == ["excluded_sequence"]
    r = rules.sequence_rule(mr(bvalues=[0.0, 1000.0]), cfg)
    assert r.reasons == ["excluded_sequence"]
    # DERIVED alone is not a reason (MR_small is DERIVED\SECONDARY).
    r = rules.sequence_rule(mr(image_type=["DERIVED", "SECONDARY", "OTHER"]), cfg)
    assert r.reasons == []


def test_ct_sequence_and_ct_localizer(cfg):
    ct = {"modality": "CT", "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"],
          "series_description": "ANGIO CHEST"}
    assert rules.sequence_rule(ct, cfg).value == "CT"
    assert rules.sequence_rule(ct, cfg).reasons == []          # CT angiography is a CT volume
    scout = dict(ct, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], series_description="")
    r = rules.sequence_rule(scout, cfg)
    assert r.value == "CT" and r.reasons == ["excluded_sequence"]


def test_other_modality_has_no_sequence(cfg):
    assert rules.sequence_rule({"modality": "US"}, cfg).value == ""


# --- view ------------------------------------------------------------------------------

@pytest.mark.parametrize("iop,view", [
    ([1, 0, 0, 0, 1, 0], "axial"),
    ([1, 0, 0, 0, 0, -1], "coronal"),
    ([0, 1, 0, 0, 0, -1], "sagittal"),
    ([-1, 0, 0, 0, -1, 0], "axial"),
    ([0.99999, 0.0001, -0.0003, -0.0001, 0.99998, 0.0002], "axial"),   # rounding noise
])
def test_view_from_orientation(cfg, iop, view):
    r = rules.view_rule(iop, cfg)
    assert r.value == view and r.reasons == []


def _tilted(deg):
    a = math.radians(deg)  # axial plane rotated about the patient x axis
    return [1, 0, 0, 0, math.cos(a), math.sin(a)]


def test_oblique_at_the_tolerance(cfg):
    assert geometry.oblique_angle_deg(_tilted(cfg.max_oblique_deg)) == pytest.approx(cfg.max_oblique_deg)
    at = rules.view_rule(_tilted(cfg.max_oblique_deg), cfg)
    assert at.value == "axial" and at.reasons == []
    beyond = rules.view_rule(_tilted(cfg.max_oblique_deg + 0.5), cfg)
    assert beyond.value == "axial" and beyond.reasons == ["non_standard_view"]
    # 45 deg between axial and coronal: still a view, always non-standard.
    r = rules.view_rule(_tilted(50), cfg)
    assert r.value == "coronal" and r.reasons == ["non_standard_view"]


def test_view_without_orientation(cfg):
    assert rules.view_rule(None, cfg).value == ""
    assert rules.view_rule([1, 0, 0, 1, 0, 0], cfg).value == ""   # degenerate cosines


# --- contrast --------------------------------------------------------------------------

@pytest.mark.parametrize("facts,expected", [
    ({"agent": "ISOVUE300/100"}, "contrast"),
    ({"agent": "NONE"}, "no_contrast"),
    ({"agent": ""}, "no_contrast"),
    ({"series_description": "AX T1 C+"}, "contrast"),
    ({"series_description": "T1 post gad"}, "contrast"),
    ({"study_description": "CT HEAD WO CONTRAST"}, "no_contrast"),
    ({"study_description": "CT CHEST WITH CONTRAST"}, "no_contrast"),  # exam-level only
    ({"study_description": "MR BRAIN W/WO"}, "no_contrast"),       # both: says nothing
    ({"agent_seq": True}, "contrast"),
    ({"agent_administered": "NO"}, "no_contrast"),
])
def test_contrast(facts, expected):
    assert rules.contrast_rule(facts).value == expected


def test_series_words_refine_the_agent_and_conflict_goes_to_review():
    r = rules.contrast_rule({"agent": "GADAVIST", "series_description": "AX T1 PRE"})
    assert r.value == "no_contrast"
    assert r.review and "ContrastBolusAgent" in r.review[0]
    r = rules.contrast_rule({"agent": "OMNIPAQUE", "study_description": "CT WO CONTRAST"})
    assert r.value == "contrast"   # the agent beats the study-level words


# --- coverage --------------------------------------------------------------------------

def test_coverage_needs_the_extent(cfg):
    full = rules.coverage_rule({"series_description": "CT CHEST"}, 300.0, cfg)
    assert full.value == "lung" and "series_description(CHEST)" in full.provenance
    short = rules.coverage_rule({"series_description": "CT CHEST"}, 100.0, cfg)
    assert short.value == ""
    at = rules.coverage_rule({"series_description": "CHEST"}, cfg.coverage_min_mm.lung, cfg)
    assert at.value == "lung"


def test_coverage_chain_of_regions(cfg):
    ap = {"series_description": "ABDOMEN PELVIS"}
    need = rules.required_extent_mm(["liver", "kidney", "intestine", "pelvis"], cfg)
    assert need == pytest.approx((880 - 440) * cfg.coverage_span_scale)
    assert rules.coverage_rule(ap, 450.0, cfg).value == "liver;kidney;intestine;pelvis"
    partial = rules.coverage_rule(ap, 300.0, cfg)
    assert partial.value == "" and partial.review        # cannot tell which part
    # Abdomen and pelvis words apart also mean the intestine.
    assert rules.regions_from_text("ABD + PELVIS")[0] == {"liver", "kidney", "intestine", "pelvis"}
    # Brain + lung crosses the neck: the neck's length counts though it is not named.
    assert rules.required_extent_mm(["brain", "lung"], cfg) == pytest.approx(480 * 0.9)
    # Breast lies beside the lung; liver and kidney overlap.
    assert rules.required_extent_mm(["lung", "breast"], cfg) == 220
    assert rules.required_extent_mm(["liver", "kidney"], cfg) == pytest.approx(190 * 0.9)
    assert rules.required_extent_mm(["lung"], cfg) == 220


def test_coverage_source_priority_and_disagreement(cfg):
    facts = {"series_description": "LUNG 1.25", "study_description": "CT HEAD AND CHEST",
             "body_part": "HEAD"}
    r = rules.coverage_rule(facts, 300.0, cfg)
    assert r.value == "lung"
    assert any("body_part" in x for x in r.review)


def test_coverage_from_collection_and_none(cfg):
    r = rules.coverage_rule({"series_description": "Series 3"}, 200.0, cfg, ["brain"])
    assert r.value == "brain" and "collection" in r.provenance
    r = rules.coverage_rule({"series_description": "Series 3"}, 200.0, cfg)
    assert r.value == "" and r.review == ["coverage: no rule matched"]


def test_z_extent_is_in_plane_for_coronal():
    # Coronal: rows run along -z; 100 rows of 2 mm, 10 slices of 3 mm along y.
    z = geometry.z_extent_mm([1, 0, 0, 0, 0, -1], [0, 0, 0], 27.0, 3.0, 100, 50, [2.0, 1.0])
    assert z == pytest.approx(200.0)
    z = geometry.z_extent_mm([1, 0, 0, 0, 1, 0], [0, 0, 0], 27.0, 3.0, 100, 50, [2.0, 1.0])
    assert z == pytest.approx(30.0)                     # axial: n × spacing


# --- geometry --------------------------------------------------------------------------

def stack(proj, cfg, sops=None, t=None, acq=None, n_temporal=None):
    n = len(proj)
    return rules.stack_rule(proj, sops or [f"s{i}" for i in range(n)], t or [None] * n,
                            acq or ["1"] * n, n_temporal, cfg)


def test_even_stack(cfg):
    s = stack([5.0, 0.0, 2.5, 7.5], cfg)
    assert s.reasons == [] and s.n_slices == 4
    assert s.slice_spacing_mm == pytest.approx(2.5) and s.extent_mm == pytest.approx(7.5)
    assert s.order == [1, 2, 0, 3]
    noisy = stack([0.0, 2.5001, 4.9998, 7.5002], cfg)
    assert noisy.reasons == []


def test_gap_and_mixed_spacing(cfg):
    assert stack([0, 2.5, 5, 10, 12.5], cfg).reasons == ["inconsistent_geometry"]
    s = stack([0, 2.5, 5, 6, 7, 8], cfg)
    assert s.reasons == ["inconsistent_geometry"]


def test_duplicates_versus_time_series(cfg):
    dup = stack([0, 2.5, 2.5, 5, 7.5], cfg)
    assert dup.reasons == ["inconsistent_geometry"] and dup.n_slices == 4
    ts = stack([0, 2.5, 5, 0, 2.5, 5], cfg, acq=["1", "1", "1", "2", "2", "2"])
    assert ts.reasons == ["time_series"] and ts.n_slices == 3
    assert ts.slice_spacing_mm == pytest.approx(2.5)
    copies = stack([0, 2.5, 0, 2.5], cfg, sops=["a", "b", "a", "b"])
    assert copies.reasons == ["inconsistent_geometry"]
    tags = stack([0, 2.5, 5], cfg, n_temporal=30)
    assert tags.reasons == ["time_series"]


def test_effective_spacing(cfg):
    assert rules.effective_spacing_mm(2.0, 96, cfg.target_slices) == pytest.approx(4.0)
    assert rules.effective_spacing_mm(5.0, 40, cfg.target_slices) == pytest.approx(5.0)
    assert rules.effective_spacing_mm(7.5, 100, cfg.target_slices) == pytest.approx(15.625)
    assert rules.effective_spacing_mm(None, 10, cfg.target_slices) is None
