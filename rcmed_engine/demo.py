"""``make demo``: the lite preset on a real scan a dependency ships.

Segments "white matter" in the MNI152 2009 T1 template that the nilearn package carries (read as a
file, never imported), writes a Slicer segmentation and a PNG overlay montage, and prints the Dice
against the template's own white-matter probability map (> 0.5) on the slices it segmented.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"


def nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MNI template ships with nilearn: pip install --no-deps nilearn==0.14.1")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def tissue_probability(array: np.ndarray) -> np.ndarray:
    """nilearn's MNI tissue maps store the probability times 255 as uint8; return it in [0, 1]."""
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


# The MNI test slab of `rcmed-train prepare-builtin` (gap 4): the shipped lite weights never read it.
HELD_OUT_Z = (66, 123)


def montage(gray_slices: np.ndarray, masks: np.ndarray, truth: np.ndarray, columns: int = 3) -> np.ndarray:
    """(n, H, W) uint8 slices with the prediction (red fill) and the reference outline (green) → BGR image."""
    import cv2

    tiles = []
    for img, m, t in zip(gray_slices, masks, truth):
        rgb = np.repeat(img[..., None], 3, axis=2).astype(np.float32)
        red = np.array([0, 0, 255], np.float32)  # BGR
        rgb[m] = 0.55 * rgb[m] + 0.45 * red
        edges = cv2.morphologyEx(t.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
        rgb[edges] = (0, 255, 0)
        tile = cv2.resize(rgb.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        tiles.append(cv2.copyMakeBorder(tile, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=(32, 32, 32)))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def _write_png_atomic(path: Path, image: np.ndarray) -> None:
    import cv2

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"could not write {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(out_dir: Path, preset: str, weights: str | None, slices: tuple[int, int] | None, batch: int) -> dict:
    from .engine import Engine
    from .evaluate import dice
    from .geometry import to_slices
    from .io import read_image, write_labelmap
    from .preprocess import intensity_window, to_uint8_rgb

    data = nilearn_data_dir()
    t1 = read_image(data / MNI_T1)
    wm = tissue_probability(read_image(data / MNI_WM).array) > 0.5
    engine = Engine.from_preset(preset, weights=weights, device="auto", batch_size=batch)
    frame = t1.slice_frame("axial")
    n = t1.array.shape[frame.slice_axis]
    lo, hi = slices if slices else (n // 2 - 24, n // 2 + 24)
    print(f"RCMed demo: preset {preset}, {engine.info()['device']}; segmenting 'white matter' in the MNI152 T1 "
          f"template, axial slices {lo}:{hi} of {n}", flush=True)

    from tqdm import tqdm

    bar = tqdm(total=hi - lo, unit="slice", disable=not sys.stderr.isatty(), leave=False)

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    started = time.perf_counter()
    result = engine.segment(t1, "white matter", modality="MR", axis="axial", slices=(lo, hi), progress=progress)
    bar.close()
    seconds = time.perf_counter() - started

    pred = result.labels == 1
    region = np.zeros_like(wm)
    idx = [slice(None)] * 3
    idx[frame.slice_axis] = slice(lo, hi)
    region[tuple(idx)] = True
    score = dice(pred[region], wm[region])

    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path = out_dir / "white_matter.seg.nrrd"
    write_labelmap(seg_path, result.labels, result.geometry, result.segments())
    picks = np.linspace(lo + 4, hi - 5, 6).round().astype(int)
    gray = to_uint8_rgb(np.ascontiguousarray(to_slices(t1.array, frame)[picks]),
                        intensity_window(t1.array, "MR"))[..., 0]
    png_path = out_dir / "white_matter_overlay.png"
    _write_png_atomic(png_path, montage(gray, to_slices(pred, frame)[picks], to_slices(wm, frame)[picks]))

    trained = bool(engine.info()["trained"])
    summary = {
        "segmentation": str(seg_path), "overlay": str(png_path), "dice_white_matter": round(score, 4),
        "slices": [lo, hi], "seconds": round(seconds, 2), "seconds_per_slice": round(seconds / (hi - lo), 3),
        "preset": preset, "trained": trained, "answer": result.answer,
        "presence_mean": round(float(np.nanmean(result.presence)), 4),
    }
    print(f"wrote {seg_path}")
    print(f"wrote {png_path} (red: RCMed, green outline: template white matter > 0.5)")
    print(f"Dice against the template's white-matter map on slices {lo}:{hi}: {score:.3f} "
          f"({seconds:.1f} s, {seconds / (hi - lo):.2f} s per slice)")
    if not trained:
        print("note: the RCMed parts of these weights are untrained (freshly initialised), so this Dice is the "
              "floor before training, not the model's ability")
    else:
        inside = HELD_OUT_Z[0] <= lo and hi <= HELD_OUT_Z[1]  # axial slice k is array z = k for this template
        print("note: the shipped lite weights were trained on this template's outer slabs only; its central slab "
              f"(axial {HELD_OUT_Z[0]}:{HELD_OUT_Z[1]}) is their held-out split, and slices {lo}:{hi} "
              f"{'lie inside it' if inside else 'are not all inside it'}. Held-out figures and baselines: "
              "rcmed_engine/weights/lite/MODEL_CARD.md")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RCMed demo on the MNI152 template")
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--slices", default=None, help="A:B axial slices (default: the central 48)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        slices = None
        if args.slices:
            a, b = args.slices.split(":")
            slices = (int(a), int(b))
        summary = run(Path(args.out), args.preset, args.weights, slices, args.batch)
    except (ValueError, OSError) as exc:
        print(f"rcmed demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    from .io import write_json_atomic

    write_json_atomic(Path(args.out) / "summary.json", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
