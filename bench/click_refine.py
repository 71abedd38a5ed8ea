"""Text then clicks, against clicks alone and LiteMedSAM with the true box, on held-out brains (a script,
never a test).

    python bench/click_refine.py [--weights DIR] [--classes "left thalamus,..."] [--axis axial]
        [--out bench/results/click_refine.json] [--threads N] [--margin 3]

The held-out subject is Colin27 with AAL drawn on it (bench/colin27.py's data; never trained or tuned on).
Each structure is evaluated over the slices it spans along the axis, plus ``--margin`` on each side; the
engine's range is limited to those slices (as a user limits it in Slicer) and Dice is over that slab.

The standard simulated user: after each result, find the slice with the most wrong voxels, the largest
connected wrong region on it (missed: include; leaked: exclude), and click the point of that region
farthest from its border. Clicks accumulate; each step re-runs ``Engine.refine`` with all of them on the
text's first result (as Slicer re-runs when a click is added or moved). Dice after 0, 1, 3 and 5 clicks for

* ``text+clicks``: the words first (``Engine.segment``), then the clicks (``Engine.refine``);
* ``clicks``: the same clicks protocol through the same decoder with no words (``refine(text=False)``:
  starting from an empty mask, as SAM / LiteMedSAM users do);
* ``litemedsam_box``: LiteMedSAM as shipped, prompted on every slice with the ground truth's box (the bar a
  box-drawing user sets; bench/lite_heldout.py's code path).

Timing (2 cores unless --threads says otherwise): ``click_s`` is the median time of the work on a clicked
slice whose features and prefix are cached (the same click run twice; ``first_click_s`` is the first run,
which may have to encode the slice again when the cache has let it go); ``propagate_40_slices_s`` is the median carrying time per slice
times 40. Writes the JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rcmed_engine.clicks import Click, SlicePoint, stack_to_ras  # noqa: E402
from rcmed_engine.engine import Engine  # noqa: E402
from rcmed_engine.geometry import Geometry, Volume, to_slices  # noqa: E402

DEEP = [f"{side} {base}" for base in ("thalamus", "caudate nucleus", "putamen", "globus pallidus", "hippocampus",
                                      "amygdala") for side in ("left", "right")]
STEPS = (0, 1, 3, 5)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def next_click(pred: np.ndarray, truth: np.ndarray) -> tuple[int, float, float, bool] | None:
    """The simulated user's next click on stacks (n, H, W): (slice, row, col, include), None when perfect."""
    wrong = pred ^ truth
    if not wrong.any():
        return None
    k = int(np.argmax(wrong.sum((1, 2))))
    best = None
    for err, include in ((truth[k] & ~pred[k], True), (pred[k] & ~truth[k], False)):
        labels, n = ndi.label(err)
        if n == 0:
            continue
        sizes = ndi.sum(err, labels, range(1, n + 1))
        i = int(np.argmax(sizes)) + 1
        if best is None or sizes[i - 1] > best[0]:
            depth = ndi.distance_transform_edt(np.pad(labels == i, 1))[1:-1, 1:-1]
            r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
            best = (sizes[i - 1], k, float(r), float(c), include)
    return best[1:]


def run_clicks(engine: Engine, volume: Volume, prep, name: str, truth: np.ndarray, span: tuple[int, int],
               axis: str, start, text: bool, timings: dict) -> list[float]:
    """Dice after 0..5 simulated clicks (cumulative), starting from ``start`` (a SegmentResult or None)."""
    lo, hi = span
    t_stack = to_slices(truth, prep.frame)[lo:hi]
    current = np.zeros_like(t_stack) if start is None else to_slices(start.mask(0), prep.frame)[lo:hi]
    scores, clicks = [dice(current, t_stack)], []
    for _ in range(max(STEPS)):
        nxt = next_click(current, t_stack)
        if nxt is None:
            scores.append(1.0)
            continue
        k, r, c, include = nxt
        ras = stack_to_ras(SlicePoint(k + lo, r, c), volume.geometry, volume.shape_zyx, prep.frame)
        clicks.append(Click(tuple(ras), include))
        if not any(cl.include for cl in clicks) and start is None:
            scores.append(scores[-1])  # an exclude click on an empty mask removes nothing
            continue
        result = engine.refine(volume, name, clicks, previous=start, axis=axis, slices=span, text=text)
        current = to_slices(result.mask(0), prep.frame)[lo:hi]
        scores.append(dice(current, t_stack))
        if len(clicks) == 1:
            # Again with everything cached (the slice's features and prefix): what a second click there costs.
            again = engine.refine(volume, name, clicks, previous=start, axis=axis, slices=span, text=text)
            timings["click_s"].append(again.timings["click_s"])
            timings["first_click_s"].append(result.timings["click_s"])
        if result.timings["slices_carried"]:
            timings["carry_per_slice_s"].append(result.timings["propagate_s"] / result.timings["slices_carried"])
    return [scores[s] for s in STEPS]


