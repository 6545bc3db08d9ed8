"""Tissue physics of the phantoms: CT numbers and MR signal equations.

CT: mean Hounsfield units per tissue; an iodinated contrast agent adds the portal-venous
enhancement of each tissue (vessels and kidneys +150–200 HU, liver and spleen ≈ +90).
MR: 1.5 T relaxation times (T1, T2 in ms) and proton density per tissue; the image is
the textbook steady-state signal of the pulse sequence:

    spin echo           S = PD · (1 − e^(−TR/T1)) · e^(−TE/T2)
    inversion recovery  S = PD · |1 − 2e^(−TI/T1) + e^(−TR/T1)| · e^(−TE/T2)
    spoiled gradient    S = PD · sin α (1 − E1) / (1 − cos α · E1) · e^(−TE/T2*)
    diffusion (EPI SE)  S = SE(TR, TE) · e^(−b·ADC)

Gadolinium shortens T1 (1/T1' = 1/T1 + ΔR1, ΔR1 per tissue: vessels, kidneys, mucosa,
meninges, liver, spleen; none in brain parenchyma behind the blood–brain barrier). Flowing
blood is dark in spin echo (flow void) and brightens after gadolinium (slow flow, short T1).
"""

from __future__ import annotations

import numpy as np

from data_prep.phantoms import anatomy

# --- CT ---------------------------------------------------------------------------------
HU = np.zeros(anatomy.NUM_TISSUES, np.float32)
HU_ENHANCE = np.zeros(anatomy.NUM_TISSUES, np.float32)
for t, hu, enh in [
    (anatomy.AIR, -1000, 0), (anatomy.FAT, -100, 0), (anatomy.MUSCLE, 48, 12), (anatomy.BONE, 950, 0),
    (anatomy.MARROW, 260, 15), (anatomy.WM, 27, 3), (anatomy.GM, 38, 4), (anatomy.CSF, 6, 0), (anatomy.LUNG, -860, 15),
    (anatomy.BLOOD, 42, 190), (anatomy.LIVER, 58, 95), (anatomy.SPLEEN, 48, 100), (anatomy.KIDNEY, 32, 165),
    (anatomy.BOWEL, 35, 45), (anatomy.URINE, 8, 0), (anatomy.GLAND, 32, 25), (anatomy.MUCOSA, 48, 70),
    (anatomy.DURA, 45, 80), (anatomy.TUMOUR, 36, 20), (anatomy.DISC, 85, 5), (anatomy.FLUID, 8, 0), (anatomy.SOFT, 42, 45),
]:
    HU[t] = hu
    HU_ENHANCE[t] = enh

# --- MR (1.5 T) -------------------------------------------------------------------------
# tissue: (T1 ms, T2 ms, proton density, gadolinium ΔR1 in 1/ms, ADC in mm²/s)
_MR = {
    anatomy.AIR: (1000, 1, 0.0, 0, 0), anatomy.FAT: (260, 110, 0.95, 0, 0.0001),
    anatomy.MUSCLE: (870, 47, 0.75, 1 / 2500, 0.0015), anatomy.BONE: (1000, 2, 0.04, 0, 0.0003),
    anatomy.MARROW: (550, 60, 0.85, 1 / 3000, 0.0004), anatomy.WM: (780, 85, 0.69, 0, 0.0007),
    anatomy.GM: (1250, 105, 0.82, 0, 0.0008), anatomy.CSF: (4000, 2000, 1.0, 0, 0.003),
    anatomy.LUNG: (1200, 30, 0.1, 0, 0.001), anatomy.BLOOD: (1400, 180, 0.85, 1 / 90, 0.0015),
    anatomy.LIVER: (490, 45, 0.72, 1 / 450, 0.0012), anatomy.SPLEEN: (780, 62, 0.8, 1 / 380, 0.0009),
    anatomy.KIDNEY: (800, 75, 0.82, 1 / 180, 0.0019), anatomy.BOWEL: (900, 60, 0.7, 1 / 400, 0.0012),
    anatomy.URINE: (3500, 1500, 1.0, 0, 0.003), anatomy.GLAND: (1000, 60, 0.75, 1 / 700, 0.0014),
    anatomy.MUCOSA: (900, 85, 0.8, 1 / 220, 0.0013), anatomy.DURA: (800, 60, 0.6, 1 / 140, 0.001),
    anatomy.TUMOUR: (950, 95, 0.82, 1 / 350, 0.001), anatomy.DISC: (1100, 120, 0.8, 0, 0.0014),
    anatomy.FLUID: (3800, 1800, 1.0, 0, 0.003), anatomy.SOFT: (900, 80, 0.78, 1 / 450, 0.0013),
}
T1 = np.array([_MR[t][0] for t in range(anatomy.NUM_TISSUES)], np.float64)
T2 = np.array([_MR[t][1] for t in range(anatomy.NUM_TISSUES)], np.float64)
PD = np.array([_MR[t][2] for t in range(anatomy.NUM_TISSUES)], np.float64)
GAD_R1 = np.array([_MR[t][3] for t in range(anatomy.NUM_TISSUES)], np.float64)
ADC = np.array([_MR[t][4] for t in range(anatomy.NUM_TISSUES)], np.float64)
FLOW_VOID = 0.12        # fraction of blood signal left in spin echo without gadolinium
FLOW_VOID_GAD = 0.7     # slow venous flow with short T1 after gadolinium


def ct_table(contrast: bool, enhancement_scale: float = 1.0) -> np.ndarray:
    """HU per tissue label, float32 [NUM_TISSUES]."""
    return HU + (HU_ENHANCE * enhancement_scale if contrast else 0.0)


def mr_table(kind: str, tr: float, te: float, ti: float | None, flip_deg: float,
             contrast: bool, b_value: float = 0.0) -> np.ndarray:
    """Relative MR signal (0…1) per tissue label for a pulse sequence.

    kind: 'SE', 'IR', 'GR' or 'EPI'. Times in ms.
    """
    r1 = 1.0 / T1 + (GAD_R1 if contrast else 0.0)
    e1 = np.exp(-tr * r1)
    if kind == "SE":
        s = PD * (1 - e1) * np.exp(-te / T2)
    elif kind == "IR":
        s = PD * np.abs(1 - 2 * np.exp(-ti * r1) + e1) * np.exp(-te / T2)
    elif kind == "GR":
        a = np.deg2rad(flip_deg)
        s = PD * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-te / (0.5 * T2))
    elif kind == "EPI":
        s = PD * (1 - e1) * np.exp(-te / T2) * np.exp(-b_value * ADC)
        s[anatomy.FAT] *= 0.05   # diffusion is always fat-suppressed
    else:
        raise ValueError(f"unknown MR sequence kind {kind!r}")
    if kind in ("SE", "IR", "EPI"):
        s[anatomy.BLOOD] *= FLOW_VOID_GAD if contrast else FLOW_VOID
    return s.astype(np.float32)


def bias_field(points_lps: np.ndarray, center: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Smooth multiplicative receive-coil field over points [..., 3] (≈ 0.7–1.3)."""
    d = (points_lps - center) / 250.0
    lin = d @ coeffs[:3]
    quad = coeffs[3] * (d ** 2).sum(-1)
    return np.exp(np.clip(lin + quad, -0.4, 0.4)).astype(np.float32)
