"""Enhanced MR Image Storage (multi-frame) objects for the phantom PACS.

Modern MR scanners can export a whole series as one object (PS3.3 A.36.2, Enhanced MR
Image IOD): one file, N frames, and the per-slice attributes of a classic MR image moved
into functional groups. The conversion starts from the classic dataset the phantom writer
builds from ``MR_small.dcm`` and

- drops the classic per-slice and acquisition attributes (ImagePositionPatient,
  ImageOrientationPatient, PixelSpacing, SliceThickness, RescaleSlope/Intercept,
  ScanningSequence, SequenceVariant, RepetitionTime, EchoTime, InversionTime, …), which
  the Enhanced MR IOD does not carry at the top level;
- writes the MR Pulse Sequence module (EchoPulseSequence SPIN / GRADIENT, InversionRecovery,
  EchoPlanarPulseSequence) and the MR Image Frame Type (FrameType, AcquisitionContrast);
- puts per frame: FrameContentSequence (stack, in-stack position, dimension index values),
  PlanePositionSequence, PlaneOrientationSequence and PixelValueTransformationSequence;
  shared: PixelMeasuresSequence, MRTimingAndRelatedParametersSequence, MREchoSequence,
  MRModifierSequence, MRImageFrameTypeSequence (and ContrastBolusUsageSequence with the
  Enhanced Contrast/Bolus module when contrast was given);
- stores frames in acquisition (instance) order, as the classic files' InstanceNumbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from data_prep.phantoms import dicom_files

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

# Classic MR Image attributes that the Enhanced MR IOD keeps in functional groups or
# does not define at the top level.
_CLASSIC_ONLY = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "SliceLocation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "ScanningSequence", "SequenceVariant", "ScanOptions", "SequenceName", "RepetitionTime",
    "EchoTime", "InversionTime", "EchoTrainLength", "FlipAngle", "NumberOfAverages",
    "ImagingFrequency", "EchoNumbers", "PercentSampling", "PercentPhaseFieldOfView",
    "PixelBandwidth", "AcquisitionMatrix", "InPlanePhaseEncodingDirection", "SAR", "VariableFlipAngleFlag",
    "dBdt", "WindowCenter", "WindowWidth", "AcquisitionNumber", "TemporalPositionIdentifier",
    "NumberOfTemporalPositions", "DiffusionBValue", "ContrastBolusAgent", "ContrastBolusRoute",
    "ImagesInAcquisition", "SmallestImagePixelValue", "LargestImagePixelValue",
    "TriggerTime", "NominalInterval", "HeartRate", "CardiacNumberOfImages", "TriggerWindow",
    "ReconstructionDiameter", "ReceiveCoilName", "TransmitCoilName", "PatientPosition",
)


def _item(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _acquisition_contrast(spec) -> str:
    """AcquisitionContrast (C.8.16.2.1.4 defined terms) of the phantom's sequence."""
    if spec.pulse == "IR":
        return "FLUID_ATTENUATED" if spec.ti_ms >= 600 else "STIR"
    if spec.pulse == "EPI":
        return "DIFFUSION"
    if spec.pulse == "GR":
        return "MIXED"
    return "T1" if spec.tr_ms < 1000 else "T2"


