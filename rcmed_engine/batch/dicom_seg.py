"""``--format dcm``: the label map as DICOM SEG (highdicom), referencing the source series' instances, one
segment per target labelled with the prompt's name, SNOMED CT codes where the table knows the structure, and
the algorithm identified (RCMed, version, preset, weights hash)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

# SNOMED CT codes of structures the prompts often name (as in Slicer's and DCMQI's anatomy terminology).
SNOMED: dict[str, tuple[str, str]] = {
    "liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"), "kidney": ("64033007", "Kidney"),
    "left kidney": ("18639004", "Left kidney"), "right kidney": ("9846003", "Right kidney"),
    "pancreas": ("15776009", "Pancreas"), "stomach": ("69695003", "Stomach"),
    "gallbladder": ("28231008", "Gallbladder"), "aorta": ("15825003", "Aorta"), "heart": ("80891009", "Heart"),
    "lung": ("39607008", "Lung"), "brain": ("12738006", "Brain"), "prostate": ("41216001", "Prostate"),
    "bladder": ("89837001", "Urinary bladder"), "urinary bladder": ("89837001", "Urinary bladder"),
    "bone": ("272673000", "Bone"),
}
ANATOMY = ("123037004", "Anatomical Structure")
TISSUE = ("85756007", "Tissue")


def _codes(name: str):
    from highdicom.sr import CodedConcept

    known = SNOMED.get(" ".join(name.lower().split()))
    category, kind = (ANATOMY, known) if known else (TISSUE, TISSUE)
    return CodedConcept(category[0], "SCT", category[1]), CodedConcept(kind[0], "SCT", kind[1])


def _descriptions(result, model: dict[str, Any]):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    algorithm = hd.AlgorithmIdentificationSequence(
        name="RCMed", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={"preset": str(model.get("preset")), "weights_sha256": str(model.get("weights_sha256")),
                    "prompt": result.prompt[:64]})
    out = []
    for i, name in enumerate(result.targets):
        category, kind = _codes(name)
        out.append(hd.seg.SegmentDescription(segment_number=i + 1, segment_label=name[:64],
                                             segmented_property_category=category, segmented_property_type=kind,
                                             algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                             algorithm_identification=algorithm))
    return out


def write_dicom_seg(path: Path, result, volume, model: dict[str, Any]) -> Path:
    """Frame k of the SEG is slice k of the label map, on source instance k (the series in the order the
    reader stacked it). Written to a temporary name, then renamed (atomic)."""
    import highdicom as hd
    import pydicom

    files = volume.meta.get("dicom_file_names")
    if not files or len(files) != result.labels.shape[0]:
        raise ValueError("DICOM SEG needs a DICOM series of single-frame instances as input")
    sources = [pydicom.dcmread(f) for f in files]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(result.labels, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(result, model), series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="RCMed",
        manufacturer_model_name=f"RCMed {model.get('preset')}", software_versions=str(model.get("engine_version")),
        device_serial_number="0", series_description=f"RCMed: {result.prompt}"[:64], omit_empty_frames=False)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp.dcm")
    try:
        seg.save_as(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
