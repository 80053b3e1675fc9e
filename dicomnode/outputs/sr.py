"""TID 1500 Measurement Report in a Comprehensive SR (PS3.16 TID 1500, 1501, 1411).

One study-level group (TID 1501, tracking identifier "AI diagnosis") holds the
diagnosis, the class probabilities and the scan measurements (LVR, PLR, volumes,
counts); one volumetric group (TID 1411) per SEG segment holds that segment's volume,
mean HU, density class and site. Quantities without a standard code use the private
scheme 99DCMNODE, declared in CodingSchemeIdentificationSequence. The report is
complete but preliminary and unverified: nobody has reviewed it.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ai.analysis import LesionStats, ScanAnalysis
from ai.labels import Diagnosis
from dicomnode.outputs import (
    MANUFACTURER,
    MODEL_NAME,
    RESEARCH_NOTICE,
    OutputSeries,
    Provenance,
    date_series,
    output_series_number,
    prepare_sources,
    series_description,
)
from dicomnode.outputs.seg import LESIONS_SEGMENT, LUNG_SEGMENT

SERIES_DESCRIPTION = "AI report (DeepSC)"
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row 12's container concept."""
ALGORITHM_PARAMETERS = "Algorithm parameters: "
"""How the comment beside the research notice that gives `Provenance.algorithm_parameters`
begins."""
CAVEAT = "Caveat: "
"""How a comment that states a limit of the result (`ai.infer.Analysis.caveats`) begins."""

SCHEME = "99DCMNODE"
CODING_SCHEME = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=SCHEME,
    name="dicomnode AI measurements",
    responsible_organization="dicomnode",
)

DIAGNOSIS = Code("439401001", "SCT", "Diagnosis")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
COVID19 = Code("840539006", "SCT", "COVID-19")
CAP = Code("385093006", "SCT", "Community acquired pneumonia")
DISEASE_CODES = {Diagnosis.COVID19: COVID19, Diagnosis.CAP: CAP}

PROBABILITY_CODES = {
    Diagnosis.COVID19: Code("P-COVID19", SCHEME, "Probability of COVID-19"),
    Diagnosis.CAP: Code("P-CAP", SCHEME, "Probability of community acquired pneumonia"),
    Diagnosis.NON_PNEUMONIA: Code("P-NONPNEU", SCHEME, "Probability of no pneumonia"),
}
LVR = Code("LVR", SCHEME, "Lesion volume ratio")
PLR = Code("PLR", SCHEME, "Peripheral lesion ratio")
PERIPHERAL_THICKNESS = Code("PERIPH-MM", SCHEME, "Peripheral band thickness")
OUTLINE_CLOSING = Code("PERIPH-CLOSE-MM", SCHEME, "Lung outline closing radius")
LESION_COUNT = Code("LESION-N", SCHEME, "Number of lesions")
LESION_VOLUME = Code("LESION-VOL", SCHEME, "Total lesion volume")
LUNG_VOLUME = Code("LUNG-VOL", SCHEME, "Lung volume")
SPREAD = Code("SPREAD-MM", SCHEME, "Lesion spread")
GGO_FRACTION = Code("GGO-FRAC", SCHEME, "Ground-glass fraction of lesion volume")
CONSOLIDATION_FRACTION = Code("CONS-FRAC", SCHEME, "Consolidation fraction of lesion volume")
DENSITY = Code("DENSITY", SCHEME, "Lesion density class")
GROUND_GLASS = Code("GGO", SCHEME, "Ground-glass opacity")
CONSOLIDATION = Code("CONSOLIDATION", SCHEME, "Consolidation")

LESIONS_UNIT = hd.sr.CodedConcept("{lesions}", "UCUM", "lesions")
HU_UNIT = codes.UCUM.HounsfieldUnit
SIDES = {"right": codes.SCT.Right, "left": codes.SCT.Left}


def _algorithm(provenance: Provenance) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=provenance.algorithm_name, version=provenance.model_version
    )


def _number(
    name: Code, value: float, unit: Code | hd.sr.CodedConcept, provenance: Provenance,
    derivation: Code | None = None,
) -> hd.sr.Measurement:
    # Every NUM gets an algorithm id: older OHIF crashes on NUM items without children.
    return hd.sr.Measurement(
        name=name, value=round(float(value), 4), unit=unit, derivation=derivation,
        algorithm_id=_algorithm(provenance),
    )


