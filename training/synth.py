"""Training slices that stand for any brain scan, drawn from label maps (after SynthSeg, Billot et al.,
Medical Image Analysis 2023), cut as the engine cuts a volume.

Each draw takes an oblique plane through the atlas (rotations up to ±20° about every axis, a shift,
a scale and a smooth elastic displacement) in one of the three anatomical planes, laid out exactly as
``geometry._PLANE_LAYOUT`` shows that plane (so "left" stays the patient's left), and samples:

* labels, nearest neighbour: the atlas codes, plus a synthetic head around the brain (CSF, bone and
  scalp shells of random thickness) or none;
* intensities: a random Gaussian per label (any contrast, SynthSeg's rule), a contrast family with
  jitter (T1, T2, FLAIR, PD or CT-like), or a real template (optionally inverted);
* the acquisition: partial volume over a thick slice (2–6 mm along the normal) or across one in-plane
  axis (a thick acquisition cut in another plane), bias field, gamma, noise, blur, field-of-view crop.

The slice then goes through the engine's own preprocessing (``to_uint8_rgb``, ``plan_resize``,
``prepare_slices``), so the encoder sees what it sees at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from rcmed_engine.geometry import _PLANE_LAYOUT, PLANES
from rcmed_engine.preprocess import IntensityWindow

from .brain_atlas import CSF, class_lookup, load_atlas_on, resample_to

# Extra labels of the synthetic head (above every atlas code).
HEAD_CSF, BONE, SCALP = 3001, 3002, 3003
N_CODES = 3004

# Tissue of each atlas code, for the contrast families.
_TISSUE_CODES = {
    "wm": (2, 41, 7, 46, 77, 251, 252, 253, 254, 255, 16, 28, 60, 85),
    "deep": (10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58),
    "cb": (8, 47),
    "csf": CSF + (HEAD_CSF,),
    "bone": (BONE,),
    "scalp": (SCALP,),
}
# Mean intensity (0-1) per tissue: cortex/"gm" is every code not listed above.
CONTRASTS = {
    "T1": {"wm": 0.80, "gm": 0.50, "deep": 0.62, "cb": 0.55, "csf": 0.15, "bone": 0.10, "scalp": 0.75},
    "T2": {"wm": 0.35, "gm": 0.55, "deep": 0.45, "cb": 0.50, "csf": 0.95, "bone": 0.08, "scalp": 0.55},
    "FLAIR": {"wm": 0.40, "gm": 0.60, "deep": 0.52, "cb": 0.55, "csf": 0.08, "bone": 0.05, "scalp": 0.60},
    "PD": {"wm": 0.60, "gm": 0.72, "deep": 0.66, "cb": 0.70, "csf": 0.85, "bone": 0.10, "scalp": 0.70},
    "CT": {"wm": 0.46, "gm": 0.52, "deep": 0.50, "cb": 0.50, "csf": 0.30, "bone": 1.00, "scalp": 0.40},
}


@dataclass
class BrainSource:
    """The atlas and real templates on one 1 mm grid, with what a draw needs precomputed."""

    codes: np.ndarray  # (z, y, x) int16 atlas codes, 0 outside the brain
    templates: list[np.ndarray]  # real T1 images on the same grid, float32 scaled to ~[0, 1]
    outside_mm: np.ndarray  # distance to the brain (mm), 0 inside; float32
    ijk_from_lps: np.ndarray  # (4, 4) LPS mm -> (i, j, k) voxel index
    centre_lps: np.ndarray  # brain centroid (mm)
    class_names: list[str]
    class_table: np.ndarray  # (N_CODES, classes) bool

    @classmethod
    def from_files(cls, atlas: str | Path, templates: list[str | Path]) -> "BrainSource":
        """The first template's grid is the reference; the atlas and the others are resampled onto it."""
        ref = sitk.ReadImage(str(templates[0]), sitk.sitkFloat32)
        codes = load_atlas_on(ref, atlas)
        imgs = [sitk.GetArrayFromImage(ref if i == 0 else resample_to(sitk.ReadImage(str(t), sitk.sitkFloat32),
                                                                        ref, labels=False))
                for i, t in enumerate(templates)]
        d = np.array(ref.GetDirection()).reshape(3, 3)
        lps_from_ijk = np.eye(4)
        lps_from_ijk[:3, :3] = d @ np.diag(ref.GetSpacing())
        lps_from_ijk[:3, 3] = ref.GetOrigin()
        return cls.from_arrays(codes, imgs, lps_from_ijk)

    @classmethod
    def from_arrays(cls, codes: np.ndarray, templates: list[np.ndarray], lps_from_ijk: np.ndarray) -> "BrainSource":
        """Atlas codes (z, y, x), real images on the same grid, and the grid's (i, j, k) -> LPS mm matrix."""
        codes = np.asarray(codes).astype(np.int16)
        imgs = [(a / max(1e-6, float(np.percentile(a[codes > 0], 99.5)))).astype(np.float32) for a in templates]
        brain = ndimage.binary_closing(codes > 0, iterations=2)
        brain = ndimage.binary_fill_holes(brain)
        spacing = np.linalg.norm(lps_from_ijk[:3, :3], axis=0)[::-1]  # per (z, y, x) axis
        outside = ndimage.distance_transform_edt(~brain, sampling=spacing).astype(np.float32)
        zyx = np.argwhere(codes > 0).mean(0)
        centre = lps_from_ijk @ np.r_[zyx[::-1], 1.0]
        names, table = class_lookup(N_CODES - 1)
        return cls(codes, imgs, outside, np.linalg.inv(lps_from_ijk), centre[:3], names, table)

    def present(self, labels: np.ndarray, min_pixels: int = 1) -> np.ndarray:
        """(classes,) bool: which classes a label slice shows (at least ``min_pixels``)."""
        counts = np.bincount(labels.ravel(), minlength=N_CODES)
        return (counts[:, None] * self.class_table).sum(0) >= min_pixels

    def class_mask(self, labels: np.ndarray, k: int) -> np.ndarray:
        return self.class_table[labels, k]


