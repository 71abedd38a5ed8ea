"""One case, wherever it runs (this process, a Ray actor, a thread talking to a server): read the scan, segment,
write the label map atomically, measure each target and draw the QC picture. Never raises: a failure is an
outcome with a one-line reason, so no case stops the rest."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cases import Case
from .errors import one_line

FORMATS = ("seg.nrrd", "nii.gz", "dcm")


@dataclass(frozen=True)
class Task:
    """A case and everything a worker needs to do it (picklable: it travels to Ray actors)."""

    case: Case
    prompt: str
    out_dir: str
    fmt: str = "seg.nrrd"
    axis: str = "axial"
    modality: str | None = None
    registry: str | None = None
    qc: bool = True
    input_hash: str = ""
    model: dict | None = None  # the model's identity, for DICOM SEG's algorithm identification

    @property
    def output_name(self) -> str:
        return f"{self.case.case_id}.{self.fmt}"


def read_case(case: Case):
    from ..io import read_dicom_series, read_image

    return read_dicom_series(case.path, case.series_uid) if case.series_uid else read_image(case.path)


def target_stats(result, volume) -> list[dict[str, Any]]:
    """Per target: voxels, volume in mL (voxels x voxel volume), presence, slices (along the cut axis) with it."""
    from ..geometry import to_slices

    voxel_ml = float(np.prod(result.geometry.spacing)) / 1000.0
    stack = to_slices(result.labels, volume.slice_frame(result.axis))
    rows = []
    for i, name in enumerate(result.targets):
        mask = stack == i + 1
        voxels = int(mask.sum())
        scores = result.presence[i][np.isfinite(result.presence[i])] if result.presence.size else np.zeros(0)
        rows.append({"target": name, "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 6),
                     "present": voxels > 0, "presence": round(float(scores.max()), 4) if scores.size else None,
                     "slices": int(mask.reshape(mask.shape[0], -1).any(axis=1).sum())})
    return rows


def _write(task: Task, result, volume) -> Path:
    out = Path(task.out_dir) / task.output_name
    if task.fmt == "dcm":
        from .dicom_seg import write_dicom_seg

        return write_dicom_seg(out, result, volume, task.model or {})
    from ..io import write_labelmap

    return write_labelmap(out, result.labels, result.geometry, result.segments(), reference_2d=volume.is_2d)


def process(engine, task: Task) -> dict[str, Any]:
    """Do one case with ``engine`` (Engine or RemoteEngine); the outcome as a plain dict."""
    started = time.perf_counter()
    outcome: dict[str, Any] = {"case": task.case.case_id, "status": "failed"}
    try:
        volume = read_case(task.case)
        if task.fmt == "dcm" and not task.case.is_dicom:
            raise ValueError("--format dcm needs a DICOM series as input")
        modality = task.case.modality or task.modality or volume.meta.get("modality")
        kwargs = {"registry": task.registry} if task.registry else {}
        result = engine.segment(volume, task.prompt, modality=modality, axis=task.axis, **kwargs)
        outcome["output"] = _write(task, result, volume).name
        outcome["targets"] = target_stats(result, volume)
        outcome["modality"] = result.modality
        if task.qc:
            from .qc import write_montage

            try:
                outcome["qc"] = write_montage(Path(task.out_dir) / "qc" / f"{task.case.case_id}.png", volume,
                                              result).name
            except Exception as exc:  # a picture that fails must not fail the case
                outcome["qc_error"] = one_line(exc)
        outcome["status"] = "done"
    except Exception as exc:
        outcome["reason"] = one_line(exc)
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return outcome
