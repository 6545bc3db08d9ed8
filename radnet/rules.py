"""The label rules of the archive index, as one readable table plus the logic that applies it.

Everything a radiologist would want to check is in the tables at the top of this
file: which words mean which body region, which words and image types mean a
sequence we do not use, which words mean contrast. The thresholds (TR, TE, TI,
angles, lengths) are in ``configs/index.py``. Each rule returns the label, the
exclusion reasons it raises, and a provenance string naming the rule that
produced the label, so every label in series.csv can be traced back here.

Word matching is case-insensitive on whole words: a keyword matches when it is
not glued to other letters or digits (``T2`` matches ``AX_T2_TSE`` but not
``T2*`` or ``T22``); a space in a keyword matches any run of separators
(``HEAD NECK`` matches ``HEAD-NECK``, ``HEAD/NECK``, ``HEAD & NECK``). Longer
phrases are matched first and consume their text, so ``HEAD NECK`` does not
also count as ``HEAD``.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from typing import Iterable, Sequence

from radnet import labels
from radnet.dicom import geometry

# ----------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------

# Coverage: protocol words → regions (docs/interfaces.md, "Coverage conventions").
COVERAGE_WORDS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("HEAD", "BRAIN", "CRANIAL", "CRANIUM"), ("brain",)),
    (("NECK", "HEAD NECK", "HEAD AND NECK", "HEADNECK", "H&N", "HN"),
     ("upper_head_neck", "lower_head_neck")),
    (("SINUS", "SINUSES", "NASOPHARYNX", "OROPHARYNX", "SKULL BASE"), ("upper_head_neck",)),
    (("LARYNX", "THYROID", "LOWER NECK"), ("lower_head_neck",)),
    (("CHEST", "THORAX", "LUNG", "LUNGS"), ("lung",)),
    (("BREAST", "BREASTS", "MAMMO", "MAMMOGRAPHY"), ("breast",)),
    (("ABDOMEN", "ABD", "LIVER", "UPPER ABDOMEN"), ("liver", "kidney")),
    (("KIDNEY", "KIDNEYS", "RENAL"), ("kidney",)),
    (("ABDOMEN PELVIS", "ABDOMEN AND PELVIS", "ABD PELVIS", "ABD AND PELVIS", "ABDOMENPELVIS",
      "ABD PEL", "A/P", "COLON", "BOWEL", "ENTERO", "ENTEROGRAPHY", "COLONOGRAPHY"),
     ("liver", "kidney", "intestine", "pelvis")),
    (("CHEST ABDOMEN PELVIS", "CHEST ABD PELVIS", "THORAX ABDOMEN PELVIS", "CAP", "C/A/P", "TAP"),
     ("lung", "liver", "kidney", "intestine", "pelvis")),
    (("PELVIS", "PELVIC", "PROSTATE", "BLADDER", "RECTUM", "RECTAL", "CERVIX", "UTERUS"),
     ("pelvis",)),
)
# Abdomen words and pelvis words in one description mean an abdomen-pelvis scan,
# which covers the intestine too (as the ABDOMEN PELVIS row says).
COVERAGE_ABDOMEN_PELVIS_ADDS = "intestine"

# Sources of coverage words, most specific first: the first source that names a
# region decides; later sources only serve as a consistency check.
# BodyPartExamined comes after the study description: it is one coarse defined
# term (ABDOMEN for an abdomen-pelvis scan, CHEST for chest-abdomen-pelvis).
COVERAGE_SOURCES = ("series_description", "protocol_name", "study_description",
                    "body_part", "collection")

# Image Type (0008,0008) values naming images whose appearance is not that of
# a diagnostic T1/T2/FLAIR/CT volume. DERIVED alone is not one of them: a
# DERIVED\SECONDARY image (MR_small) can be an ordinary spin-echo image.
EXCLUDED_IMAGE_TYPES: dict[str, str] = {
    "LOCALIZER": "localizer", "PROJECTION IMAGE": "projection", "MIP": "projection",
    "MINIP": "projection", "MNIP": "projection", "MAXIP": "projection",
    "VOLUME RENDERING": "projection", "CURVED": "projection",
    "DIFFUSION": "diffusion", "ADC": "diffusion", "EADC": "diffusion", "TRACEW": "diffusion",
    "FA": "diffusion", "TENSOR": "diffusion", "PERFUSION": "perfusion", "CBF": "perfusion",
    "CBV": "perfusion", "MTT": "perfusion", "TTP": "perfusion", "ANGIO": "angiography",
    "FLOW_ENCODED": "angiography", "SUBTRACTION": "subtraction", "FMRI": "functional",
    "MOCO": "functional", "SPECTROSCOPY": "spectroscopy",
}

# Description words naming the purpose of a series we do not use, per modality.
# They apply whatever the scanning-sequence tags say (a spin-echo localizer is
# still a localizer).
EXCLUDED_PURPOSE_WORDS: dict[str, dict[str, str]] = {
    "MR": {
        "LOCALIZER": "localizer", "LOCALISER": "localizer", "LOC": "localizer",
        "SCOUT": "localizer", "SURVEY": "localizer", "PILOT": "localizer",
        "3PLANE": "localizer", "3 PLANE": "localizer", "TRI PLANE": "localizer",
        "DWI": "diffusion", "DIFFUSION": "diffusion", "ADC": "diffusion", "DTI": "diffusion",
        "TRACE": "diffusion", "PERFUSION": "perfusion", "PWI": "perfusion", "DSC": "perfusion",
        "ASL": "perfusion", "MRA": "angiography", "ANGIO": "angiography", "TOF": "angiography",
        "BOLD": "functional", "FMRI": "functional", "FUNCTIONAL": "functional",
        "MIP": "projection", "SWI": "susceptibility", "SPECTROSCOPY": "spectroscopy",
        "MRS": "spectroscopy",
    },
    "CT": {
        "SCOUT": "localizer", "TOPOGRAM": "localizer", "LOCALIZER": "localizer",
        "SURVIEW": "localizer", "SCANOGRAM": "localizer", "PILOT": "localizer",
        "MIP": "projection", "VOLUME RENDERING": "projection",
    },
}

# Gradient-echo and EPI product names: used only when ScanningSequence is absent
# (otherwise a disagreement with the tags is recorded for review).
GRADIENT_ECHO_WORDS = ("GRE", "GR", "SPGR", "FSPGR", "FLASH", "VIBE", "MPRAGE", "FFE", "TFE",
                       "T2*", "FIESTA", "TRUFI", "BFFE", "LAVA", "THRIVE", "SSFP", "EPI")

# Weighting words in descriptions (fallback when the tags do not decide, and the
# consistency check when they do).
T1_WORDS = ("T1", "T1W", "T1WI", "T1SE", "T1TSE", "T1FSE", "T1-W")
T2_WORDS = ("T2", "T2W", "T2WI", "T2SE", "T2TSE", "T2FSE", "T2-W")
PD_WORDS = ("PD", "PDW", "PROTON DENSITY")
FLAIR_WORDS = ("FLAIR", "DARK FLUID", "DARKFLUID", "DARK-FLUID")
STIR_WORDS = ("STIR", "TIRM")

# ContrastBolusAgent values that mean no agent was given.
CONTRAST_NONE_WORDS = frozenset(
    {"", "NONE", "NO", "N", "NA", "N/A", "NIL", "0", "-", "NO CONTRAST", "NONE GIVEN",
     "WITHOUT", "NOT GIVEN", "NON"})

# Description words about contrast. Matched longest first; a description with
# both kinds (W/WO, "pre and post") says nothing about this series.
CONTRAST_BOTH_WORDS = ("W/WO", "WO/W", "W WO", "WO W", "W&WO", "WITH AND WITHOUT",
                       "WITHOUT AND WITH", "PRE AND POST", "PRE POST", "PRE/POST")
CONTRAST_WORDS = ("C+", "+C", "CE", "POST", "POSTCONTRAST", "POST CONTRAST", "POST GAD",
                  "GAD", "GADO", "GD", "GADOLINIUM", "WITH CONTRAST", "W CONTRAST",
                  "W/CONTRAST", "W/ CONTRAST", "W CON", "CONTRAST ENHANCED", "ENHANCED",
                  "IV CONTRAST", "ARTERIAL", "PORTAL", "PORTAL VENOUS", "VENOUS PHASE",
                  "NEPHROGRAPHIC")
NON_CONTRAST_WORDS = ("WO", "W/O", "WITHOUT", "WITHOUT CONTRAST", "PLAIN", "NON CONTRAST",
                      "NONCONTRAST", "NC", "PRE", "PRECONTRAST", "PRE CONTRAST", "C-",
                      "NON ENHANCED", "UNENHANCED", "NATIVE")

SUPPORTED_MODALITIES = ("CT", "MR")

# ----------------------------------------------------------------------------
# Word matching
# ----------------------------------------------------------------------------

_PATTERNS: dict[str, re.Pattern] = {}


def _pattern(word: str) -> re.Pattern:
    pat = _PATTERNS.get(word)
    if pat is None:
        parts = [re.escape(p) for p in word.upper().split(" ")]
        body = r"[^A-Z0-9]+".join(parts)
        # Not glued to letters/digits; a trailing '*' belongs to the word (T2* ≠ T2).
        pat = re.compile(r"(?<![A-Z0-9])" + body + r"(?![A-Z0-9*])")
        _PATTERNS[word] = pat
    return pat


def find_words(text: str, tables: dict[str, object]) -> list[tuple[str, object]]:
    """Words of ``tables`` (word → value) found in ``text``, longest first, consuming.

    Returns (word, value) in the order found; a matched span is blanked so a
    shorter word inside it does not match again.
    """
    text = f" {text.upper()} "
    found = []
    for word in sorted(tables, key=lambda w: (-len(w), w)):
        pat = _pattern(word)
        m = pat.search(text)
        if m:
            found.append((word, tables[word]))
            text = pat.sub(lambda mm: " " * len(mm.group(0)), text)
    return found


def has_word(text: str, words: Iterable[str]) -> list[str]:
    return [w for w, _ in find_words(text, {w: True for w in words})]


# What a description keeps: only its rule words
# ----------------------------------------------------------------------------

# Stands for text between rule words (a name, a number): a word of letters so that
# no phrase matches across it, and one that no table holds.
OTHER_TEXT = "ZZ"


def _description_words() -> tuple[str, ...]:
    words = set(_COVERAGE_TABLE) | set(_CONTRAST_TABLE) | set(GRADIENT_ECHO_WORDS)
    for table in EXCLUDED_PURPOSE_WORDS.values():
        words |= set(table)
    for group in (T1_WORDS, T2_WORDS, PD_WORDS, FLAIR_WORDS, STIR_WORDS):
        words |= set(group)
    return tuple(sorted(words))


def rule_words(text: str) -> str:
    """A description reduced to the words the rules can match, for storage without PHI.

    Every span where a word of any table matches is kept as written (upper case), with
    the separators between adjacent spans; any other text becomes ``OTHER_TEXT``. The
    kept spans have the same neighbours as far as matching is concerned (a separator or
    the end, never a letter or digit), so every table finds exactly the words in the
    reduced text that it finds in the original (tests/radnet/test_rules.py): labels,
    provenance and reasons are unchanged, while a name typed into a description is gone.
    Non-empty text stays non-empty (missing_description looks at that).
    """
    upper = (text or "").upper()
    if not upper.strip():
        return ""
    spans = sorted((m.start(), m.end()) for word in _DESCRIPTION_WORDS
                   for m in _pattern(word).finditer(upper))
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged:
        return OTHER_TEXT
    pieces, previous = [], None
    for start, end in merged:
        if previous is not None:
            gap = upper[previous:start]
            pieces.append(gap if not re.search(r"[A-Z0-9]", gap) else f" {OTHER_TEXT} ")
        pieces.append(upper[start:end])
        previous = end
    return "".join(pieces)


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Rule:
    """One label, the reasons it raises, where it came from, and what a person should check."""

    value: str = ""
    reasons: list[str] = dataclasses.field(default_factory=list)
    provenance: str = ""
    review: list[str] = dataclasses.field(default_factory=list)


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


# ----------------------------------------------------------------------------
# Sequence
# ----------------------------------------------------------------------------


def _weighting(tr: float | None, te: float | None, mr) -> str:
    """'T1', 'T2', 'PD' (long TR, short TE) or '' (tags missing or in between)."""
    if tr is None or te is None:
        return ""
    short_tr, long_tr = tr <= mr.short_tr_max_ms, tr >= mr.long_tr_min_ms
    short_te, long_te = te <= mr.short_te_max_ms, te >= mr.long_te_min_ms
    if short_tr and short_te:
        return "T1"
    if long_tr and long_te:
        return "T2"
    if long_tr and short_te:
        return "PD"
    return ""


def _flair_weighting(tr: float | None, te: float | None, mr) -> str:
    if te is not None and te <= mr.short_te_max_ms:
        return "T1"
    if te is not None and te >= mr.long_te_min_ms:
        return "T2"
    if tr is not None and tr >= mr.flair_t2_min_tr_ms:
        return "T2"
    if tr is not None and tr <= mr.flair_t1_max_tr_ms:
        return "T1"
    return ""


def _per_te(values: Sequence[float] | None, fn) -> tuple[str, str]:
    """Applies ``fn(te)`` to every echo time; (label, note). Disagreeing echoes → ''."""
    if not values:
        return fn(None), ""
    results = {fn(v) for v in values}
    if len(results) == 1:
        return results.pop(), ""
    return "", f"echo times {'/'.join(_fmt(v) for v in values)} ms disagree on weighting"


def description_sequence(text: str) -> tuple[str, str]:
    """(label from words, why). Label is a vocabulary name, 'STIR', 'PD', 'GR' or ''."""
    if has_word(text, FLAIR_WORDS):
        if has_word(text, T1_WORDS):
            return "T1-FLAIR", "words T1+FLAIR"
        return "T2-FLAIR", "word FLAIR"  # FLAIR alone means T2-FLAIR in radiology
    if has_word(text, STIR_WORDS):
        return "STIR", "word STIR"
    gr = has_word(text, GRADIENT_ECHO_WORDS)
    if gr:
        return "GR", f"word {gr[0]}"
    t1, t2, pd = has_word(text, T1_WORDS), has_word(text, T2_WORDS), has_word(text, PD_WORDS)
    if t1 and not t2:
        return "T1-SE", f"word {t1[0]}"
    if t2 and not t1:
        return "T2-SE", f"word {t2[0]}"
    if pd and not (t1 or t2):
        return "PD", f"word {pd[0]}"
    return "", ""


def _excluded_purposes(facts: dict, modality: str) -> list[str]:
    found = []
    for value in facts.get("image_type", []) + facts.get("frame_type", []):
        if value in EXCLUDED_IMAGE_TYPES:
            found.append(f"ImageType {value} ({EXCLUDED_IMAGE_TYPES[value]})")
    words = EXCLUDED_PURPOSE_WORDS.get(modality, {})
    for key in ("series_description", "protocol_name"):
        for word, why in find_words(facts.get(key, ""), words):
            found.append(f"{key} word {word} ({why})")
    if modality == "MR" and any(b > 0 for b in facts.get("bvalues", []) or []):
        found.append("DiffusionBValue > 0 (diffusion)")
    return found


def sequence_rule(facts: dict, cfg) -> Rule:
    """Sequence label (CT, T1-SE, T2-SE, T1-FLAIR, T2-FLAIR) from modality and MR physics.

    MR: ScanningSequence decides the family (EP or GR → excluded; IR → STIR or
    FLAIR by TI, its weighting by TE/TR; SE → T1/T2 by TR and TE). The
    descriptions are the fallback when the tags do not decide, and a check when
    they do (a disagreement goes to review; the tags win).
    """
    modality = facts.get("modality", "")
    rule = Rule()
    purposes = _excluded_purposes(facts, modality)
    if modality == "CT":
        rule.value, rule.provenance = "CT", "sequence=CT<-Modality"
        if purposes:
            rule.reasons.append("excluded_sequence")
            rule.provenance += "; excluded<-" + ", ".join(purposes)
        return rule
    if modality != "MR":
        return rule
    mr = cfg.mr
    ss = set(facts.get("ss") or [])
    tr, te_values, ti = facts.get("tr"), facts.get("te"), facts.get("ti")
    te_text = "/".join(_fmt(v) for v in te_values) if te_values else "?"
    tags = f"ScanningSequence={'/'.join(sorted(ss)) or '?'} TR={_fmt(tr)} TE={te_text} TI={_fmt(ti)}"
    description = " ".join(facts.get(k, "") for k in ("series_description", "protocol_name"))
    desc_label, desc_why = description_sequence(description)

    tag_label, excluded_why, note = "", "", ""
    if "EP" in ss:
        excluded_why = "echo-planar (EP)"
    elif "GR" in ss:
        excluded_why = "gradient echo (GR)"
    elif "IR" in ss:
        if ti is None:
            note = "IR without InversionTime"
        elif ti <= mr.stir_max_ti_ms:
            excluded_why = f"STIR (TI {ti:g} <= {mr.stir_max_ti_ms:g} ms)"
            tag_label = "STIR"
        elif ti >= mr.flair_min_ti_ms:
            weight, note = _per_te(te_values, lambda te: _flair_weighting(tr, te, mr))
            tag_label = f"{weight}-FLAIR" if weight else ""
            if not weight and not note:
                note = "FLAIR weighting undecided by TE/TR"
        else:
            note = f"TI {ti:g} ms between STIR and FLAIR ranges"
    elif "SE" in ss:
        weight, note = _per_te(te_values, lambda te: _weighting(tr, te, mr))
        if weight in ("T1", "T2"):
            tag_label = f"{weight}-SE"
        elif weight == "PD":
            excluded_why, tag_label = "proton density (long TR, short TE)", "PD"
        elif not note:
            note = "TR/TE missing or between T1 and T2 ranges"
    elif ss:
        excluded_why = f"ScanningSequence {'/'.join(sorted(ss))} not SE/IR"

    if tag_label and tag_label in labels.SEQUENCE:
        rule.value = tag_label
        rule.provenance = f"sequence={tag_label}<-tags({tags})"
        if desc_label and desc_label != tag_label:
            rule.review.append(f"sequence: tags say {tag_label}, description says "
                               f"{desc_label} ({desc_why})")
            rule.provenance += f"; conflict description {desc_label}"
    elif excluded_why:
        rule.provenance = f"excluded<-tags({tags}): {excluded_why}"
        if desc_label in labels.SEQUENCE and not ss & {"GR", "EP"} and tag_label != "STIR":
            rule.review.append(f"sequence: tags say {excluded_why}, description says {desc_label}")
    elif desc_label:
        # Tags absent or undecided: the description decides.
        if desc_label in labels.SEQUENCE:
            rule.value = desc_label
            rule.provenance = f"sequence={desc_label}<-description({desc_why}); tags: {note or tags}"
        else:
            excluded_why = f"description {desc_why}"
            rule.provenance = f"excluded<-description({desc_why}); tags: {note or tags}"
    else:
        excluded_why = note or "no sequence rule matched"
        rule.provenance = f"unknown<-tags({tags}): {excluded_why}"
        rule.review.append(f"sequence: no rule matched ({excluded_why})")
    if excluded_why or purposes:
        rule.reasons.append("excluded_sequence")
    if purposes:
        rule.provenance += "; excluded<-" + ", ".join(purposes)
    return rule


# ----------------------------------------------------------------------------
# View
# ----------------------------------------------------------------------------


VIEW_OF_AXIS = ("sagittal", "coronal", "axial")  # normal along patient x (L-R), y (A-P), z (S-I)


def view_rule(orientation: Sequence[float] | None, cfg) -> Rule:
    """View = the patient axis the slice normal is closest to; obliquity beyond
    ``max_oblique_deg`` adds non_standard_view (the view is still filled)."""
    rule = Rule()
    if not orientation or len(orientation) != 6:
        rule.provenance = "view unknown<-no ImageOrientationPatient"
        return rule
    try:
        n = geometry.slice_normal(orientation)
    except ValueError as e:
        rule.provenance = f"view unknown<-{e}"
        return rule
    axis, angle = geometry.nearest_patient_axis(n)
    rule.value = VIEW_OF_AXIS[axis]
    rule.provenance = f"view={rule.value}<-normal({n[0]:.3f},{n[1]:.3f},{n[2]:.3f}) oblique {angle:.1f}deg"
    # A hair of tolerance so an angle written at exactly the limit is not lost to rounding.
    if angle > cfg.max_oblique_deg + 1e-6:
        rule.reasons.append("non_standard_view")
    return rule


# ----------------------------------------------------------------------------
# Contrast
# ----------------------------------------------------------------------------

_CONTRAST_TABLE = {**{w: "both" for w in CONTRAST_BOTH_WORDS},
                   **{w: "contrast" for w in CONTRAST_WORDS},
                   **{w: "no_contrast" for w in NON_CONTRAST_WORDS}}


def description_contrast(text: str) -> tuple[str, str]:
    """('contrast' | 'no_contrast' | '', matched words) from one description."""
    found = find_words(text, _CONTRAST_TABLE)
    kinds = {v for _, v in found}
    words = ",".join(w for w, _ in found)
    if not found or "both" in kinds or kinds == {"contrast", "no_contrast"}:
        return "", words
    return kinds.pop(), words


def contrast_rule(facts: dict) -> Rule:
    """Contrast from ContrastBolusAgent (0018,0010), refined by the descriptions.

    The agent tag is often copied to every series of an exam, so explicit
    series-level words (pre, without, C+, post gad) win over it, with the
    disagreement sent to review; otherwise no_contrast (the study description
    covers the whole exam and is only noted).
    """
    rule = Rule()
    agent = (facts.get("agent") or "").strip().upper()
    administered = (facts.get("agent_administered") or "").upper()
    tag = ""
    if agent and agent not in CONTRAST_NONE_WORDS:
        tag, why = "contrast", "ContrastBolusAgent"
    elif facts.get("agent_seq") or administered == "YES":
        tag, why = "contrast", "ContrastBolusAgentSequence/Administered"
    elif agent in CONTRAST_NONE_WORDS - {""} or administered == "NO":
        tag, why = "no_contrast", "ContrastBolusAgent none"
    series_text = " ".join(facts.get(k, "") for k in ("series_description", "protocol_name"))
    words_label, words = description_contrast(series_text)
    if words_label:
        rule.value = words_label
        rule.provenance = f"contrast={words_label}<-series words({words})"
        if tag and tag != words_label:
            rule.provenance += f"; conflict {why} says {tag}"
            rule.review.append(f"contrast: {why} says {tag}, series words ({words}) say {words_label}")
        return rule
    if tag:
        rule.value, rule.provenance = tag, f"contrast={tag}<-{why}"
        return rule
    rule.value, rule.provenance = "no_contrast", "contrast=no_contrast<-default (no agent, no series words)"
    # The study description names the whole exam (a W CONTRAST exam may hold
    # a plain series too), so it never sets the label; a clash is worth a look.
    study_label, study_words = description_contrast(facts.get("study_description", ""))
    if study_label == "contrast":
        rule.provenance += f"; study words({study_words}) say contrast"
    return rule


# ----------------------------------------------------------------------------
# Coverage
# ----------------------------------------------------------------------------

_COVERAGE_TABLE = {word: regions for words, regions in COVERAGE_WORDS for word in words}
_ABDOMEN_WORDS = {w for words, regions in COVERAGE_WORDS if regions == ("liver", "kidney")
                  for w in words}
_PELVIS_WORDS = {w for words, regions in COVERAGE_WORDS if regions == ("pelvis",) for w in words}


def regions_from_text(text: str) -> tuple[set[str], list[str]]:
    """Regions named by one description (protocol words of the coverage table)."""
    found = find_words(text, _COVERAGE_TABLE)
    regions: set[str] = set()
    for _, rs in found:
        regions.update(rs)
    words = [w for w, _ in found]
    if any(w in _ABDOMEN_WORDS for w in words) and any(w in _PELVIS_WORDS for w in words):
        regions.add(COVERAGE_ABDOMEN_PELVIS_ADDS)
    return regions, words


def required_extent_mm(regions: Iterable[str], cfg) -> float:
    """Craniocaudal length a scan needs to cover all ``regions`` entirely.

    One region: its minimum length. Several: the span of their union in the
    reference adult (regions overlap along z; regions in between are crossed),
    scaled down for a small adult, and never less than any one region's minimum.
    """
    regions = list(regions)
    if not regions:
        return 0.0
    own = max(cfg.coverage_min_mm[r] for r in regions)
    if len(regions) == 1:
        return own
    top = min(cfg.coverage_ref_z_mm[r][0] for r in regions)
    bottom = max(cfg.coverage_ref_z_mm[r][1] for r in regions)
    return max(own, (bottom - top) * cfg.coverage_span_scale)


def coverage_rule(facts: dict, z_extent_mm: float | None, cfg,
                  collection_regions: Iterable[str] = ()) -> Rule:
    """Coverage regions: named by the most specific description source, kept only
    if the scan's superior-inferior extent can hold them entirely."""
    rule = Rule()
    per_source: list[tuple[str, set[str], list[str]]] = []
    for source in COVERAGE_SOURCES:
        if source == "collection":
            regions, words = set(collection_regions), ["collections.csv"]
        else:
            regions, words = regions_from_text(facts.get(source, ""))
        if regions:
            per_source.append((source, regions, words))
    if not per_source:
        rule.provenance = "coverage unknown<-no coverage words"
        rule.review.append("coverage: no rule matched")
        return rule
    source, named, words = per_source[0]
    for other, other_regions, other_words in per_source[1:]:
        if not other_regions & named and other != "collection":
            rule.review.append(f"coverage: {source} ({','.join(words)}) and {other} "
                               f"({','.join(other_words)}) name different regions")
    ordered = [r for r in labels.COVERAGE if r in named]
    if z_extent_mm is None:
        rule.provenance = f"coverage unknown<-{source}({','.join(words)}) but no geometry"
        return rule
    # All or nothing: a scan too short for what its protocol names covers some
    # part of it, and the header does not say which part.
    need = required_extent_mm(ordered, cfg)
    what = f"{source}({','.join(words)}) extent {z_extent_mm:.0f}mm"
    if z_extent_mm + 1e-6 >= need:
        rule.value = ";".join(ordered)
        rule.provenance = f"coverage={rule.value}<-{what}>={need:.0f}"
        return rule
    rule.provenance = f"coverage unknown<-{what} < {need:.0f}mm needed for {','.join(ordered)}"
    if len(ordered) > 1 and z_extent_mm + 1e-6 >= min(cfg.coverage_min_mm[r] for r in ordered):
        rule.review.append(f"coverage: extent {z_extent_mm:.0f} mm cannot hold all of "
                           f"{','.join(ordered)} ({need:.0f} mm); which part is covered is unknown")
    return rule


