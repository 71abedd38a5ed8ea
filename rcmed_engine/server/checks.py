"""Request checks several routes share (limits live in limits.py): each fails as a 422 with one line."""

from __future__ import annotations

from ..geometry import Volume
from .errors import ApiError, one_line


def n_slices(volume: Volume, axis: str) -> int:
    """How many slices the engine will cut along ``axis``."""
    try:
        frame = volume.slice_frame(axis)
    except ValueError as exc:
        raise ApiError(422, one_line(exc)) from None
    return int(volume.array.shape[frame.slice_axis])


def check_modality(modality: str | None) -> None:
    if modality is None or modality == "auto":
        return
    from ..preprocess import canonical_modality  # numpy-only, but not needed until a modality is named

    try:
        canonical_modality(modality)
    except ValueError as exc:
        raise ApiError(422, one_line(exc)) from None