def structure_span(truth: np.ndarray, frame, margin: int) -> tuple[int, int]:
    along = to_slices(truth, frame).sum((1, 2))
    idx = np.nonzero(along)[0]
    return max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, len(along))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--classes", default=",".join(DEEP))
    ap.add_argument("--axis", default="axial")
    ap.add_argument("--margin", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-box", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "click_refine.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import colin27 as C  # bench/colin27.py: the held-out data and its reference

    files = C.colin27_files()
    image = sitk.ReadImage(str(files["t1"]), sitk.sitkFloat32)
    codes = sitk.GetArrayFromImage(sitk.ReadImage(str(files["aal"])))
    volume = Volume(sitk.GetArrayFromImage(image), Geometry.from_sitk(image), {"modality": "MR"})
    engine = (Engine.from_pretrained(args.weights, device="cpu") if args.weights
              else Engine.from_preset("lite", device="cpu"))
    prep = engine.prepare(volume, "MR", args.axis)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    report = {"data": "Colin27 (mricron-data ch2) with AAL", "axis": args.axis, "margin": args.margin,
              "weights": args.weights or "lite (shipped)", "threads": args.threads,
              "dice": {"text+clicks": {}, "clicks": {}, "litemedsam_box": {}}, "spans": {}}
    timings = {"click_s": [], "first_click_s": [], "carry_per_slice_s": []}
    box_model = None
    for name in classes:
        truth = np.isin(codes, C.REFERENCE[name])
        span = structure_span(truth, prep.frame, args.margin)
        report["spans"][name] = list(span)
        t0 = time.perf_counter()
        text_result = engine.segment(volume, name, modality="MR", axis=args.axis, slices=span)
        report["dice"]["text+clicks"][name] = run_clicks(engine, volume, prep, name, truth, span, args.axis,
                                                         text_result, True, timings)
        report["dice"]["clicks"][name] = run_clicks(engine, volume, prep, name, truth, span, args.axis,
                                                    None, False, {"click_s": [], "first_click_s": [],
                                                                  "carry_per_slice_s": []})
        if not args.skip_box:
            import lite_heldout as LH

            box_model = box_model or LH.litemedsam_model()
            slab = np.zeros_like(truth)
            sl = [slice(None)] * 3
            sl[prep.frame.slice_axis] = slice(*span)
            slab[tuple(sl)] = True
            pred = LH.litemedsam_box_predict(engine, box_model, volume, "MR", {name: truth}, args.axis)[name]
            report["dice"]["litemedsam_box"][name] = dice(pred & slab, truth & slab)
        print(f"{name:24s} text+clicks {fmt(report['dice']['text+clicks'][name])}  clicks "
              f"{fmt(report['dice']['clicks'][name])}  box {report['dice']['litemedsam_box'].get(name, float('nan')):.3f}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    report["click_s"] = float(np.median(timings["click_s"])) if timings["click_s"] else None
    report["first_click_s"] = float(np.median(timings["first_click_s"])) if timings["first_click_s"] else None
    per = float(np.median(timings["carry_per_slice_s"])) if timings["carry_per_slice_s"] else None
    report["propagate_40_slices_s"] = None if per is None else 40 * per
    report["mean"] = {arm: np.mean(list(v.values()), axis=0).round(4).tolist() if v else None
                      for arm, v in report["dice"].items()}
    print("mean", json.dumps(report["mean"]), "click_s", report["click_s"], "propagate_40_slices_s",
          report["propagate_40_slices_s"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    return 0


def fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
