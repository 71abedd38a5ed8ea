"""The ``rcmed`` command (DESIGN.md): segment, evaluate, info.

Errors go to stderr as one line and the exit status is non-zero; no partial output file is left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def _progress_bar(total_desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar on a terminal; silent when stderr is piped."""
    if not sys.stderr.isatty():
        return (lambda done, total: None), (lambda: None)
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=total_desc, unit="slice", file=sys.stderr, leave=False)
        bar["bar"].n = done
        bar["bar"].refresh()

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return update, close


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="lite", help="lite (default), tiny or syre-7b")
    p.add_argument("--weights", help="folder with RCMed weights (default: the preset's own)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--batch", type=int, default=8, help="slices per batch (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcmed", description="RCMed text-prompted medical image segmentation")
    parser.add_argument("--version", action="version", version=f"rcmed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment what a prompt names in an image or volume")
    seg.add_argument("image", help="image file (NIfTI, NRRD, MHA, PNG...) or DICOM folder")
    seg.add_argument("--prompt", required=True, help='what to segment, e.g. "liver" or "liver, spleen and left kidney"')
    seg.add_argument("-o", "--output", required=True, help="output: .seg.nrrd, .nii.gz, .nii, .nrrd or .mha")
    seg.add_argument("--modality", default=None, help="CT, MR, X-ray, US, microscopy... (default: from the file)")
    seg.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"],
                     help="anatomical plane to cut along, in patient space (default axial)")
    seg.add_argument("--slices", default=None, help="A:B, voxel indices along the cut axis (default all)")
    seg.add_argument("--registry", default=None, help="class registry folder (one-shot adaptation)")
    _add_model_args(seg)

    ev = sub.add_parser("evaluate", help="Dice on an nnU-Net v2 raw data set")
    ev.add_argument("dataset", help="folder with dataset.json, imagesTs/labelsTs (or imagesTr/labelsTr)")
    ev.add_argument("-o", "--output", required=True, help="report JSON")
    ev.add_argument("--split", default="Ts", choices=["Ts", "Tr"])
    ev.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    ev.add_argument("--registry", default=None, help="class registry folder (one-shot adaptation)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many cases")
    _add_model_args(ev)

    info = sub.add_parser("info", help="the model, its weights and the device")
    _add_model_args(info)
    return parser


def _engine(args: argparse.Namespace):
    from .engine import Engine

    return Engine.from_preset(args.preset, weights=args.weights, device=args.device, batch_size=args.batch)


def _check_output(path: str, suffixes: Sequence[str]) -> Path:
    out = Path(path)
    if not out.parent.is_dir():
        raise CLIError(f"output folder does not exist: {out.parent}")
    if not any(out.name.lower().endswith(s) for s in suffixes):
        raise CLIError(f"unsupported output {out.name}: use one of {', '.join(suffixes)}")
    return out


def cmd_segment(args: argparse.Namespace) -> int:
    from .engine import parse_slice_range
    from .io import OUTPUT_SUFFIXES, read_image, write_labelmap
    from .prompts import parse_targets

    if args.registry:
        raise CLIError("--registry needs one-shot adaptation, which this version does not have yet")
    out = _check_output(args.output, OUTPUT_SUFFIXES)
    parse_targets(args.prompt)  # a bad prompt fails before the model loads
    slices = parse_slice_range(args.slices)
    volume = read_image(args.image)
    engine = _engine(args)
    update, close = _progress_bar("segment")
    try:
        result = engine.segment(volume, args.prompt, modality=args.modality, axis=args.axis, slices=slices,
                                progress=update)
    finally:
        close()
    write_labelmap(out, result.labels, result.geometry, result.segments(), reference_2d=volume.is_2d)
    voxels = {t: int((result.labels == i + 1).sum()) for i, t in enumerate(result.targets)}
    print(json.dumps({"output": str(out), "targets": result.targets, "voxels": voxels, "answer": result.answer,
                      "modality": result.modality, "axis": result.axis,
                      "seconds": round(result.timings["total_s"], 3)}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_dataset

    if args.registry:
        raise CLIError("--registry needs one-shot adaptation, which this version does not have yet")
    out = _check_output(args.output, (".json",))
    engine = _engine(args)
    update, close = _progress_bar("evaluate")
    try:
        report = evaluate_dataset(engine, args.dataset, split=args.split, axis=args.axis, limit=args.limit,
                                  progress=update)
    finally:
        close()
    _write_json_atomic(out, report)
    print(json.dumps({"output": str(out), "mean_dice": report["mean_dice"],
                      "classes": {k: v["dice"] for k, v in report["classes"].items()}}))
    return 0


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_info(args: argparse.Namespace) -> int:
    engine = _engine(args)
    info = engine.info()
    if not info["trained"]:
        info["note"] = ("the RCMed parts of these weights are untrained (freshly initialised): masks are "
                        "not meaningful until trained weights ship")
    print(json.dumps(info, indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "segment": cmd_segment,
    "evaluate": cmd_evaluate,
    "info": cmd_info,
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("rcmed: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CLIError, ValueError, FileNotFoundError, PermissionError, KeyError, RuntimeError, OSError) as exc:
        if os.environ.get("RCMED_DEBUG"):
            raise
        print(f"rcmed {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if os.environ.get("RCMED_DEBUG"):
            print(f"rcmed: {time.perf_counter() - started:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
