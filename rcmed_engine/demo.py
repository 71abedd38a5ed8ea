"""``make demo``: the lite preset on a real scan a dependency ships.

Segments "white matter" in the MNI152 2009a T1 template that the nilearn package carries
(``<site-packages>/nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, read as a
file, never imported: an average of 152 brains, not one patient). Writes a Slicer segmentation and a PNG
overlay montage (title with prompt and Dice, slice index per panel, legend), and prints the Dice against
the template's own white-matter probability map (> 0.5) on the slices it segmented.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

# Re-exported: callers of the demo found the MNI names here before data_locations held them.
from .data_locations import MNI_GM, MNI_T1, MNI_WM, nilearn_data_dir, tissue_probability  # noqa: F401


PROMPTS = ("white matter",)
# The MNI test slab of `rcmed-train prepare-builtin` (gap 4): the shipped lite weights never read it.
HELD_OUT_Z = (66, 123)
DEFAULT_SLICES = (74, 122)  # the central 48 axial slices, inside the held-out slab


def _text(img: np.ndarray, text: str, at: tuple[int, int], scale: float = 0.5, color=(255, 255, 255)) -> None:
    import cv2

    cv2.putText(img, text, at, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def montage(gray_slices: np.ndarray, masks: np.ndarray, truth: np.ndarray, columns: int = 3,
            labels: list[str] | None = None, title: str = "") -> np.ndarray:
    """(n, H, W) uint8 slices with the prediction (red fill) and the reference outline (green) → BGR image,
    with a title bar, one label per panel (e.g. its slice index) and a legend."""
    import cv2

    tiles = []
    for i, (img, m, t) in enumerate(zip(gray_slices, masks, truth)):
        rgb = np.repeat(img[..., None], 3, axis=2).astype(np.float32)
        red = np.array([0, 0, 255], np.float32)  # BGR
        rgb[m] = 0.55 * rgb[m] + 0.45 * red
        edges = cv2.morphologyEx(t.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
        rgb[edges] = (0, 255, 0)
        tile = cv2.resize(rgb.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        if labels:
            _text(tile, labels[i], (6, 18))
        tiles.append(cv2.copyMakeBorder(tile, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=(32, 32, 32)))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    body = np.concatenate(rows, axis=0)
    if not title:
        return body
    head = np.full((54, body.shape[1], 3), 24, np.uint8)
    _text(head, title, (8, 20), 0.55)
    cv2.rectangle(head, (8, 32), (22, 46), (0, 0, 200), -1)
    _text(head, "fill: RCMed", (28, 45), 0.45)
    cv2.rectangle(head, (140, 32), (154, 46), (0, 255, 0), 2)
    _text(head, "outline: reference", (160, 45), 0.45)
    return np.concatenate([head, body], axis=0)


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
    references = {"white matter": tissue_probability(read_image(data / MNI_WM).array) > 0.5}
    if not sys.stderr.isatty():  # transformers' loading bars are noise in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    engine = Engine.from_preset(preset, weights=weights, device="auto", batch_size=batch)
    frame = t1.slice_frame("axial")
    n = t1.array.shape[frame.slice_axis]
    lo, hi = slices if slices else DEFAULT_SLICES
    print(f"RCMed demo: preset {preset}, {engine.info()['device']}; segmenting "
          f"{' and '.join(repr(p) for p in PROMPTS)} in the MNI152 T1 template, axial slices {lo}:{hi} of {n}",
          flush=True)

    from tqdm import tqdm

    bar = tqdm(total=hi - lo, unit="slice", disable=not sys.stderr.isatty(), leave=False)

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    started = time.perf_counter()
    results = engine.segment_many(t1, list(PROMPTS), modality="MR", axis="axial", slices=(lo, hi),
                                  progress=progress)
    bar.close()
    seconds = time.perf_counter() - started

    region = np.zeros(t1.array.shape, bool)
    idx = [slice(None)] * 3
    idx[frame.slice_axis] = slice(lo, hi)
    region[tuple(idx)] = True
    labels = np.zeros(t1.array.shape, np.uint8)
    segments = []
    scores: dict[str, float | None] = {}
    preds = [r.labels == 1 for r in results]
    for k, (prompt, result, pred) in enumerate(zip(PROMPTS, results, preds)):
        labels[pred] = k + 1
        info = result.segments()[0]
        info.label_value = k + 1
        segments.append(info)
        ref = references[prompt]
        scores[prompt] = None if ref is None else round(dice(pred[region], ref[region]), 4)

    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path = out_dir / "demo.seg.nrrd"
    write_labelmap(seg_path, labels, results[0].geometry, segments)
    gray_all = to_slices(t1.array, frame)
    window = intensity_window(t1.array, "MR")
    panels = []
    for k, prompt in enumerate(PROMPTS):
        ref = references[prompt]
        pred = to_slices(preds[k], frame)  # each prompt's own mask (the label map keeps one label a voxel)
        shown = to_slices(ref, frame) if ref is not None else pred
        where = [i for i in range(lo, hi) if shown[i].any()] or list(range(lo, hi))
        picks = np.array(where)[np.linspace(0, len(where) - 1, 6).round().astype(int)]
        gray = to_uint8_rgb(np.ascontiguousarray(gray_all[picks]), window)[..., 0]
        truth = to_slices(ref, frame)[picks] if ref is not None else np.zeros_like(pred[picks])
        score = "no reference" if scores[prompt] is None else f"Dice {scores[prompt]:.3f}"
        panels.append(montage(gray, pred[picks], truth, labels=[f"axial {i}" for i in picks],
                              title=f"RCMed {preset}: '{prompt}'  {score} on axial {lo}:{hi}"))
    png_path = out_dir / "demo_overlay.png"
    _write_png_atomic(png_path, np.concatenate(panels, axis=0))

    trained = bool(engine.info()["trained"])
    summary = {
        "segmentation": str(seg_path), "overlay": str(png_path), "dice": scores,
        "slices": [lo, hi], "seconds": round(seconds, 2), "seconds_per_slice": round(seconds / (hi - lo), 3),
        "preset": preset, "trained": trained, "answers": [r.answer for r in results],
        "presence_max": {p: round(float(np.nanmax(r.presence)), 4) for p, r in zip(PROMPTS, results)},
    }
    print(f"wrote {seg_path}")
    print(f"wrote {png_path} (red fill: RCMed; green outline: reference)")
    for prompt in PROMPTS:
        print(f"Dice of {prompt!r} against the template's white-matter map > 0.5 on axial {lo}:{hi}: "
              f"{scores[prompt]:.3f}")
    print(f"{seconds:.1f} s, {seconds / (hi - lo):.2f} s per slice")
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
    parser.add_argument("--slices", default=None,
                        help=f"A:B axial slices (default: {DEFAULT_SLICES[0]}:{DEFAULT_SLICES[1]}, the central 48)")
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
