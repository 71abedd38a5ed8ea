"""One-shot adaptation benchmark: register a class from one labelled slice, evaluate on the Ts split.

    python bench/one_shot.py DATASET_DIR CLASS [--preset lite] [--limit N] [--slices A:B]
    python bench/one_shot.py --build-mni DIR            # build the MNI lateral-ventricle data set, then run it

For a data set in the nnU-Net v2 raw layout and one of its classes, the support is the single Tr slice with
the largest area of that class (over all Tr cases, along --axis). Three variants are then run side by side
on every Ts case, each prompted by the class name alone:

* ``no_adapt``: the model as it is, text prompt only (no registry);
* ``persam``:   a PerSAM-style training-free baseline on the same encoder and decoder (mask-pooled
  prototype, cosine similarity, best/worst point prompts, two cascaded refinements);
* ``otfa``:     this project's one-shot adaptation (rcmed_engine.otfa);
* ``otfa_decoder_only`` (ablation): the same, with the fusion forced to the decoder's logits alone.

Figures go to stdout and to ``bench/results/one_shot.json`` (keys ``dice_no_adapt``, ``dice_persam``,
``dice_otfa``: mean Dice over the Ts cases, each case's Dice taken over its whole volume).

The MNI data set (``--build-mni``): the class is the **lateral ventricles**, a structure no text prompt of
the shipped ``lite`` weights was trained on. It is derived from nilearn's MNI152 2009a template (the T1
image and its grey- and white-matter probability maps, read as files; nilearn is never imported):
CSF probability = brain - GM - WM (brain = the filled non-zero T1 support), thresholded at 0.5, restricted
to the brain eroded by 26 mm so that cortical sulci drop out, and the largest 3D connected component kept
(the two lateral ventricles, joined through the foramina; the third ventricle and the midline cisterns form
another component). Tr is one axial slab; Ts are disjoint axial slabs (no voxel shared with Tr). To keep the
spatial prior honest, every Ts slab is resampled with its own random in-plane similarity transform
(rotation, scale, shift) and intensity change (gamma, noise), as if it came from another head.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "one_shot.json"
MNI_CLASS = "lateral ventricles"
#: Axial index ranges (voxel z of the 1 mm MNI grid). The ventricles span z 68..100.
MNI_TR = [(82, 92)]
MNI_TS = [(70, 76), (76, 82), (92, 97), (97, 102)]


# ---------------------------------------------------------------------------------------------- data
def mni_files() -> dict[str, Path]:
    from rcmed_engine.data_locations import MNI_FILES, nilearn_data_dir

    try:
        data = nilearn_data_dir()  # locates the package; reads no code
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    files = {k: data / MNI_FILES[k] for k in ("t1", "gm", "wm")}
    for path in files.values():
        if not path.is_file():
            raise SystemExit(f"missing MNI template file {path}")
    return files


def lateral_ventricles(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The lateral-ventricle mask of the MNI template, as the module docstring derives it."""
    from scipy import ndimage as ndi

    brain = ndi.binary_fill_holes(t1 > 0)
    csf = (1.0 - gm.astype(np.float32) / 255.0 - wm.astype(np.float32) / 255.0) * brain
    inner = ndi.binary_erosion(brain, iterations=26)
    candidate = (csf > 0.5) & inner
    labels, n = ndi.label(candidate)
    if n == 0:
        raise RuntimeError("no CSF component found in the MNI template")
    sizes = ndi.sum(candidate, labels, range(1, n + 1))
    ventricles = labels == int(np.argmax(sizes)) + 1
    zz = np.nonzero(ventricles.any(axis=(1, 2)))[0]
    if not (60 <= zz.min() <= 75 and 92 <= zz.max() <= 110):  # the body of the lateral ventricles
        raise RuntimeError(f"unexpected ventricle extent z {zz.min()}..{zz.max()}")
    return ventricles


def _write(image, path: Path) -> None:
    import SimpleITK as sitk

    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    sitk.WriteImage(image, str(tmp), True)
    os.replace(tmp, path)


