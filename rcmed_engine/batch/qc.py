"""The QC picture of one case (``qc/CASE.png``): the slices with the most foreground, the targets' outlines
over the image, tiles in their true aspect; and ``qc/index.html``, one static page showing them all."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

TILES = 6
TILE_HEIGHT = 192


def _grey_uint8(stack: np.ndarray) -> np.ndarray:
    """Window to the 1st..99th percentile, as uint8; RGB stays RGB."""
    if stack.ndim == 4:
        return np.clip(stack, 0, 255).astype(np.uint8)
    finite = stack[np.isfinite(stack)] if np.issubdtype(stack.dtype, np.floating) else stack.ravel()
    lo, hi = (np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0))
    scaled = (np.nan_to_num(stack.astype(np.float32)) - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def pick_slices(labels_stack: np.ndarray, n: int = TILES) -> list[int]:
    """The slices with the most foreground (in slice order); the middle ones when there is none."""
    counts = (labels_stack > 0).reshape(labels_stack.shape[0], -1).sum(axis=1)
    if counts.max(initial=0) == 0:
        mid = labels_stack.shape[0] // 2
        return sorted({min(max(mid + d, 0), labels_stack.shape[0] - 1) for d in range(-(n // 2), n - n // 2)})
    best = np.argsort(-counts, kind="stable")[:n]
    return sorted(int(i) for i in best if counts[i] > 0)


def _tile(image: np.ndarray, labels: np.ndarray, colors: list[tuple[int, int, int]], aspect: float) -> np.ndarray:
    import cv2

    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    width = max(1, int(round(TILE_HEIGHT * aspect * labels.shape[1] / max(labels.shape[0], 1))))
    rgb = cv2.resize(np.ascontiguousarray(rgb), (width, TILE_HEIGHT), interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(np.ascontiguousarray(labels.astype(np.uint8)), (width, TILE_HEIGHT),
                     interpolation=cv2.INTER_NEAREST)
    for value, color in enumerate(colors, start=1):
        contours, _ = cv2.findContours((lab == value).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, color[::-1], 1)  # OpenCV draws BGR
    return rgb


def write_montage(path: Path, volume, result) -> Path:
    """One row of tiles; written to a temporary name, then renamed (atomic)."""
    import cv2

    from ..geometry import to_slices
    from ..terminology import segment_color

    frame = volume.slice_frame(result.axis)
    labels = to_slices(result.labels, frame)
    image = _grey_uint8(to_slices(volume.array, frame))
    aspect = frame.pixel_spacing[1] / max(frame.pixel_spacing[0], 1e-6)
    colors = [tuple(int(round(c * 255)) for c in segment_color(t, i)) for i, t in enumerate(result.targets)]
    tiles = [_tile(image[k], labels[k], colors, aspect) for k in pick_slices(labels)]
    montage = np.concatenate([np.pad(t, ((0, 0), (0, 2), (0, 0))) for t in tiles], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    if not cv2.imwrite(str(tmp), montage[:, :, ::-1]):
        raise OSError(f"cannot write {path}")
    tmp.replace(path)
    return path


def write_index(out_dir: Path, records: list[dict[str, Any]]) -> Path:
    """``qc/index.html``: every case, its picture and its figures (a static page, no server)."""
    rows = []
    for r in sorted(records, key=lambda r: r["case"]):
        figures = "<br>".join(f"{html.escape(t['target'])}: {t['volume_ml']:.2f} mL, "
                              f"{'present' if t['present'] else 'absent'}, {t['slices']} slices"
                              for t in r.get("targets", []))
        picture = (f'<img src="{html.escape(r["qc"])}" alt="{html.escape(r["case"])}">' if r.get("qc") else "")
        status = html.escape(r["status"] + (f": {r['reason']}" if r.get("reason") else ""))
        rows.append(f"<tr><td>{html.escape(r['case'])}</td><td>{status}</td><td>{figures}</td>"
                    f"<td>{picture}</td></tr>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>RCMed batch QC</title>"
            "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px;border-bottom:1px solid #ccc}"
            "img{max-height:192px}</style></head><body><h1>RCMed batch QC</h1>"
            f"<p>{len(records)} cases</p><table><tr><th>case</th><th>status</th><th>targets</th><th>slices</th></tr>"
            + "\n".join(rows) + "</table></body></html>\n")
    path = out_dir / "qc" / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".index.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
