"""Analytic adult anatomy for the phantom PACS: tissue labels on a coarse 3D grid.

The body is built from ellipsoids, elliptic cylinders and capsules painted in order
(later shapes overwrite earlier ones) on a grid in the *body frame*: x towards the
patient's left, y posterior, z superior with z = 0 at the vertex (DICOM LPS axes,
shifted). A patient's scanner coordinates are the body frame plus an offset
(``Anatomy.origin_lps``).

Every coverage region has a craniocaudal z-range (``Anatomy.region_z``); its organs lie
inside that range, so "the scan covers the region" is a plain interval test. Lengths
are typical adult values, scaled per patient, never below the minimum lengths of
docs/interfaces.md (checked in ``make_anatomy``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Tissue labels. Their physical properties live in data_prep.phantoms.physics.
AIR, FAT, MUSCLE, BONE, MARROW, WM, GM, CSF, LUNG, BLOOD = range(10)
LIVER, SPLEEN, KIDNEY, BOWEL, URINE, GLAND, MUCOSA, DURA, TUMOUR, DISC = range(10, 20)
FLUID, SOFT = 20, 21
NUM_TISSUES = 22
TISSUE_NAMES = (
    "air", "fat", "muscle", "bone", "marrow", "white_matter", "grey_matter", "csf",
    "lung", "blood", "liver", "spleen", "kidney", "bowel", "urine", "gland", "mucosa",
    "dura", "tumour", "disc", "fluid", "soft_tissue",
)

# Region z-ranges in the body frame at height scale 1 (mm, vertex = 0, inferior < 0).
REGION_Z_MM: dict[str, tuple[float, float]] = {
    "brain": (-140.0, -5.0),
    "upper_head_neck": (-175.0, -100.0),   # sphenoid sinus … oropharynx
    "lower_head_neck": (-255.0, -175.0),   # larynx … lung apex
    "lung": (-485.0, -245.0),
    "breast": (-450.0, -300.0),            # beside the lung, anterior
    "liver": (-600.0, -440.0),
    "kidney": (-630.0, -510.0),
    "intestine": (-830.0, -560.0),
    "pelvis": (-880.0, -710.0),
}
# Minimum craniocaudal lengths of docs/interfaces.md; the anatomy never goes below them.
MIN_REGION_LENGTH_MM: dict[str, float] = {
    "brain": 120.0, "upper_head_neck": 60.0, "lower_head_neck": 70.0, "lung": 220.0,
    "breast": 140.0, "liver": 140.0, "kidney": 100.0, "intestine": 250.0, "pelvis": 150.0,
}
BODY_BOTTOM_MM = -1000.0   # the grid never needs to go below the upper thighs

GRID_MM = 3.0              # coarse grid; images are sampled from it with linear interpolation


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's body. All lengths in mm."""

    height_scale: float
    width_scale: float
    depth_scale: float
    fat_mm: float                 # subcutaneous fat thickness
    female: bool
    origin_lps: tuple[float, float, float]   # LPS position of the body-frame origin
    tumour_center: tuple[float, float, float]  # a liver lesion (body frame)
    tumour_radius_mm: float
    bowel_seed: int

    @property
    def region_z(self) -> dict[str, tuple[float, float]]:
        return {k: (lo * self.height_scale, hi * self.height_scale)
                for k, (lo, hi) in REGION_Z_MM.items()}

    def body_half_width(self, z: float) -> float:
        return self._section(z)[0]

    def body_half_depth(self, z: float) -> float:
        return self._section(z)[1]

    def _section(self, z: float) -> tuple[float, float]:
        """Half width (x) and half depth (y) of the body outline at height z."""
        h = self.height_scale
        if z > -170 * h:
            return 78.0 * self.width_scale, 100.0 * self.depth_scale
        if z > -250 * h:
            return 62.0 * self.width_scale, 65.0 * self.depth_scale
        if z > -700 * h:
            return 170.0 * self.width_scale, 118.0 * self.depth_scale
        return 180.0 * self.width_scale, 115.0 * self.depth_scale