def _diagnosis_group(
    analysis: ScanAnalysis, probabilities: Sequence[float], diagnosis: Diagnosis,
    provenance: Provenance,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    pct = codes.UCUM.Percent
    evaluations = [hd.sr.QualitativeEvaluation(
        PNEUMONIA, codes.SCT.Absent if diagnosis == Diagnosis.NON_PNEUMONIA else codes.SCT.Present
    )]
    if diagnosis in DISEASE_CODES:
        evaluations.insert(0, hd.sr.QualitativeEvaluation(DIAGNOSIS, DISEASE_CODES[diagnosis]))
    measurements = [
        _number(PROBABILITY_CODES[Diagnosis(i)], 100.0 * p, pct, provenance)
        for i, p in enumerate(probabilities)
    ]
    measurements += [
        _number(LVR, 100.0 * analysis.lvr, pct, provenance),
        _number(LESION_COUNT, analysis.lesion_count, LESIONS_UNIT, provenance),
        _number(LESION_VOLUME, analysis.lesion_volume_ml, codes.UCUM.CubicCentimeter, provenance),
        _number(LUNG_VOLUME, analysis.lung_volume_ml, codes.UCUM.CubicCentimeter, provenance),
        _number(PERIPHERAL_THICKNESS, analysis.peripheral_thickness_mm, codes.UCUM.Millimeter,
                provenance),
        _number(OUTLINE_CLOSING, analysis.outline_closing_mm, codes.UCUM.Millimeter, provenance),
    ]
    optional = [(PLR, analysis.plr, pct, 100.0), (SPREAD, analysis.spread_mm,
                codes.UCUM.Millimeter, 1.0), (GGO_FRACTION, analysis.ggo_fraction, pct, 100.0),
                (CONSOLIDATION_FRACTION, analysis.consolidation_fraction, pct, 100.0)]
    for code, value, unit, scale in optional:
        if value is not None:  # undefined without lesions (0/0): omitted, not zero
            measurements.append(_number(code, scale * value, unit, provenance))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=provenance.uid("sr", "tracking", "AI diagnosis"), identifier="AI diagnosis"
        ),
        algorithm_id=_algorithm(provenance),
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _segment_reference(seg: Dataset, number: int, ct_series_uid: str) -> hd.sr.ReferencedSegment:
    # Not ReferencedSegment.from_segmentation: it fails for empty segments.
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(ct_series_uid),
    )


def _segment_tracking_uid(segmentation: Dataset, number: int) -> str:
    return next(str(item.TrackingUID) for item in segmentation.SegmentSequence
                if int(item.SegmentNumber) == number)