# ----------------------------------------------------------------------------
# Geometry of a slice stack
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Stack:
    """What the positions along the normal say about a series."""

    n_slices: int = 0                      # distinct positions
    slice_spacing_mm: float | None = None  # mean step between distinct positions
    extent_mm: float | None = None         # first to last slice centre
    reasons: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    order: list[int] = dataclasses.field(default_factory=list)  # slice indices, ascending


def stack_rule(proj_mm: Sequence[float], sop_keys: Sequence[str], temporal: Sequence,
               acquisitions: Sequence[str], n_temporal: int | None, cfg) -> Stack:
    """Checks positions along the slice normal: duplicates, repeats, gaps, spacing.

    A time series repeats the positions (every position the same number of
    times, or distinct temporal positions / acquisitions at one position, or
    NumberOfTemporalPositions > 1); a few repeated positions without that are
    duplicates (inconsistent_geometry). The same SOP instance twice is a copied
    file, also inconsistent. Gaps are checked against the median step; the spacing is
    the mean step, extent / (n − 1), the definition the volume builder resamples with
    (radnet.preprocess.check_spacing), so index and builder predict the same effective spacing.
    """
    st = Stack()
    if not proj_mm:
        return st
    order = sorted(range(len(proj_mm)), key=lambda i: proj_mm[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and proj_mm[i] - proj_mm[groups[-1][0]] <= cfg.same_position_mm:
            groups[-1].append(i)
        else:
            groups.append([i])
    st.order = [g[0] for g in groups]
    st.n_slices = len(groups)
    counts = [len(g) for g in groups]
    temporal_ids = {t for t in temporal if t is not None}
    if (n_temporal or 0) > 1 or len(temporal_ids) > 1:
        st.reasons.append("time_series")
        st.notes.append(f"temporal tags ({max(n_temporal or 0, len(temporal_ids))} positions)")
    if max(counts) > 1:
        copied = any(len({sop_keys[i] for i in g if sop_keys[i]}) < len([i for i in g if sop_keys[i]])
                     for g in groups if len(g) > 1)
        repeated_groups = [g for g in groups if len(g) > 1]
        distinct_time = any(len({(temporal[i], acquisitions[i]) for i in g}) > 1
                            for g in repeated_groups)
        if copied:
            st.reasons.append("inconsistent_geometry")
            st.notes.append("the same SOP instance appears twice")
        elif len(set(counts)) == 1 or distinct_time:
            if "time_series" not in st.reasons:
                st.reasons.append("time_series")
            st.notes.append(f"positions repeated {max(counts)}x")
        else:
            st.reasons.append("inconsistent_geometry")
            st.notes.append(f"{sum(c > 1 for c in counts)} duplicated positions")
    if st.n_slices >= 2:
        centres = [proj_mm[g[0]] for g in groups]
        steps = [b - a for a, b in zip(centres, centres[1:])]
        med = statistics.median(steps)
        st.extent_mm = centres[-1] - centres[0]
        st.slice_spacing_mm = st.extent_mm / (len(centres) - 1)
        tol = max(cfg.spacing_rel_tol * med, cfg.spacing_abs_tol_mm)
        bad = [s for s in steps if abs(s - med) > tol]
        if bad:
            st.reasons.append("inconsistent_geometry")
            kind = "gap" if max(bad) > med else "uneven spacing"
            st.notes.append(f"{kind}: steps {min(steps):.3g}-{max(steps):.3g} mm, median {med:.3g}")
    elif st.n_slices == 1:
        st.extent_mm = 0.0
    return st


# Positions are decimal strings (DS) and gaps are computed from them: an effective spacing
# that exceeds the limit by less than this is arithmetic noise (144 slices at 5 mm came
# out 15.0000001 mm against the paper's 15 mm), not "above". Shared by the index and the
# volume builder so they never disagree at the limit.
SPACING_TOLERANCE_MM = 1e-3


def spacing_too_large(effective_mm: float | None, limit_mm: float) -> bool:
    """Effective slice spacing above the limit (paper: > 15 mm is dropped)."""
    return effective_mm is not None and effective_mm > limit_mm + SPACING_TOLERANCE_MM


def effective_spacing_mm(spacing_mm: float | None, n_slices: int,
                         target_slices: int) -> float | None:
    """Spacing between the target_slices slices of the resized volume (paper 2.1.5):
    more slices are squeezed into target_slices, fewer are padded, not stretched (the
    index's prediction and the volume builder's measurement, one formula)."""
    if spacing_mm is None:
        return None
    if n_slices > target_slices:
        return spacing_mm * n_slices / target_slices
    return spacing_mm


_DESCRIPTION_WORDS = _description_words()
assert not any(_pattern(w).search(OTHER_TEXT) for w in _DESCRIPTION_WORDS)