def _augment(img, lab, rng: np.random.Generator):
    """Random in-plane similarity transform about the slab centre, plus a gamma change and noise."""
    import SimpleITK as sitk

    angle = np.deg2rad(rng.uniform(-8.0, 8.0))
    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-6.0, 6.0, size=2)
    tx = sitk.AffineTransform(3)
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    tx.SetMatrix((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    size = np.array(img.GetSize())
    tx.SetCenter(img.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    tx.SetTranslation((float(shift[0]), float(shift[1]), 0.0))
    img = sitk.Resample(img, img, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    lab = sitk.Resample(lab, lab, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    a = sitk.GetArrayFromImage(img)
    gamma = rng.uniform(0.8, 1.25)
    a = 255.0 * np.clip(a / 255.0, 0.0, 1.0) ** gamma
    a = np.where(a > 0, a + rng.normal(0.0, 3.0, a.shape), 0.0).astype(np.float32)
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(img)
    return out, lab


def build_mni(root: Path, seed: int = 0) -> Path:
    """Write the nnU-Net v2 raw data set ``Dataset901_MNIVentricles`` under ``root``; return its folder."""
    import SimpleITK as sitk

    files = mni_files()
    images = {k: sitk.ReadImage(str(p)) for k, p in files.items()}
    arrays = {k: sitk.GetArrayFromImage(v) for k, v in images.items()}
    mask = lateral_ventricles(arrays["t1"], arrays["gm"], arrays["wm"]).astype(np.uint8)
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(images["t1"])
    t1 = sitk.Cast(images["t1"], sitk.sitkFloat32)

    out = root / "Dataset901_MNIVentricles"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    used: set[int] = set()
    for split, slabs in (("Tr", MNI_TR), ("Ts", MNI_TS)):
        for n, (z0, z1) in enumerate(slabs):
            if used & set(range(z0, z1)):
                raise RuntimeError(f"slab {z0}:{z1} overlaps another slab")
            used |= set(range(z0, z1))
            img, lab = t1[:, :, z0:z1], label[:, :, z0:z1]
            if split == "Ts":
                img, lab = _augment(img, lab, rng)
            case = f"MNI_{split.lower()}{n:03d}"
            _write(img, out / f"images{split}" / f"{case}_0000.nii.gz")
            _write(lab, out / f"labels{split}" / f"{case}.nii.gz")
    meta = {
        "name": "MNIVentricles",
        "description": ("Lateral ventricles of the MNI152 2009a symmetric template (nilearn's copy), derived "
                        "from its GM/WM probability maps; Tr and Ts are disjoint axial slabs; Ts slabs are "
                        "randomly resampled in-plane and intensity-perturbed. See bench/one_shot.py."),
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, MNI_CLASS: 1},
        "numTraining": len(MNI_TR),
        "file_ending": ".nii.gz",
        "slabs": {"Tr": MNI_TR, "Ts": MNI_TS},
        "licence": "MNI ICBM152 2009 template: see the copyright notice of the McConnell Brain Imaging Centre",
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- benchmark
def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    from rcmed_engine.evaluate import dice

    return float(dice(pred, truth))


def find_support(ds, value: int, axis: str):
    """The Tr case and slice (along ``axis``, as the engine cuts it) with the largest area of the class."""
    from rcmed_engine.geometry import to_slices
    from rcmed_engine.io import read_image

    best = None
    for case in ds.cases("Tr"):
        label = read_image(case.label)
        stack = to_slices(label.array == value, label.slice_frame(axis))
        areas = stack.reshape(stack.shape[0], -1).sum(1)
        k = int(np.argmax(areas))
        if best is None or areas[k] > best[2]:
            best = (case, k, int(areas[k]))
    if best is None or best[2] == 0:
        raise SystemExit(f"no Tr slice has the class (label {value})")
    return best


def run(dataset: Path, class_name: str, preset: str = "lite", weights: str | None = None, device: str = "auto",
        axis: str = "axial", limit: int | None = None, slices: str | None = None, batch: int = 8,
        registry: Path | None = None, out: Path = RESULTS) -> dict:
    from rcmed_engine.engine import Engine, parse_slice_range
    from rcmed_engine.evaluate import read_dataset
    from rcmed_engine.geometry import to_slices
    from rcmed_engine.io import read_image, write_json_atomic
    from rcmed_engine.otfa import OTFAConfig

    started = time.perf_counter()
    ds = read_dataset(dataset)
    if class_name not in ds.classes:
        raise SystemExit(f"class {class_name!r} is not in {dataset}/dataset.json (classes: {', '.join(ds.classes)})")
    value = ds.classes[class_name]
    support_case, k, area = find_support(ds, value, axis)
    engine = Engine.from_preset(preset, weights=weights, device=device, batch_size=batch)
    tmp = None
    if registry is None:
        tmp = tempfile.TemporaryDirectory(prefix="rcmed-one-shot-")
        registry = Path(tmp.name)
    t0 = time.perf_counter()
    reg_info = engine.register_class(read_image(support_case.image), read_image(support_case.label), class_name,
                                     axis=axis, slice_index=k, modality=ds.modality, registry=registry, label=value)
    reg_seconds = time.perf_counter() - t0
    print(f"support: {support_case.case_id} slice {k} ({area} px); fusion chosen on the shot: "
          f"{reg_info['strategy']} (support Dice {reg_info['support_dice']})", flush=True)
    span = parse_slice_range(slices)
    variants = {"no_adapt": {}, "persam": {"registry": registry, "otfa": OTFAConfig(method="persam")},
                "otfa": {"registry": registry, "otfa": OTFAConfig()},
                # ablation: the same adaptation with the decoder's logits alone (released formulas + box prompts)
                "otfa_decoder_only": {"registry": registry, "otfa": OTFAConfig(strategy="decoder")}}
    rows = []
    for case in ds.cases("Ts")[:limit]:
        image = read_image(case.image)
        truth = read_image(case.label).array == value
        frame = image.slice_frame(axis)
        n = to_slices(truth, frame).shape[0]
        lo, hi = engine._check_range(span, n)
        truth_slices = to_slices(truth, frame)[lo:hi]
        row = {"case": case.case_id, "slices": [lo, hi], "truth_voxels": int(truth_slices.sum())}
        for name, kwargs in variants.items():
            t1 = time.perf_counter()
            result = engine.segment(image, class_name, modality=ds.modality, axis=axis, slices=(lo, hi), **kwargs)
            pred = to_slices(result.labels == 1, frame)[lo:hi]
            row[f"dice_{name}"] = round(_dice(pred, truth_slices), 4)
            row[f"seconds_{name}"] = round(time.perf_counter() - t1, 2)
        rows.append(row)
        print(f"{case.case_id}: " + "  ".join(f"{v} {row[f'dice_{v}']:.3f}" for v in variants), flush=True)
    summary = {f"dice_{v}": round(float(np.mean([r[f"dice_{v}"] for r in rows])), 4) for v in variants}
    report = {
        **summary,
        "dataset": str(dataset), "class": class_name, "preset": engine.preset, "weights": engine.weights,
        "weights_sha256": engine.weights_sha256, "trained": bool(engine.model.config.trained),
        "axis": axis, "modality": ds.modality,
        "support": {"case": support_case.case_id, "slice": k, "area_pixels": area,
                    "strategy": reg_info["strategy"], "support_dice": reg_info["support_dice"],
                    "seconds": round(reg_seconds, 2)},
        "otfa_config": OTFAConfig().__dict__,
        "cases": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(engine.device),
        "command": "python bench/one_shot.py " + " ".join(sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(summary))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", help="nnU-Net v2 raw data set folder")
    parser.add_argument("class_name", nargs="?", metavar="CLASS", help="class name as dataset.json labels it")
    parser.add_argument("--build-mni", metavar="DIR", help="build the MNI lateral-ventricle data set in DIR and run it")
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    parser.add_argument("--limit", type=int, default=None, help="at most this many Ts cases")
    parser.add_argument("--slices", default=None, help="A:B, evaluate only these slices of each Ts case")
    parser.add_argument("--registry", default=None, help="keep the registry here (default: a temporary folder)")
    parser.add_argument("-o", "--output", default=str(RESULTS), help=f"report JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.build_mni:
        dataset = build_mni(Path(args.build_mni))
        print(f"built {dataset}", flush=True)
        class_name = args.class_name or MNI_CLASS
    elif args.dataset and args.class_name:
        dataset, class_name = Path(args.dataset), args.class_name
    else:
        parser.error("give DATASET_DIR CLASS, or --build-mni DIR")
    run(dataset, class_name, preset=args.preset, weights=args.weights, device=args.device, axis=args.axis,
        limit=args.limit, slices=args.slices, batch=args.batch,
        registry=Path(args.registry) if args.registry else None, out=Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