def _volume_group(
    label: str, segmentation: Dataset, segment_number: int, ct_series: str, volume_ml: float,
    mean_hu: float | None, provenance: Provenance, finding: Code, site: hd.sr.FindingSite,
    density: Code | None = None,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for one SEG segment, tracked under the segment's own Tracking UID (PS3.3
    C.8.20.4: one finding across reporting objects; viewers pair them by it)."""
    measurements = [_number(codes.SCT.Volume, volume_ml, codes.UCUM.CubicCentimeter, provenance)]
    if mean_hu is not None:
        measurements.append(_number(codes.DCM.AttenuationCoefficient, mean_hu, HU_UNIT,
                                    provenance, derivation=codes.SCT.Mean))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_segment_tracking_uid(segmentation, segment_number), identifier=label
        ),
        referenced_segment=_segment_reference(segmentation, segment_number, ct_series),
        finding_type=finding,
        algorithm_id=_algorithm(provenance),
        finding_sites=[site],
        measurements=measurements,
        qualitative_evaluations=(
            [hd.sr.QualitativeEvaluation(DENSITY, density)] if density else None
        ),
    )


def _lesion_site(stats: LesionStats) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(
        codes.SCT.Lung,
        laterality=SIDES.get(stats.side or ""),
        topographical_modifier=(
            codes.SCT.Peripheral if stats.peripheral_fraction >= 0.5 else codes.SCT.Central
        ),
    )


def build_report(
    source_images: Sequence[Dataset],
    segmentation: Dataset,
    lesion_segments: dict[int, int],
    analysis: ScanAnalysis,
    probabilities: Sequence[float],
    diagnosis: Diagnosis,
    provenance: Provenance,
    *,
    image_library: bool = False,
    caveats: Sequence[str] = (),
) -> Dataset:
    """The Comprehensive SR for one analysed series, referencing the CT and the SEG.

    `image_library`: add TID 1600 (an entry per CT image with its geometry), which some
    SR consumers index images by; optional in TID 1500, and slow to build (highdicom).
    `caveats`: limits of the result, each a comment beside the research notice."""
    prepare_sources(source_images)
    ct_series = str(source_images[0].SeriesInstanceUID)
    groups: list[object] = [_diagnosis_group(analysis, probabilities, diagnosis, provenance)]
    groups.append(_volume_group(
        "Lungs", segmentation, LUNG_SEGMENT, ct_series, analysis.lung_volume_ml,
        analysis.lung_mean_hu, provenance, codes.SCT.Lung, hd.sr.FindingSite(codes.SCT.Lung)))
    groups.append(_volume_group(
        "Pneumonia lesions", segmentation, LESIONS_SEGMENT, ct_series,
        analysis.lesion_volume_ml, analysis.lesion_mean_hu, provenance, codes.SCT.Lesion,
        hd.sr.FindingSite(codes.SCT.Lung)))
    for stats in analysis.lesions:
        number = lesion_segments.get(stats.index)
        if number is None:
            continue  # beyond the SEG's cap of individual lesion segments
        density = CONSOLIDATION if stats.density == "consolidation" else GROUND_GLASS
        groups.append(_volume_group(
            f"Lesion {stats.index}", segmentation, number, ct_series, stats.volume_ml,
            stats.mean_hu, provenance, codes.SCT.Lesion, _lesion_site(stats), density))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.device_uid, name=provenance.station_name,
            manufacturer_name=MANUFACTURER, model_name=MODEL_NAME,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,  # type: ignore[arg-type]
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=list(source_images) if image_library else None,
    )
    report[0].ContentSequence.append(_research_notice(provenance, caveats))
    return _comprehensive_sr([*source_images, segmentation], report,
                             series_description(SERIES_DESCRIPTION, source_images[0]),
                             provenance, output_series_number(OutputSeries.SR, source_images[0]))


def _research_notice(
    provenance: Provenance, caveats: Sequence[str] = ()
) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations container holding the research-use statement
    as a TEXT comment: the report must say, as every output does, that nobody reviewed
    it (dicom_outputs.md). Then one comment per caveat, and one that gives the algorithm
    parameters (the SEG's (0066,0032) value) once: in every measurement's TID 4019 they
    tripled the time to build the report."""
    comments = [RESEARCH_NOTICE, *(CAVEAT + caveat for caveat in caveats)]
    if provenance.algorithm_parameters:
        comments.append(ALGORITHM_PARAMETERS + ", ".join(
            f"{k}={v}" for k, v in provenance.algorithm_parameters.items()))
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = [hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=comment,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ) for comment in comments]
    return container


def _comprehensive_sr(
    evidence: Sequence[Dataset], content: Dataset, description: str, provenance: Provenance,
    series_number: int,
) -> Dataset:
    """A new one-instance SR series: complete, preliminary (not final), unverified."""
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence),
        content=content,
        series_instance_uid=provenance.uid(description, "series"),
        series_number=series_number,
        sop_instance_uid=provenance.uid(description, "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=description,
        coding_schemes=[CODING_SCHEME],
        manufacturer_model_name=MODEL_NAME,
        software_versions=provenance.software_versions,
        device_serial_number=provenance.device_serial_number,
    )
    date_series([sr])
    return sr


NOT_ANALYSED = Code("NOT-ANALYSED", SCHEME, "AI analysis not performed")


def build_failure_notice(
    source_header: Dataset, reason: str, provenance: Provenance
) -> Dataset:
    """A short SR telling the PACS that a series was not analysed, and why.

    Without it a radiologist cannot tell "no result yet" from "no result ever".
    """
    prepare_sources([source_header])
    root = hd.sr.ContainerContentItem(name=NOT_ANALYSED)
    root.ContentSequence = [
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=(f"Series {source_header.get('SeriesNumber', '')} "
                   f"({source_header.get('SeriesDescription', '')}) was not analysed: {reason}"),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    return _comprehensive_sr([source_header], root,
                             series_description("AI not analysed (DeepSC)", source_header),
                             provenance,
                             output_series_number(OutputSeries.NOTICE_SR, source_header))