def enhanced_mr(classic: pydicom.Dataset, spec, frames: Sequence[int], positions: Sequence,
                orientations: Sequence, stored: np.ndarray, slope: float, intercept: float,
                agent: str, sop_uid: str, dim_uid: str) -> pydicom.Dataset:
    """One Enhanced MR object holding ``frames`` (file indices of ``spec``, in frame order).

    positions/orientations: per frame ImagePositionPatient [3] / ImageOrientationPatient [6]
    (floats); stored: [n_frames, rows, cols] stored values in frame order.
    """
    ds = classic
    for kw in _CLASSIC_ONLY:
        if kw in ds:
            delattr(ds, kw)
    dicom_files.set_file_meta(ds, ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.AcquisitionDateTime = f"{ds.StudyDate}{ds.SeriesTime}"
    ds.ContentQualification = "PRODUCT"
    # MR Pulse Sequence module: what ScanningSequence said in a classic image.
    ds.PulseSequenceName = {"SE": "TSE", "IR": "IR_TSE", "GR": "FFE", "EPI": "DwiSE"}[spec.pulse]
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "GRADIENT" if spec.pulse == "GR" else "SPIN"
    ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "YES" if spec.pulse == "EPI" else "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL" if spec.pulse in ("SE", "IR") else "SINGLE"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.NumberOfKSpaceTrajectories = 1
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImagingFrequency = "63.87"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = _acquisition_contrast(spec)
    ds.PixelPresentation = "MONOCHROME"
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Dimension organization: one stack, frames indexed by their position in it.
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionIndexSequence = DicomSequence([
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=Tag("StackID"),
              FunctionalGroupPointer=Tag("FrameContentSequence"), DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=Tag("InStackPositionNumber"),
              FunctionalGroupPointer=Tag("FrameContentSequence"),
              DimensionDescriptionLabel="In-Stack Position Number"),
    ])
    contrast = bool(spec.contrast)
    if contrast:
        # Enhanced Contrast/Bolus module; the agent named only when the classic one was.
        ds.ContrastBolusAgentSequence = DicomSequence([_item(
            CodeValue="C-17800" if agent else "C-B0300", CodingSchemeDesignator="SRT",
            CodeMeaning=agent or "Gadolinium contrast agent", ContrastBolusAgentNumber=1,
            ContrastBolusAdministrationRouteSequence=DicomSequence([_item(
                CodeValue="G-D101", CodingSchemeDesignator="SRT", CodeMeaning="Intravenous route")]),
            ContrastBolusIngredientCodeSequence=DicomSequence([_item(
                CodeValue="C-17800", CodingSchemeDesignator="SRT", CodeMeaning="Gadolinium")]),
        )])
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([_item(
        PixelSpacing=[dicom_files.ds_number(spec.pixel_mm)] * 2, SliceThickness=dicom_files.ds_number(spec.thickness_mm),
        SpacingBetweenSlices=dicom_files.ds_number(spec.slice_spacing_mm))])
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([_item(
        RepetitionTime=float(spec.tr_ms), FlipAngle=float(spec.flip_deg),
        EchoTrainLength=1 if spec.pulse == "GR" or spec.te_ms < 30 else 16,
        RFEchoTrainLength=1 if spec.pulse == "GR" or spec.te_ms < 30 else 16,
        GradientEchoTrainLength=1 if spec.pulse == "GR" else 0)])
    shared.MREchoSequence = DicomSequence([_item(EffectiveEchoTime=float(spec.te_ms))])
    modifier = _item(InversionRecovery="YES" if spec.pulse == "IR" else "NO", FlowCompensation="NONE",
                     T2Preparation="NO", SpatialPresaturation="NONE", PartialFourier="NO")
    if spec.pulse == "IR":
        modifier.InversionTimes = [float(spec.ti_ms)]
    shared.MRModifierSequence = DicomSequence([modifier])
    shared.MRImageFrameTypeSequence = DicomSequence([_item(
        FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
        ComplexImageComponent="MAGNITUDE", AcquisitionContrast=_acquisition_contrast(spec))])
    if contrast:
        shared.ContrastBolusUsageSequence = DicomSequence([_item(
            ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES",
            ContrastBolusAgentDetected="NO")])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    # In-stack position: rank along the slice normal (1 = lowest projection).
    proj = [float(np.dot(p, np.cross(o[:3], o[3:]))) for p, o in zip(positions, orientations)]
    rank = {i: r + 1 for r, i in enumerate(sorted(range(len(frames)), key=lambda i: proj[i]))}
    per_frame = []
    for k, (pos, ori) in enumerate(zip(positions, orientations)):
        item = Dataset()
        item.FrameContentSequence = DicomSequence([_item(
            FrameAcquisitionNumber=1, StackID="1", InStackPositionNumber=rank[k],
            DimensionIndexValues=[1, rank[k]])])
        item.PlanePositionSequence = DicomSequence([_item(
            ImagePositionPatient=[dicom_files.ds_number(v) for v in pos])])
        item.PlaneOrientationSequence = DicomSequence([_item(
            ImageOrientationPatient=[dicom_files.ds_number(v) for v in ori])])
        item.PixelValueTransformationSequence = DicomSequence([_item(
            RescaleIntercept=dicom_files.ds_number(intercept), RescaleSlope=dicom_files.ds_number(slope),
            RescaleType="US")])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = dicom_files.pixel_bytes(np.ascontiguousarray(stored))
    return ds
