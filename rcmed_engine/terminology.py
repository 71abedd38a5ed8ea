"""Segment colours: anatomical structures get the colours Slicer's terminology gives them."""

from __future__ import annotations

# RGB in 0..255, as in Slicer's SegmentationCategoryTypeModifier-SlicerGeneralAnatomy terminology.
_COLORS: dict[str, tuple[int, int, int]] = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney": (185, 102, 83),
    "left kidney": (185, 102, 83),
    "right kidney": (185, 102, 83),
    "pancreas": (249, 180, 111),
    "stomach": (216, 132, 105),
    "gallbladder": (139, 150, 98),
    "aorta": (224, 97, 76),
    "lung": (197, 165, 145),
    "left lung": (197, 165, 145),
    "right lung": (197, 165, 145),
    "heart": (206, 110, 84),
    "brain": (250, 250, 225),
    "white matter": (250, 250, 225),
    "grey matter": (100, 100, 130),
    "gray matter": (100, 100, 130),
    "prostate": (230, 158, 140),
    "bladder": (222, 154, 132),
    "urinary bladder": (222, 154, 132),
    "bone": (241, 214, 145),
    "tumor": (144, 238, 144),
    "tumour": (144, 238, 144),
    "lesion": (144, 238, 144),
    "cell nuclei": (111, 184, 210),
    "nuclei": (111, 184, 210),
}

# Distinct fallbacks for names the table does not know (Slicer's GenericAnatomyColors order).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
    (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0),
)


def segment_color(name: str, index: int = 0) -> tuple[float, float, float]:
    """Colour (0..1) for a segment named ``name``; the ``index``-th fallback when unknown."""
    rgb = _COLORS.get(" ".join(name.lower().split()), _PALETTE[index % len(_PALETTE)])
    return (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)