@dataclass
class SynthSlice:
    image: np.ndarray  # (H, W) float32
    labels: np.ndarray  # (H, W) int16 codes at the slice's centre plane
    pixel_spacing: tuple[float, float]
    window: IntensityWindow
    plane: str
    kind: str  # how the intensities were drawn


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz, sx, sy, sz = *np.cos(a), *np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], coarse: int, scale: float) -> np.ndarray:
    small = rng.normal(0.0, scale, (coarse, coarse)).astype(np.float32)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _label_means(rng: np.random.Generator, family: str | None) -> np.ndarray:
    """Mean intensity per code: fully random per label (family None), or a contrast family with jitter."""
    if family is None:
        return rng.uniform(0.0, 1.0, N_CODES).astype(np.float32)
    c = CONTRASTS[family]
    means = np.full(N_CODES, c["gm"], np.float32)
    for tissue, codes in _TISSUE_CODES.items():
        means[list(codes)] = c[tissue]
    means += rng.normal(0.0, 0.04, N_CODES).astype(np.float32)
    means[0] = 0.0
    return np.clip(means, 0.0, 1.0)


class SliceSynthesizer:
    """Draws ``SynthSlice``s from a ``BrainSource``; deterministic given the generator's state."""

    def __init__(self, source: BrainSource, max_rotation: float = 20.0, p_real: float = 0.3,
                 p_head: float = 0.7, p_family: float = 0.5) -> None:
        self.src = source
        self.max_rotation = max_rotation
        self.p_real, self.p_head, self.p_family = p_real, p_head, p_family

    # --------------------------------------------------------------------------------- geometry
    def _grid(self, rng: np.random.Generator, plane: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Pixel centres in LPS mm (H, W, 3), the plane's normal and row direction, and the spacing."""
        normal_axis, (row_axis, row_sign), (col_axis, col_sign) = _PLANE_LAYOUT[plane]
        eye = np.eye(3)
        rot = _rotation(rng, self.max_rotation)
        u_row, u_col, u_n = rot @ (row_sign * eye[row_axis]), rot @ (col_sign * eye[col_axis]), rot @ eye[normal_axis]
        spacing = float(rng.uniform(0.8, 1.6))
        fov = rng.uniform(190.0, 250.0, 2) * rng.uniform(0.9, 1.1)
        h, w = (int(round(f / spacing)) for f in fov)
        # Where the plane cuts: anywhere across the brain along the normal, a little beyond it.
        offset = rng.uniform(-80.0, 85.0) if normal_axis == 2 else rng.uniform(-75.0, 75.0) if normal_axis == 0 \
            else rng.uniform(-110.0, 80.0)
        centre = self.src.centre_lps + offset * u_n + rng.normal(0.0, 8.0, 3)
        scale = rng.uniform(0.88, 1.12)
        r = (np.arange(h) - (h - 1) / 2) * spacing * scale
        c = (np.arange(w) - (w - 1) / 2) * spacing * scale
        pts = centre + r[:, None, None] * u_row + c[None, :, None] * u_col
        amp = rng.uniform(0.0, 3.0)
        if amp > 0:
            disp = np.stack([_smooth_field(rng, (h, w), 6, amp) for _ in range(3)], -1)
            pts = pts + disp
        return pts, u_n, u_row if rng.random() < 0.5 else u_col, spacing

    def _ijk(self, pts: np.ndarray) -> np.ndarray:
        m = self.src.ijk_from_lps
        ijk = pts @ m[:3, :3].T + m[:3, 3]
        return np.moveaxis(ijk[..., ::-1], -1, 0)  # (3, H, W) in (z, y, x) order

    def _sample_labels(self, pts: np.ndarray, head: tuple[float, float, float] | None) -> np.ndarray:
        zyx = self._ijk(pts)
        codes = ndimage.map_coordinates(self.src.codes, zyx, order=0, mode="constant", cval=0)
        if head is not None:
            d = ndimage.map_coordinates(self.src.outside_mm, zyx, order=1, mode="nearest")
            t_csf, t_bone, t_scalp = head
            out = codes == 0
            codes = codes.copy()
            codes[out & (d > 0) & (d <= t_csf)] = HEAD_CSF
            codes[out & (d > t_csf) & (d <= t_csf + t_bone)] = BONE
            codes[out & (d > t_csf + t_bone) & (d <= t_csf + t_bone + t_scalp)] = SCALP
        return codes.astype(np.int16)

    # --------------------------------------------------------------------------------- intensities
    def draw(self, rng: np.random.Generator, plane: str | None = None) -> SynthSlice:
        plane = plane or PLANES[int(rng.integers(len(PLANES)))]
        pts, u_n, u_in, spacing = self._grid(rng, plane)
        head = None
        if rng.random() < self.p_head:
            head = (rng.uniform(1.0, 5.0), rng.uniform(3.0, 9.0), rng.uniform(3.0, 9.0))
        real = self.src.templates and rng.random() < self.p_real
        family = None if real or rng.random() >= self.p_family else \
            list(CONTRASTS)[int(rng.integers(len(CONTRASTS)))]
        means = _label_means(rng, family)
        if family is None and rng.random() < 0.7:
            means[0] = 0.0  # air is dark on most scans
        stds = rng.uniform(0.0, 0.08, N_CODES).astype(np.float32)
        template = self.src.templates[int(rng.integers(len(self.src.templates)))] if real else None
        invert = real and rng.random() < 0.35

        # Partial volume: average several planes across a thick slice, along the normal or in-plane.
        thick = rng.uniform(2.0, 6.0) if rng.random() < 0.5 else 0.0
        along = u_n if rng.random() < 0.6 else u_in
        n_sub = max(1, int(math.ceil(thick / 1.0))) if thick else 1
        offsets = np.linspace(-thick / 2, thick / 2, n_sub) if n_sub > 1 else np.zeros(1)
        image = np.zeros(pts.shape[:2], np.float32)
        labels = None
        for off in offsets:
            p = pts + off * along
            lab = self._sample_labels(p, head)
            if abs(off) == np.abs(offsets).min() and labels is None:
                labels = lab
            if template is not None:
                img = ndimage.map_coordinates(template, self._ijk(p), order=1, mode="constant", cval=0.0)
                if invert:
                    img = np.where(lab > 0, np.clip(1.2 - img, 0.0, None), 0.0)
                shell = (lab >= HEAD_CSF)
                img = np.where(shell, means[lab], img).astype(np.float32)
            else:
                img = means[lab] + stds[lab] * rng.standard_normal(lab.shape).astype(np.float32)
            image += img.astype(np.float32) / len(offsets)
        assert labels is not None
        image = self._acquire(rng, image, labels)
        h, w = image.shape
        if rng.random() < 0.2:  # field-of-view crop
            ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            image, labels = image[y0:y0 + ch, x0:x0 + cw], labels[y0:y0 + ch, x0:x0 + cw]
        hi = float(np.percentile(image, rng.uniform(98.5, 99.9)))
        lo = float(np.percentile(image, rng.uniform(0.0, 1.0)))
        window = IntensityWindow(lo, max(hi, lo + 1e-3))
        kind = "real" + ("-inverted" if invert else "") if real else (family or "random")
        return SynthSlice(np.ascontiguousarray(image), np.ascontiguousarray(labels), (spacing, spacing), window,
                          plane, kind)

    @staticmethod
    def _acquire(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Scanner effects: blur, bias field, gamma and noise."""
        sigma = rng.uniform(0.0, 1.2)
        if sigma > 0.3:
            image = cv2.GaussianBlur(image, (0, 0), sigma)
        bias = np.exp(_smooth_field(rng, image.shape, 4, rng.uniform(0.0, 0.3)))
        image = np.clip(image, 0.0, None) * bias
        peak = float(image.max()) or 1.0
        image = (image / peak) ** float(np.exp(rng.normal(0.0, 0.25)))
        image = image + rng.normal(0.0, rng.uniform(0.0, 0.05), image.shape)
        return np.clip(image, 0.0, None).astype(np.float32)


__all__ = ["BrainSource", "SliceSynthesizer", "SynthSlice", "CONTRASTS"]
