"""Which layout a folder of NIfTI segmentation cases is in, and its cases and labels.

Three layouts are recognised (checked in this order):

- **MSD** (Medical Segmentation Decathlon, e.g. ``Task03_Liver``): ``dataset.json`` with
  ``modality`` and ``labels`` (``{"0": "background", "1": "liver", "2": "cancer"}``) and a
  ``training`` list of ``{"image": "./imagesTr/liver_0.nii.gz", "label":
  "./labelsTr/liver_0.nii.gz"}``; images are 3D (one channel) or 4D (channels last).
- **nnU-Net v2 raw** (``DatasetXXX_Name``): ``dataset.json`` with ``channel_names``,
  ``labels`` (``{"background": 0, "liver": 1}``) and ``file_ending``; images
  ``imagesTr/NAME_0000.nii.gz`` (one file per channel), labels ``labelsTr/NAME.nii.gz``.
- **LiTS**: ``volume-<k>.nii[.gz]`` and ``segmentation-<k>.nii[.gz]`` at any depth (the
  challenge ships two "Training Batch" folders); labels 0 background, 1 liver, 2 tumour.

One input channel is required: a dataset.json naming more is refused as a whole (a
:class:`LayoutError` naming the channels). Files that belong to no case (``imagesTs/``,
macOS ``._`` copies, notes) are returned as stray rows with a reason, so every file of
the folder is accounted for in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter

LAYOUTS = ("msd", "nnunet", "lits")
LAYOUT_HELP = ("MSD (dataset.json with 'modality' and 'training', imagesTr/, labelsTr/), "
               "nnU-Net v2 raw (dataset.json with 'channel_names', imagesTr/NAME_0000.nii.gz, "
               "labelsTr/NAME.nii.gz) or LiTS (volume-<k>.nii[.gz] with "
               "segmentation-<k>.nii[.gz])")
_LITS_RE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
_NIFTI_RE = re.compile(r"\.nii(\.gz)?$")


class LayoutError(ValueError):
    """The folder as a whole cannot be read (no known layout, several channels, a broken
    dataset.json); the message is the one line shown to the user."""


@dataclasses.dataclass
class Case:
    case_id: str
    image: str              # path relative to the dataset folder ('' when missing)
    label: str              # path relative to the dataset folder ('' when missing)


@dataclasses.dataclass
class Found:
    layout: str                         # one of LAYOUTS
    cases: list[Case]
    label_names: dict[int, str]         # source label value → name (0 = background)
    stray: list[dict[str, str]]         # manifest rows of files that are no case's
    channel: str                        # the one input channel's name ("CT", …)


def _walk(root: str) -> list[str]:
    out = []
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            out.append(os.path.relpath(os.path.join(base, name), root).replace(os.sep, "/"))
    return out


def _describe(root: str, files: list[str]) -> str:
    """What a folder holds, in a few words, for the no-layout error."""
    if not files:
        return "nothing (an empty folder)"
    kinds = Counter(".nii.gz" if f.endswith(".nii.gz") else (os.path.splitext(f)[1] or "no extension")
                    for f in files)
    top = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    parts = [", ".join(f"{n} {k}" for k, n in kinds.most_common(4))]
    if top:
        parts.append("folders " + ", ".join(top[:5]) + (" …" if len(top) > 5 else ""))
    sample = [f for f in files if _NIFTI_RE.search(f)][:2]
    if sample:
        parts.append("e.g. " + ", ".join(sample))
    return f"{len(files)} files ({'; '.join(parts)})"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LayoutError(f"{path} is not readable JSON ({type(e).__name__}: {e}); fix or "
                          "remove it") from None
    if not isinstance(data, dict):
        raise LayoutError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _one_channel(channels: dict, path: str, key: str) -> str:
    if not isinstance(channels, dict) or not channels:
        raise LayoutError(f"{path}: '{key}' names no input channel")
    if len(channels) != 1:
        names = ", ".join(f"{k}={v}" for k, v in channels.items())
        raise LayoutError(f"{path} lists {len(channels)} input channels ({names}); radnet's "
                          "segmentation takes one channel (multi-channel input is a "
                          "documented follow-up, docs/segmentation.md)")
    return str(next(iter(channels.values())))


def _stray(rel: str, reason: str) -> dict[str, str]:
    return {"volume_file": rel, "reason": reason}


def _pair_folders(root: str, files: list[str], images: dict[str, str],
                  labels: dict[str, str], claimed: set[str]) -> tuple[list[Case], list[dict]]:
    cases = [Case(cid, images.get(cid, ""), labels.get(cid, ""))
             for cid in sorted(set(images) | set(labels))]
    claimed |= set(images.values()) | set(labels.values())
    stray = []
    for rel in files:
        if rel in claimed or rel == "dataset.json":
            continue
        name = rel.rsplit("/", 1)[-1]
        if name.startswith("._"):
            reason = "macos_resource_fork"
        elif rel.startswith(("imagesTs/", "labelsTs/")):
            reason = "test_image_without_label"
        else:
            reason = "unrecognised_file_name"
        stray.append(_stray(rel, reason))
    return cases, stray


def _msd(root: str, meta: dict, files: list[str]) -> Found:
    path = os.path.join(root, "dataset.json")
    channel = _one_channel(meta.get("modality"), path, "modality")
    labels = _labels(meta.get("labels"), path, names_are_keys=False)
    images, label_files, stray = {}, {}, []
    training = meta.get("training")
    if isinstance(training, list) and training:
        for entry in training:
            if not isinstance(entry, dict):
                continue
            img = str(entry.get("image", "")).removeprefix("./")
            lab = str(entry.get("label", "")).removeprefix("./")
            cid = _NIFTI_RE.sub("", img.rsplit("/", 1)[-1]) or _NIFTI_RE.sub("", lab.rsplit("/", 1)[-1])
            images[cid] = img if img in set(files) else ""
            label_files[cid] = lab if lab in set(files) else ""
            if img and img not in set(files):
                stray.append({"case_id": cid, "volume_file": img, "reason": "listed_but_missing"})
            if lab and lab not in set(files):
                stray.append({"case_id": cid, "volume_file": lab, "reason": "listed_but_missing"})
    else:   # no training list: pair imagesTr/X with labelsTr/X
        for rel in files:
            name = rel.rsplit("/", 1)[-1]
            if name.startswith("._") or not _NIFTI_RE.search(name):
                continue
            if rel.startswith("imagesTr/"):
                images[_NIFTI_RE.sub("", name)] = rel
            elif rel.startswith("labelsTr/"):
                label_files[_NIFTI_RE.sub("", name)] = rel
    images = {k: v for k, v in images.items() if v}
    label_files = {k: v for k, v in label_files.items() if v}
    cases, more = _pair_folders(root, files, images, label_files, set())
    return Found("msd", cases, labels, stray + more, channel)


def _nnunet(root: str, meta: dict, files: list[str]) -> Found:
    path = os.path.join(root, "dataset.json")
    channel = _one_channel(meta.get("channel_names"), path, "channel_names")
    labels = _labels(meta.get("labels"), path, names_are_keys=True)
    ending = str(meta.get("file_ending", ".nii.gz"))
    if not ending.startswith(".nii"):
        raise LayoutError(f"{path}: file_ending {ending!r}; radnet reads NIfTI (.nii, .nii.gz)")
    images, label_files = {}, {}
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    for rel in files:
        name = rel.rsplit("/", 1)[-1]
        if name.startswith("._"):
            continue
        if rel.startswith("imagesTr/"):
            m = pattern.match(name)
            if m and m.group(2) == "0000":
                images[m.group(1)] = rel
        elif rel.startswith("labelsTr/") and name.endswith(ending):
            label_files[name[:-len(ending)]] = rel
    cases, stray = _pair_folders(root, files, images, label_files, set())
    return Found("nnunet", cases, labels, stray, channel)


def _labels(raw, path: str, names_are_keys: bool) -> dict[int, str]:
    """``{value: name}`` from MSD's ``{"1": "liver"}`` or nnU-Net's ``{"liver": 1}``."""
    if not isinstance(raw, dict) or not raw:
        raise LayoutError(f"{path} has no 'labels'")
    out: dict[int, str] = {}
    try:
        for k, v in raw.items():
            if names_are_keys:
                if isinstance(v, (list, tuple)):
                    raise LayoutError(f"{path}: label {k!r} is a region ({v}); region-based "
                                      "labels are not supported, give one value per label")
                out[int(v)] = str(k)
            else:
                out[int(k)] = str(v)
    except (TypeError, ValueError):
        raise LayoutError(f"{path}: 'labels' {raw} are not integer label values") from None
    if 0 not in out:
        raise LayoutError(f"{path}: 'labels' {raw} have no background value 0")
    return dict(sorted(out.items()))


def _lits(root: str, files: list[str]) -> Found:
    found: dict[int, dict[str, str]] = {}
    stray: list[dict[str, str]] = []
    for rel in files:
        m = _LITS_RE.match(rel.rsplit("/", 1)[-1])
        if not m:
            stray.append(_stray(rel, "unrecognised_file_name"))
            continue
        kind, k = m.group(1), int(m.group(2))
        entry = found.setdefault(k, {})
        if kind in entry:
            stray.append({**_stray(rel, "duplicate_case"), "case_id": lits_case_id(k)})
            continue
        entry[kind] = rel
    cases = [Case(lits_case_id(k), found[k].get("volume", ""), found[k].get("segmentation", ""))
             for k in sorted(found)]
    return Found("lits", cases, {0: "background", 1: "liver", 2: "tumour"}, stray, "CT")


def lits_case_id(k: int) -> str:
    return f"lits-{k:03d}"


def detect(root: str, layout: str = "auto") -> Found:
    """The cases of ``root`` in its layout (``auto``: the first that matches; else one of
    LAYOUTS, checked). Raises FileNotFoundError for a missing folder, LayoutError when
    nothing matches (naming the layouts and what the folder holds)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--dataset_dir {root} is not a directory")
    if layout not in ("auto", *LAYOUTS):
        raise LayoutError(f"--layout={layout}: choose auto, {', '.join(LAYOUTS)}")
    files = _walk(root)
    meta_path = os.path.join(root, "dataset.json")
    has_folders = all(os.path.isdir(os.path.join(root, d)) for d in ("imagesTr", "labelsTr"))
    if os.path.isfile(meta_path) and has_folders and layout in ("auto", "msd", "nnunet"):
        meta = _read_json(meta_path)
        if "channel_names" in meta and layout in ("auto", "nnunet"):
            found = _nnunet(root, meta, files)
        elif "modality" in meta and layout in ("auto", "msd"):
            found = _msd(root, meta, files)
        else:
            raise LayoutError(f"{meta_path} has neither 'modality' (MSD) nor 'channel_names' "
                              f"(nnU-Net v2){'' if layout == 'auto' else f' as --layout={layout} needs'}")
    elif layout in ("auto", "lits") and any(_LITS_RE.match(f.rsplit("/", 1)[-1]) for f in files):
        found = _lits(root, files)
    else:
        want = LAYOUT_HELP if layout == "auto" else f"the {layout} layout"
        raise LayoutError(f"{root} matches no known layout; expected {want}; found "
                          f"{_describe(root, files)}")
    if not any(c.image and c.label for c in found.cases):
        raise LayoutError(f"{root} looks like the {found.layout} layout but has no case with "
                          f"both an image and a label map; found {_describe(root, files)}")
    return found