def make_anatomy(rng: np.random.Generator, female: bool) -> Anatomy:
    h = float(rng.uniform(0.96, 1.06))
    a = Anatomy(
        height_scale=h,
        width_scale=float(rng.uniform(0.88, 1.12)),
        depth_scale=float(rng.uniform(0.88, 1.12)),
        fat_mm=float(rng.uniform(8.0, 28.0)),
        female=female,
        origin_lps=(float(rng.uniform(-15, 15)), float(rng.uniform(-25, 5)),
                    float(rng.uniform(-100, 250))),
        tumour_center=(float(rng.uniform(-80, -40)), float(rng.uniform(-10, 25)),
                       float(rng.uniform(-545, -495)) * h),
        tumour_radius_mm=float(rng.uniform(12, 24)),
        bowel_seed=int(rng.integers(1 << 30)),
    )
    for region, (lo, hi) in a.region_z.items():
        if hi - lo < MIN_REGION_LENGTH_MM[region]:
            raise AssertionError(f"anatomy {region} shorter than the minimum")
    return a


class LabelGrid:
    """uint8 tissue labels ``[nz, ny, nx]`` on a regular grid in the body frame."""

    def __init__(self, z_lo: float, z_hi: float, half_x: float = 230.0, half_y: float = 180.0,
                 spacing_mm: float = GRID_MM):
        self.spacing_mm = spacing_mm
        self.origin = np.array([-half_x, -half_y, z_lo], np.float64)   # x, y, z of voxel 0
        self.shape = (int(math.ceil((z_hi - z_lo) / spacing_mm)) + 1,
                      int(math.ceil(2 * half_y / spacing_mm)) + 1,
                      int(math.ceil(2 * half_x / spacing_mm)) + 1)
        self.labels = np.zeros(self.shape, np.uint8)

    def axis(self, i: int) -> np.ndarray:
        """Coordinates (mm) along x (i=0), y (1) or z (2)."""
        n = self.shape[2 - i]
        return self.origin[i] + self.spacing_mm * np.arange(n)

    def _box(self, lo, hi):
        """Index slices and coordinate arrays (broadcastable z, y, x) of a bounding box."""
        sl = []
        coords = []
        for i in range(3):
            n = self.shape[2 - i]
            a = int(math.floor((lo[i] - self.origin[i]) / self.spacing_mm))
            b = int(math.ceil((hi[i] - self.origin[i]) / self.spacing_mm)) + 1
            a, b = max(a, 0), min(b, n)
            if a >= b:
                return None
            sl.append(slice(a, b))
            coords.append(self.origin[i] + self.spacing_mm * np.arange(a, b))
        x, y, z = coords
        return ((sl[2], sl[1], sl[0]), z[:, None, None], y[None, :, None], x[None, None, :])

    def paint(self, label: int, lo, hi, inside) -> None:
        """Sets ``label`` where ``inside(z, y, x)`` holds within the box [lo, hi] (x, y, z)."""
        box = self._box(lo, hi)
        if box is None:
            return
        sl, z, y, x = box
        mask = inside(z, y, x)
        self.labels[sl][mask] = label

    # -- primitives --------------------------------------------------------------------
    def ellipsoid(self, label, c, r, where=None):
        lo = [c[i] - r[i] for i in range(3)]
        hi = [c[i] + r[i] for i in range(3)]

        def inside(z, y, x):
            m = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
            return m & where(z, y, x) if where is not None else m

        self.paint(label, lo, hi, inside)

    def cylinder(self, label, cx, cy, rx, ry, z0, z1, where=None):
        """Elliptic cylinder along z between z0 < z1."""
        def inside(z, y, x):
            m = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1) & (z >= z0) & (z <= z1)
            return m & where(z, y, x) if where is not None else m

        self.paint(label, (cx - rx, cy - ry, z0), (cx + rx, cy + ry, z1), inside)

    def capsule(self, label, p0, p1, r):
        """Tube of radius r between points p0 and p1 (x, y, z), rounded ends."""
        p0 = np.asarray(p0, float)
        p1 = np.asarray(p1, float)
        d = p1 - p0
        dd = float(d @ d) or 1e-9
        lo = np.minimum(p0, p1) - r
        hi = np.maximum(p0, p1) + r

        def inside(z, y, x):
            t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd, 0, 1)
            return ((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2
                    + (z - p0[2] - t * d[2]) ** 2) <= r * r

        self.paint(label, lo, hi, inside)

    def polyline(self, label, points, r):
        for a, b in zip(points[:-1], points[1:]):
            self.capsule(label, a, b, r)


def build_labels(a: Anatomy, z_lo: float, z_hi: float) -> LabelGrid:
    """Paints the whole body between z_lo and z_hi (body frame, mm)."""
    z_lo = max(z_lo, BODY_BOTTOM_MM * a.height_scale) - 2 * GRID_MM
    z_hi = min(z_hi, 40.0) + 2 * GRID_MM
    g = LabelGrid(z_lo, z_hi)
    h, W, D = a.height_scale, a.width_scale, a.depth_scale
    R = a.region_z

    # ---- head -------------------------------------------------------------------------
    hc = (0.0, 5.0 * D, -88.0 * h)
    hr = (76.0 * W, 98.0 * D, 90.0 * h)
    g.ellipsoid(FAT, hc, hr)                                              # scalp
    g.ellipsoid(FAT, (0, -25 * D, -150 * h), (58 * W, 68 * D, 45 * h))    # face
    g.ellipsoid(MUSCLE, (0, -20 * D, -165 * h), (45 * W, 50 * D, 25 * h))  # tongue / floor
    g.ellipsoid(BONE, hc, (hr[0] - 4, hr[1] - 4, hr[2] - 4))              # skull
    inner = (hr[0] - 11, hr[1] - 11, hr[2] - 11)
    g.ellipsoid(DURA, hc, inner)                                          # meninges
    g.ellipsoid(CSF, hc, (inner[0] - 2.5, inner[1] - 2.5, inner[2] - 2.5))
    brain_c = (0.0, hc[1], -75.0 * h)
    brain_r = (inner[0] - 5, inner[1] - 5, 68.0 * h)                       # top at ~ -7
    g.ellipsoid(GM, brain_c, brain_r)
    # White matter: an ellipsoid with a folded surface, so the cortex varies in thickness.
    wm_r = (brain_r[0] - 12, brain_r[1] - 14, brain_r[2] - 16)

    def folded(z, y, x):
        ang = np.arctan2(y - brain_c[1], x) * 9 + (z - brain_c[2]) / 9.0
        rr = ((x / wm_r[0]) ** 2 + ((y - brain_c[1]) / wm_r[1]) ** 2
              + ((z - brain_c[2]) / wm_r[2]) ** 2)
        return rr <= (1 + 0.07 * np.sin(ang)) ** 2

    g.paint(WM, [-wm_r[0] * 1.1, brain_c[1] - wm_r[1] * 1.1, brain_c[2] - wm_r[2] * 1.1],
            [wm_r[0] * 1.1, brain_c[1] + wm_r[1] * 1.1, brain_c[2] + wm_r[2] * 1.1], folded)
    g.ellipsoid(GM, (0, hc[1] + 5, -72 * h), (9, 14, 10))                 # deep grey nuclei
    for s in (-1, 1):
        g.ellipsoid(CSF, (s * 13 * W, hc[1] - 2, -62 * h), (7 * W, 34 * D, 11 * h))  # lateral ventricles
        g.ellipsoid(DURA, (s * 13 * W, hc[1] + 14, -64 * h), (3, 6, 3))   # choroid plexus
    g.ellipsoid(CSF, (0, hc[1] + 2, -80 * h), (2.5, 14 * D, 9 * h))       # third ventricle
    g.ellipsoid(GM, (0, 50 * D, -118 * h), (50 * W, 30 * D, 20 * h))       # cerebellum
    g.ellipsoid(WM, (0, 50 * D, -118 * h), (28 * W, 16 * D, 10 * h))
    g.cylinder(WM, 0, 18 * D, 13, 13, -137 * h, -88 * h)                   # brainstem
    g.ellipsoid(DURA, (0, -5 * D, -108 * h), (6, 5, 4))                    # pituitary
    # Superior sagittal sinus along the inner table, midline (a vessel: enhances).
    pts = [(0.0, hc[1] + inner[1] * math.cos(t) * 0.97, hc[2] + inner[2] * math.sin(t) * 0.97)
           for t in np.linspace(0.35, 2.8, 10)]
    g.polyline(BLOOD, [(p[0], 2 * hc[1] - p[1], p[2]) for p in pts], 4.0)
    for s in (-1, 1):
        g.ellipsoid(FAT, (s * 32 * W, -72 * D, -97 * h), (17, 18, 16))    # orbit fat
        g.ellipsoid(FLUID, (s * 32 * W, -78 * D, -97 * h), (11.5, 11.5, 11.5))  # globe
        g.ellipsoid(MUCOSA, (s * 27 * W, -52 * D, -132 * h), (18, 19, 19))  # maxillary sinus
        g.ellipsoid(AIR, (s * 27 * W, -52 * D, -132 * h), (14, 15, 15))
        g.ellipsoid(MUCOSA, (s * 48 * W, 5 * D, -140 * h), (12, 20, 22))   # parotid
    g.ellipsoid(MUCOSA, (0, -62 * D, -128 * h), (10, 22, 26))              # nasal cavity
    g.ellipsoid(AIR, (0, -62 * D, -128 * h), (6, 18, 22))
    g.ellipsoid(MUCOSA, (0, -18 * D, -113 * h), (14, 12, 10))              # sphenoid sinus
    g.ellipsoid(AIR, (0, -18 * D, -113 * h), (11, 9, 7))
    g.cylinder(BONE, 0, -35 * D, 48 * W, 40 * D, -182 * h, -170 * h,       # mandible (U)
               where=lambda z, y, x: ((x / (48 * W)) ** 2 + ((y + 35 * D) / (40 * D)) ** 2) >= 0.72)
    # ---- trunk -----------------------------------------------------------------------
    segs = [(-700 * h, -245 * h, 170 * W, 118 * D), (BODY_BOTTOM_MM * h, -700 * h, 180 * W, 115 * D)]
    for z0, z1, ax, ay in segs:
        g.cylinder(FAT, 0, 0, ax, ay, z0, z1)
        g.cylinder(MUSCLE, 0, 0, ax - a.fat_mm, ay - a.fat_mm, z0, z1)
        g.cylinder(FAT, 0, 0, ax - a.fat_mm - 16, ay - a.fat_mm - 16, z0, min(z1, -255 * h))
    # Shoulders taper the top of the trunk into the neck.
    g.ellipsoid(MUSCLE, (0, 0, -250 * h), (150 * W, 95 * D, 22 * h))
    # ---- neck ------------------------------------------------------------------------
    ny0 = 8.0 * D
    g.cylinder(FAT, 0, ny0, 62 * W, 65 * D, -250 * h, -165 * h)
    g.cylinder(MUSCLE, 0, ny0, 62 * W - 7, 65 * D - 7, -250 * h, -165 * h)
    g.polyline(AIR, [(0, -10 * D, -120 * h), (0, -12 * D, -175 * h), (0, -22 * D, -200 * h),
                     (0, -24 * D, -290 * h)], 8.5)                         # pharynx → trachea
    g.ellipsoid(SOFT, (0, -30 * D, -195 * h), (18, 14, 14))                # larynx
    g.ellipsoid(AIR, (0, -30 * D, -195 * h), (6, 8, 12))
    for s in (-1, 1):
        g.ellipsoid(MUCOSA, (s * 20 * W, -20 * D, -222 * h), (10, 9, 22))  # thyroid lobes
        g.polyline(BLOOD, [(s * 26 * W, -2 * D, -105 * h), (s * 24 * W, -5 * D, -260 * h),
                           (s * 10 * W, -20 * D, -300 * h)], 4.0)          # carotid
        g.polyline(BLOOD, [(s * 38 * W, 6 * D, -115 * h), (s * 36 * W, 2 * D, -265 * h),
                           (s * 22 * W, -15 * D, -300 * h)], 6.0)          # jugular
    ax_c, ay_c = 170 * W - a.fat_mm - 8, 118 * D - a.fat_mm - 8
    # Lungs (apex and base define the region), heart, great vessels.
    lz_lo, lz_hi = R["lung"]
    lc = (lz_lo + lz_hi) / 2
    for s in (-1, 1):
        g.ellipsoid(LUNG, (s * 72 * W, 8 * D, lc), (66 * W, 88 * D, (lz_hi - lz_lo) / 2))
        g.polyline(BLOOD, [(s * 25 * W, -5 * D, -330 * h), (s * 70 * W, 10 * D, -370 * h),
                           (s * 95 * W, 30 * D, -420 * h)], 4.0)           # pulmonary vessels
        g.polyline(AIR, [(0, -24 * D, -290 * h), (s * 30 * W, -10 * D, -330 * h),
                         (s * 60 * W, 5 * D, -350 * h)], 5.0)              # bronchi
    # Ribs: bands of an elliptic shell every 28 mm down the chest.
    z_ribs = np.arange(-268 * h, -560 * h, -28 * h)

    def ribs(z, y, x):
        q = (x / ax_c) ** 2 + (y / ay_c) ** 2
        band = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), bool)
        for zr in z_ribs:
            band |= np.abs(z - zr - 0.25 * y) < 5
        return (q <= 1) & (q >= 0.86) & band

    g.paint(BONE, (-ax_c, -ay_c, -580 * h), (ax_c, ay_c, -250 * h), ribs)
    g.ellipsoid(MUSCLE, (15 * W, -30 * D, -400 * h), (58 * W, 52 * D, 58 * h))   # heart
    g.ellipsoid(BLOOD, (15 * W, -30 * D, -400 * h), (44 * W, 38 * D, 44 * h))    # chambers
    g.ellipsoid(MUSCLE, (25 * W, -38 * D, -408 * h), (5, 38 * D, 40 * h))       # septum
    g.polyline(BLOOD, [(8 * W, -28 * D, -360 * h), (5 * W, -30 * D, -300 * h),
                       (14 * W, 5 * D, -285 * h), (20 * W, 26 * D, -300 * h),
                       (18 * W, 28 * D, -520 * h), (5 * W, 28 * D, -710 * h)], 12.0)  # aorta
    g.polyline(BLOOD, [(-28 * W, -18 * D, -290 * h), (-25 * W, -18 * D, -370 * h)], 9.0)  # SVC
    g.polyline(BLOOD, [(-20 * W, 18 * D, -430 * h), (-22 * W, 25 * D, -710 * h)], 11.0)  # IVC
    g.ellipsoid(MUSCLE, (8 * W, 28 * D, -330 * h), (7, 7, 60 * h))          # oesophagus
    # Breasts: fat with glandular tissue, anterior to the chest wall.
    bz_lo, bz_hi = R["breast"]
    if a.female:
        for s in (-1, 1):
            c = (s * 78 * W, -118 * D, (bz_lo + bz_hi) / 2)
            g.ellipsoid(FAT, c, (62 * W, 55 * D, (bz_hi - bz_lo) / 2),
                        where=lambda z, y, x: y <= -100 * D)
            g.ellipsoid(GLAND, (c[0], c[1] - 10, c[2]), (40 * W, 30 * D, 45 * h),
                        where=lambda z, y, x: y <= -104 * D)
    # ---- abdomen ---------------------------------------------------------------------
    lv_lo, lv_hi = R["liver"]
    g.ellipsoid(LIVER, (-55 * W, 5 * D, (lv_lo + lv_hi) / 2), (88 * W, 82 * D, (lv_hi - lv_lo) / 2))
    g.polyline(BLOOD, [(-15 * W, 10 * D, -560 * h), (-45 * W, 5 * D, -520 * h),
                       (-80 * W, 0, -500 * h)], 7.0)                        # portal vein
    g.polyline(BLOOD, [(-22 * W, 25 * D, -450 * h), (-60 * W, 10 * D, -470 * h)], 5.0)  # hepatic vein
    g.ellipsoid(FLUID, (-60 * W, -45 * D, -575 * h), (14, 16, 22))          # gallbladder
    g.ellipsoid(TUMOUR, a.tumour_center, (a.tumour_radius_mm,) * 3)
    g.ellipsoid(SPLEEN, (78 * W, 45 * D, -505 * h), (34 * W, 52 * D, 55 * h))
    g.ellipsoid(BOWEL, (50 * W, -35 * D, -500 * h), (48 * W, 40 * D, 50 * h))   # stomach
    g.ellipsoid(AIR, (50 * W, -50 * D, -480 * h), (30 * W, 20 * D, 20 * h))
    g.ellipsoid(SOFT, (10 * W, 10 * D, -550 * h), (55 * W, 14 * D, 14 * h))     # pancreas
    kz_lo, kz_hi = R["kidney"]
    for s in (-1, 1):
        g.ellipsoid(MUSCLE, (s * 45 * W, 70 * D, -680 * h), (22 * W, 22 * D, 130 * h))  # psoas
    for s in (-1, 1):
        kc = (s * 68 * W, 58 * D, (kz_lo + kz_hi) / 2)
        g.ellipsoid(KIDNEY, kc, (28 * W, 26 * D, (kz_hi - kz_lo) / 2))
        g.ellipsoid(FAT, (kc[0] - s * 12 * W, kc[1] - 6, kc[2]), (8, 8, 25 * h))   # renal sinus
        g.polyline(BLOOD, [(s * 4 * W, 30 * D, -570 * h), (kc[0] - s * 15 * W, kc[1], -570 * h)], 4.0)
    # Bowel: colon frame plus small-bowel loops inside the intestine range.
    iz_lo, iz_hi = R["intestine"]
    colon = [(-95 * W, 5 * D, -770 * h), (-95 * W, 0, iz_hi - 22), (0, -55 * D, iz_hi - 22),
             (95 * W, 5 * D, iz_hi - 22), (95 * W, 10 * D, -760 * h), (40 * W, 40 * D, -790 * h),
             (0, 65 * D, iz_lo + 22)]
    g.polyline(BOWEL, colon, 22.0)
    g.polyline(AIR, colon[1:5], 13.0)
    brng = np.random.default_rng(a.bowel_seed)
    for _ in range(22):
        c = (float(brng.uniform(-70, 70)) * W, float(brng.uniform(-70, 20)) * D,
             float(brng.uniform(iz_lo + 60, iz_hi - 40)))
        rad = float(brng.uniform(11, 17))
        g.ellipsoid(BOWEL, c, (rad, rad, rad))
        g.ellipsoid(FLUID if brng.uniform() < 0.6 else AIR, c, (rad - 4, rad - 4, rad - 4))
    # ---- pelvis ----------------------------------------------------------------------
    pz_lo, pz_hi = R["pelvis"]
    for s in (-1, 1):
        g.ellipsoid(BONE, (s * 100 * W, 35 * D, pz_hi - 45), (30 * W, 60 * D, 45 * h))   # iliac wing
        g.ellipsoid(MARROW, (s * 100 * W, 35 * D, pz_hi - 45), (22 * W, 50 * D, 36 * h))
        g.ellipsoid(BONE, (s * 92 * W, 5 * D, pz_lo + 52), (26, 26, 26))   # femoral head
        g.ellipsoid(MARROW, (s * 92 * W, 5 * D, pz_lo + 52), (20, 20, 20))
        g.cylinder(BONE, s * 100 * W, 10 * D, 16, 16, BODY_BOTTOM_MM * h, pz_lo + 40)  # femur
        g.cylinder(MARROW, s * 100 * W, 10 * D, 10, 10, BODY_BOTTOM_MM * h, pz_lo + 40)
        g.polyline(BLOOD, [(s * 3 * W, 35 * D, -710 * h), (s * 60 * W, 15 * D, -800 * h),
                           (s * 85 * W, -15 * D, pz_lo)], 6.0)             # iliac vessels
    g.ellipsoid(BONE, (0, 78 * D, pz_hi - 60), (38 * W, 20 * D, 55 * h))   # sacrum
    g.ellipsoid(MARROW, (0, 78 * D, pz_hi - 60), (30 * W, 13 * D, 47 * h))
    g.ellipsoid(BONE, (0, -82 * D, pz_lo + 28), (30 * W, 12 * D, 22 * h))  # pubic symphysis
    g.ellipsoid(URINE, (0, -45 * D, pz_lo + 60), (45 * W, 38 * D, 34 * h))  # bladder
    g.ellipsoid(SOFT, (0, -5 * D, pz_lo + 35) if not a.female else (0, 5 * D, pz_lo + 95),
                (20, 17, 18) if not a.female else (28, 20, 38))            # prostate / uterus
    g.cylinder(BOWEL, 0, 55 * D, 17, 17, pz_lo + 10, pz_lo + 95)           # rectum
    # ---- spine (from the skull base to the sacrum) -----------------------------------
    for i, zc in enumerate(np.arange(-150 * h, pz_hi - 20, -30 * h)):
        yc = (25 if zc > -250 * h else 60) * D
        g.cylinder(BONE, 0, yc, 19, 17, zc - 12 * h, zc + 12 * h)          # vertebral body
        g.cylinder(MARROW, 0, yc, 15, 13, zc - 10 * h, zc + 10 * h)
        g.cylinder(DISC, 0, yc, 18, 16, zc - 15 * h, zc - 12 * h)           # disc
        g.cylinder(BONE, 0, yc + 28, 15, 13, zc - 10 * h, zc + 10 * h)      # posterior arch
        g.cylinder(CSF, 0, yc + 26, 7.5, 7.5, zc - 15 * h, zc + 15 * h)     # canal
        g.cylinder(WM, 0, yc + 26, 4.5, 4.5, zc - 15 * h, zc + 15 * h)      # cord
    return g
