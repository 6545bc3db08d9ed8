import pytest

from radnet import labels


def test_exact_names_and_order():
    assert labels.SEQUENCE == ("CT", "T1-SE", "T2-SE", "T1-FLAIR", "T2-FLAIR")
    assert labels.VIEW == ("axial", "coronal", "sagittal")
    assert labels.CONTRAST == ("no_contrast", "contrast")
    assert labels.COVERAGE == ("brain", "upper_head_neck", "lower_head_neck", "lung", "breast",
                               "liver", "kidney", "intestine", "pelvis")
    assert labels.EXCLUSION_REASONS == (
        "unreadable", "not_image", "unsupported_modality", "too_few_slices",
        "inconsistent_geometry", "missing_description", "excluded_sequence", "time_series",
        "non_standard_view", "spacing_too_large", "decode_failed", "worker_died", "timeout",
        "too_large", "invalid_rescale", "pixel_data_mismatch", "constant_volume",
        "swapped_dimensions")
    assert labels.HEADS == ("sequence", "view", "contrast", "coverage", "slice_spacing")
    assert labels.HEAD_SIZES == {"sequence": 5, "view": 3, "contrast": 2, "coverage": 9,
                                 "slice_spacing": 1}


@pytest.mark.parametrize("head", ["sequence", "view", "contrast", "coverage"])
def test_index_name_round_trip(head):
    names = {**labels.CLASS_HEADS, **labels.MULTILABEL_HEADS}[head]
    for i, name in enumerate(names):
        assert labels.to_index(head, name) == i
        assert labels.to_name(head, i) == name
    assert labels.to_index(head, "") == labels.UNKNOWN
    assert labels.to_name(head, labels.UNKNOWN) == ""


def test_bad_names_and_indices_are_errors():
    with pytest.raises(ValueError, match="not a sequence label"):
        labels.to_index("sequence", "T1")
    with pytest.raises(ValueError, match="out of range"):
        labels.to_name("view", 3)
    with pytest.raises(KeyError):
        labels.to_index("slice_spacing", "x")


def test_coverage_multihot_round_trip():
    hot = labels.coverage_to_multihot("liver;kidney")
    assert hot == [0, 0, 0, 0, 0, 1, 1, 0, 0]
    assert labels.multihot_to_coverage(hot) == "liver;kidney"
    # Order in the CSV follows the vocabulary, whatever order came in.
    assert labels.multihot_to_coverage(labels.coverage_to_multihot(["pelvis", "brain"])) == "brain;pelvis"
    assert labels.coverage_to_multihot("") == [labels.UNKNOWN] * 9
    assert labels.multihot_to_coverage([labels.UNKNOWN] * 9) == ""
    with pytest.raises(ValueError):
        labels.coverage_to_multihot("spleen")


def test_split_index():
    assert [labels.split_index(s) for s in labels.SPLITS] == [0, 1, 2]
    assert labels.split_index("") == labels.UNKNOWN
