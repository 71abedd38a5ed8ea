"""Segment names -> Slicer terminology entries, and colours.

A segment named after a target that Slicer's "3D Slicer General Anatomy list" knows gets that terminology
entry (SNOMED CT codes) as its ``TerminologyEntry`` tag, so Slicer shows the standard name and colour and
DICOM SEG export carries the codes. The colour is Slicer's recommended colour for that entry; in Slicer the
module asks the Terminologies logic for it, and falls back to this table (the engine's, which holds the same
values) when the terminology cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass

from rcmed_engine.terminology import segment_color

# The string format Slicer serialises a terminology entry to (vtkSlicerTerminologiesModuleLogic):
# context~category~type~type modifier~anatomic context~anatomic region~region modifier (no trailing "|":
# SerializeTerminologyEntry writes none, so a "|" would not round-trip; test_slicer_core.py holds this)
# where each code is "CodingSchemeDesignator^CodeValue^CodeMeaning".
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

_ANATOMY = ("SCT", "123037004", "Anatomical Structure")
_ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
_LEFT = ("SCT", "7771000", "Left")
_RIGHT = ("SCT", "24028007", "Right")

# name -> (category, type, modifier or None). Only codes of Slicer's General Anatomy list.
_ENTRIES: dict[str, tuple[tuple[str, str, str], tuple[str, str, str], tuple[str, str, str] | None]] = {
    "liver": (_ANATOMY, ("SCT", "10200004", "Liver"), None),
    "spleen": (_ANATOMY, ("SCT", "78961009", "Spleen"), None),
    "kidney": (_ANATOMY, ("SCT", "64033007", "Kidney"), None),
    "left kidney": (_ANATOMY, ("SCT", "64033007", "Kidney"), _LEFT),
    "right kidney": (_ANATOMY, ("SCT", "64033007", "Kidney"), _RIGHT),
    "pancreas": (_ANATOMY, ("SCT", "15776009", "Pancreas"), None),
    "stomach": (_ANATOMY, ("SCT", "69695003", "Stomach"), None),
    "gallbladder": (_ANATOMY, ("SCT", "28231008", "Gallbladder"), None),
    "aorta": (_ANATOMY, ("SCT", "15825003", "Aorta"), None),
    "lung": (_ANATOMY, ("SCT", "39607008", "Lung"), None),
    "left lung": (_ANATOMY, ("SCT", "39607008", "Lung"), _LEFT),
    "right lung": (_ANATOMY, ("SCT", "39607008", "Lung"), _RIGHT),
    "heart": (_ANATOMY, ("SCT", "80891009", "Heart"), None),
    "brain": (_ANATOMY, ("SCT", "12738006", "Brain"), None),
    "prostate": (_ANATOMY, ("SCT", "41216001", "Prostate"), None),
    "urinary bladder": (_ANATOMY, ("SCT", "89837001", "Urinary bladder"), None),
    "bladder": (_ANATOMY, ("SCT", "89837001", "Urinary bladder"), None),
    "tumor": (_ALTERED, ("SCT", "108369006", "Neoplasm"), None),
    "tumour": (_ALTERED, ("SCT", "108369006", "Neoplasm"), None),
    "lesion": (_ALTERED, ("SCT", "52988006", "Lesion"), None),
}


def _code(c: tuple[str, str, str] | None) -> str:
    return "^".join(c) if c else "^^"


def normalize(name: str) -> str:
    return " ".join(str(name).lower().split())


@dataclass(frozen=True)
class TerminologyMatch:
    name: str
    entry: str  # serialised terminology entry, the value of the segment's "TerminologyEntry" tag
    type_meaning: str
    color: tuple[float, float, float]


def lookup(name: str) -> TerminologyMatch | None:
    """The terminology entry for a target name, or None when the General Anatomy list has no match."""
    key = normalize(name)
    hit = _ENTRIES.get(key)
    if hit is None:
        return None
    category, typ, modifier = hit
    entry = "~".join([TERMINOLOGY_CONTEXT, _code(category), _code(typ), _code(modifier),
                      ANATOMIC_CONTEXT, "^^", "^^"])
    return TerminologyMatch(name=key, entry=entry, type_meaning=typ[2], color=segment_color(key))


def color_for(name: str, index: int = 0) -> tuple[float, float, float]:
    """Slicer's colour for a known structure; otherwise the ``index``-th colour of a distinct palette."""
    return segment_color(name, index)
