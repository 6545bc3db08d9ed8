"""LiTS-format liver CT cases from the phantom anatomy.

``volume-<k>.nii`` (int16 HU) and ``segmentation-<k>.nii`` (uint8: 0 background,
1 liver, 2 tumour), NIfTI-1, uncompressed, as the LiTS challenge ships them.

Orientation (the LiTS convention as DICOM-to-NIfTI converters write it): the array is
``[x, y, z]`` = [image column, image row, slice] of an axial DICOM series, and the
affine maps it to RAS+ world coordinates with negative x and y steps, so nibabel's
``aff2axcodes`` gives ``('L', 'P', 'S')``. One case in four stores its slices from
superior to inferior (``('L', 'P', 'I')``, negative z step), which readers must honour
through the affine. Slice spacing varies over 0.7–5 mm; in-plane 128 × 128 pixels of
2.8–3.4 mm (kept small for tests).

``write_cases`` writes the LiTS file names; ``write_msd`` the same cases in the Medical
Segmentation Decathlon layout (``Task03_Liver``: ``dataset.json``, ``imagesTr/liver_<k>.nii.gz``,
``labelsTr/liver_<k>.nii.gz``, labels 0 background, 1 liver, 2 cancer), the way most people
download LiTS today::

    python -m data_prep.phantoms.lits --out=DIR --cases=6 [--layout=msd|lits] [--seed=0]
"""

from __future__ import annotations

import math
import os

import numpy as np

from data_prep.phantoms import anatomy, physics, render

SLICE_SPACINGS_MM = (0.7, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0)
IN_PLANE = 128
MIN_SLICES, MAX_SLICES = 60, 300


def make_case(seed: int, k: int):
    """(hu int16 [x, y, z], seg uint8 [x, y, z], affine 4×4) of case k."""
    rng = np.random.default_rng([seed, 50_000 + k])
    body = anatomy.make_anatomy(rng, bool(rng.uniform() < 0.5))
    order = np.random.default_rng([seed, 49_999]).permutation(len(SLICE_SPACINGS_MM))
    dz = SLICE_SPACINGS_MM[int(order[k % len(order)])]
    lo, hi = body.region_z["liver"]
    liver_len = hi - lo
    margin = float(rng.uniform(15, 60))
    margin = min(margin, (MAX_SLICES - 1) * dz / 2 - liver_len / 2 - 1)
    n = int(math.ceil((liver_len + 2 * margin) / dz)) + 1
    n = min(max(n, MIN_SLICES), MAX_SLICES)
    ox, oy, oz = body.origin_lps
    zc = (lo + hi) / 2 + oz
    fov = float(rng.uniform(360, 430))
    pix = fov / IN_PLANE
    grid = anatomy.build_labels(body, zc - oz - n * dz / 2 - 10, zc - oz + n * dz / 2 + 10)
    center = np.array([ox + rng.uniform(-10, 10), oy + rng.uniform(-10, 10), zc])
    row_cos, col_cos, normal = np.eye(3)[0], np.eye(3)[1], np.eye(3)[2]
    corner0 = center - row_cos * pix * (IN_PLANE - 1) / 2 - col_cos * pix * (IN_PLANE - 1) / 2
    offsets = (np.arange(n) - (n - 1) / 2) * dz
    args = (body.origin_lps, corner0, row_cos, col_cos, normal, offsets, IN_PLANE, IN_PLANE, pix, pix)
    hu = render.sample(grid, physics.ct_table(True, float(rng.uniform(0.9, 1.1))), *args, -1000.0)
    hu += rng.normal(0, float(rng.uniform(6, 14)), hu.shape).astype(np.float32)
    onehot = np.zeros(anatomy.NUM_TISSUES, np.float32)
    onehot[[anatomy.LIVER, anatomy.TUMOUR]] = 1
    liver = render.sample(grid, onehot, *args, 0.0) >= 0.5
    onehot[:] = 0
    onehot[anatomy.TUMOUR] = 1
    tumour = render.sample(grid, onehot, *args, 0.0) >= 0.5
    seg = np.where(tumour & liver, 2, np.where(liver, 1, 0)).astype(np.uint8)   # [z, row, col]
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    # [slice, row, col] → [x=col, y=row, z=slice]
    hu_xyz = np.ascontiguousarray(hu.transpose(2, 1, 0))
    seg_xyz = np.ascontiguousarray(seg.transpose(2, 1, 0))
    first = corner0 + normal * offsets[0]            # LPS of voxel (0, 0, 0)
    affine = np.array([[-pix, 0, 0, -first[0]],
                       [0, -pix, 0, -first[1]],
                       [0, 0, dz, first[2]],
                       [0, 0, 0, 1]], np.float64)
    if k % 4 == 3:                                   # slices stored superior → inferior
        hu_xyz = np.ascontiguousarray(hu_xyz[:, :, ::-1])
        seg_xyz = np.ascontiguousarray(seg_xyz[:, :, ::-1])
        affine[2, 3] = first[2] + (n - 1) * dz
        affine[2, 2] = -dz
    return hu_xyz, seg_xyz, affine


def _save(path: str, arr: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib  # noqa: PLC0415

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def write_cases(out_dir: str, cases: int, seed: int) -> list[str]:
    """LiTS names: ``volume-<k>.nii`` and ``segmentation-<k>.nii`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(cases):
        hu, seg, affine = make_case(seed, k)
        for name, arr in ((f"volume-{k}.nii", hu), (f"segmentation-{k}.nii", seg)):
            path = os.path.join(out_dir, name)
            _save(path, arr, affine)
            paths.append(path)
    return paths


MSD_LABELS = {"0": "background", "1": "liver", "2": "cancer"}


def write_msd(out_dir: str, cases: int, seed: int) -> list[str]:
    """The Decathlon's Task03_Liver layout in ``out_dir`` (the same cases as write_cases)."""
    import json  # noqa: PLC0415

    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    paths, training = [], []
    for k in range(cases):
        hu, seg, affine = make_case(seed, k)
        for sub, arr in (("imagesTr", hu), ("labelsTr", seg)):
            path = os.path.join(out_dir, sub, f"liver_{k}.nii.gz")
            _save(path, arr, affine)
            paths.append(path)
        training.append({"image": f"./imagesTr/liver_{k}.nii.gz",
                         "label": f"./labelsTr/liver_{k}.nii.gz"})
    meta = {"name": "Liver", "description": "radnet phantom liver CT (synthetic)",
            "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": MSD_LABELS,
            "numTraining": cases, "numTest": 0, "training": training, "test": []}
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return paths


def main(argv):
    from absl import flags  # noqa: PLC0415

    del argv
    f = flags.FLAGS
    write = write_msd if f.layout == "msd" else write_cases
    paths = write(f.out, f.cases, f.seed)
    print(f"{len(paths) // 2} {f.layout} phantom liver cases in {f.out}")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_integer("cases", 6, "Number of cases.")
    flags.DEFINE_integer("seed", 0, "Seed (the same cases as data_prep.phantoms --seed).")
    flags.DEFINE_enum("layout", "msd", ["msd", "lits"], "File layout.")
    app.run(main)
