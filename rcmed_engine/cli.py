"""The ``rcmed`` command (DESIGN.md): segment (text, then clicks), refine, evaluate, info.

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


def _progress_bar(total_desc: str, unit: str = "slice") -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar on a terminal; silent when stderr is piped."""
    if not sys.stderr.isatty():
        return (lambda done, total: None), (lambda: None)
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=total_desc, unit=unit, file=sys.stderr, leave=False)
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
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="an adapter folder (rcmed-train fit --adapter); repeatable. Its classes go to it, all "
                        "others to the untouched base model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcmed", description="RCMed text-prompted medical image segmentation")
    parser.add_argument("--version", action="version", version=f"rcmed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment what a prompt names in an image or volume")
    seg.add_argument("image", help="image file (NIfTI, NRRD, MHA, PNG...) or DICOM folder")
    seg.add_argument("--prompt", required=True, help='what to segment, e.g. "liver" or "liver, spleen and left kidney"')
    _add_result_args(seg, "anatomical plane to cut along, in patient space (default axial)",
                     "A:B, voxel indices along the cut axis (default all)")
    seg.add_argument("--registry", default=None, help="class registry folder (one-shot adaptation)")

    ref = sub.add_parser("refine", help="correct an earlier result with include/exclude clicks and boxes")
    ref.add_argument("seg_file", help="the result to correct: a .seg.nrrd written by rcmed segment (its prompt is "
                     "in its tags) or a label map on IMAGE's grid (label t for the prompt's target t; give --prompt)")
    ref.add_argument("image", help="the image SEG_FILE was made from")
    ref.add_argument("--prompt", default=None, help="the prompt that made SEG_FILE (default: the one its tags record)")
    _add_result_args(ref, "anatomical plane the clicks' slices are cut along (default axial)",
                     "A:B, the slices a correction may be carried to (default all)")

    from .batch.command import add_batch_parser

    add_batch_parser(sub, _add_model_args)

    ev = sub.add_parser("evaluate", help="Dice on an nnU-Net v2 raw data set")
    ev.add_argument("dataset", help="folder with dataset.json, imagesTs/labelsTs (or imagesTr/labelsTr)")
    ev.add_argument("-o", "--output", required=True, help="report JSON")
    ev.add_argument("--split", default="Ts", choices=["Ts", "Tr"])
    ev.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    ev.add_argument("--registry", default=None, help="class registry folder (one-shot adaptation)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many cases")
    ev.add_argument("--overwrite", action="store_true", help="replace the report if it exists (default: refuse)")
    _add_model_args(ev)
    _add_remote_args(ev)

    srv = sub.add_parser("serve", help="run the engine behind HTTP for remote clients (RemoteEngine, --server)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    srv.add_argument("--token", default=None, help="bearer token clients must send (default: RCMED_TOKEN, else "
                     "a generated one, printed at start)")
    srv.add_argument("--registry", default=None, help="class registry folder (one-shot adaptation)")
    srv.add_argument("--cache-mb", type=int, default=2048, help="memory for uploaded images (default 2048)")
    srv.add_argument("--max-upload-mb", type=int, default=1024, help="largest upload (default 1024)")
    srv.add_argument("--max-voxels", type=int, default=1 << 29, help="largest image in voxels (default 2^29)")
    srv.add_argument("--max-prompt-chars", type=int, default=500, help="longest prompt (default 500)")
    srv.add_argument("--max-request-mb", type=int, default=None, help="memory one request may cost, its body "
                     "and every copy decoding makes (default: a sixteenth of this machine's memory, 256..8192)")
    srv.add_argument("--decode-workers", type=int, default=2, help="uploads read and decoded at once (default 2)")
    srv.add_argument("--max-waiting", type=int, default=16, help="requests that may wait for a decode slot or "
                     "the model; more answer 503 with Retry-After (default 16)")
    srv.add_argument("--body-timeout-s", type=float, default=120.0, help="seconds a request body may take to "
                     "arrive once the server reads it; a stalled or trickling client gets 408 (default 120)")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_model_args(srv)

    reg = sub.add_parser("register", help="one-shot adaptation: register a class from one outlined slice")
    reg.add_argument("image", help="image file or DICOM folder the mask was drawn on")
    reg.add_argument("--mask", required=True, help="label map on the image's grid (any SimpleITK format)")
    reg.add_argument("--name", required=True, help='the class name, later usable as a prompt, e.g. "lateral ventricles"')
    reg.add_argument("--registry", required=True, help="class registry folder (created if missing)")
    reg.add_argument("--label", type=int, default=None, help="the structure's label value (default: every non-zero voxel)")
    reg.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"],
                     help="anatomical plane of the outlined slice (default axial)")
    reg.add_argument("--slice", type=int, default=None,
                     help="slice index along --axis (default: the slice with the largest mask area)")
    reg.add_argument("--modality", default=None, help="CT, MR, ... (default: from the file)")
    _add_model_args(reg)
    _add_remote_args(reg)

    cls = sub.add_parser("classes", help="list the classes of a registry, or remove one")
    cls.add_argument("registry", help="class registry folder")
    cls.add_argument("--remove", default=None, metavar="NAME", help="remove this class")

    info = sub.add_parser("info", help="the model, its weights and the device")
    _add_model_args(info)

    conv = sub.add_parser("convert-syre", help="write the released McGregorW/SyRe weights once in our "
                          "safetensors layout (faster, pickle-free loads)")
    conv.add_argument("src", help="folder with the released weights (config.json, *.bin or *.safetensors, "
                      "tokenizer.model)")
    conv.add_argument("dst", help="new folder to write (must not exist, or be empty)")
    conv.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp32"],
                      help="keep each tensor's dtype (default; 16.2 GB), or cast all to bf16 (14.9 GB) or fp32")
    return parser


def _add_result_args(p: argparse.ArgumentParser, axis_help: str, slices_help: str) -> None:
    """What segment and refine share: where the result goes, how the image is cut, clicks, model and server."""
    p.add_argument("-o", "--output", required=True, help="output: .seg.nrrd, .nii.gz, .nii, .nrrd or .mha")
    p.add_argument("--modality", default=None, help="CT, MR, X-ray, US, microscopy... (default: from the file)")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"], help=axis_help)
    p.add_argument("--slices", default=None, help=slices_help)
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    _add_click_args(p)
    _add_model_args(p)
    _add_remote_args(p)


def _add_click_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--click", action="append", default=[], metavar="R,A,S[:include|exclude[:TARGET]]",
                   help="a point in patient space (RAS mm, as Slicer shows it) that corrects the mask: include "
                        "(default) or exclude, for TARGET (default: the prompt's first); repeatable")
    p.add_argument("--box", action="append", default=[], metavar="R,A,S:R,A,S[:TARGET]",
                   help="two opposite corners (RAS mm) on one slice: the target there is what the box frames; "
                        "repeatable")
    p.add_argument("--no-propagate", action="store_true",
                   help="correct the clicked slices only (default: carry each correction to the neighbouring "
                        "slices while the target goes on, within --slices)")


def _add_remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, metavar="URL",
                   help="run on a remote engine (rcmed serve) at this URL instead of loading the model here")
    p.add_argument("--token", default=None, help="the server's token (default: RCMED_TOKEN)")


def _engine(args: argparse.Namespace):
    if getattr(args, "server", None):
        from .client import RemoteEngine

        remote = RemoteEngine(args.server, token=getattr(args, "token", None))
        remote.info()  # fails early, in one line, on a wrong URL or token
        if getattr(args, "adapter", None):
            raise CLIError("--adapter loads into a local engine; start the server with rcmed serve --adapter DIR")
        return remote
    if not sys.stderr.isatty():  # transformers' own loading bars are noise in a log or a pipe
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return _local_engine(args)


def _local_engine(args: argparse.Namespace):
    """The preset's engine with every --adapter loaded (each checked against the base weights)."""
    from .engine import Engine

    engine = Engine.from_preset(_preset(args), weights=args.weights, device=args.device, batch_size=args.batch)
    for folder in getattr(args, "adapter", None) or []:
        engine.load_adapter(folder)
    return engine


def _preset(args: argparse.Namespace) -> str:
    """--weights naming a SyRe folder (released or converted) selects syre-7b unless --preset says more."""
    if args.weights and args.preset == "lite":
        from .model.syre import is_syre_folder

        if is_syre_folder(args.weights):
            return "syre-7b"
    return args.preset


def cmd_convert_syre(args: argparse.Namespace) -> int:
    import torch

    from .model.syre import convert_syre

    started = time.perf_counter()
    dtype = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    dst = convert_syre(args.src, args.dst, dtype=dtype)
    marker = json.loads((dst / "syre.json").read_text())
    print(json.dumps({"output": str(dst), "tensors": marker["tensors"], "ignored": len(marker["ignored"]),
                      "sha256": marker["sha256"], "seconds": round(time.perf_counter() - started, 1)}))
    return 0


def _check_output(path: str, suffixes: Sequence[str], overwrite: bool = False) -> Path:
    """The output path, checked before anything heavy runs: its folder exists and takes a new file, its
    suffix is known, and an existing file is replaced only with --overwrite."""
    out = Path(path).expanduser()
    if not out.parent.is_dir():
        raise CLIError(f"output folder does not exist: {out.parent}")
    if not any(out.name.lower().endswith(s) for s in suffixes):
        raise CLIError(f"unsupported output {out.name}: use one of {', '.join(suffixes)}")
    if out.is_dir():
        raise CLIError(f"the output {out} is a folder; name a file")
    if out.exists() and not overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    _check_writable(out.parent)
    return out


def _check_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: permissions and read-only file systems both show here."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(prefix=".rcmed-check.", dir=folder):
            pass
    except OSError as exc:
        raise CLIError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def _check_room(folder: Path, nbytes: int) -> None:
    """Refuse early when the output's folder has less free space than a conservative size estimate."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise CLIError(f"not enough room in {folder}: the output may take {nbytes / 2**20:.0f} MB, "
                       f"{free / 2**20:.0f} MB are free")


def _modality(args: argparse.Namespace, volume) -> str:
    """--modality, else what the file says, else a guess that is said on stderr (never silent)."""
    if args.modality:
        return args.modality
    from .preprocess import guess_modality

    modality, why = guess_modality(volume.array, volume.meta)
    if why.startswith("guessed"):
        print(f"rcmed: note: assuming modality {modality} ({why}); pass --modality to change it",
              file=sys.stderr)
    return modality


def _loading(args: argparse.Namespace) -> None:
    """A line while the model loads (several seconds), on a terminal only, like the progress bars."""
    if not getattr(args, "server", None) and sys.stderr.isatty():
        print(f"rcmed: loading the {args.preset} model...", file=sys.stderr, flush=True)


def target_sentences(result) -> list[str]:
    """One plain sentence per target: found or not, its presence score, voxels and volume."""
    import numpy as np

    voxel_ml = float(np.prod(result.geometry.spacing)) / 1000.0
    lines = []
    for i, name in enumerate(result.targets):
        voxels = int((result.labels == i + 1).sum())
        best = _max_presence(result, i)
        score = "n/a" if best is None else f"{best:.2f}"
        if voxels:
            lines.append(f"{name}: present (presence {score}), {voxels:,} voxels, {voxels * voxel_ml:,.1f} mL")
        else:
            lines.append(f"{name}: absent (highest presence {score}); the mask is empty")
    return lines


def cmd_segment(args: argparse.Namespace) -> int:
    from .geometry import parse_slice_range
    from .io import OUTPUT_SUFFIXES
    from .prompts import parse_targets

    registry = _registry_arg(args)
    out = _check_output(args.output, OUTPUT_SUFFIXES, args.overwrite)
    parse_targets(args.prompt)  # a bad prompt fails before the model loads
    clicks, boxes = _clicks_arg(args)
    slices = parse_slice_range(args.slices)
    volume, modality, engine = _image_and_engine(args, out, clicks, boxes)
    if clicks or boxes:
        if registry and hasattr(engine, "use_registry"):
            engine.use_registry(registry)  # refine's own text pass then uses it
        result = _run_refine(args, engine, volume, args.prompt, clicks, boxes, None, modality, slices)
    else:
        update, close = _progress_bar("segment")
        try:
            result = engine.segment(volume, args.prompt, modality=modality, axis=args.axis, slices=slices,
                                    progress=update, **({"registry": registry} if registry else {}))
        finally:
            close()
    return _write_and_report(out, result, volume)


def _image_and_engine(args: argparse.Namespace, out, clicks: list, boxes: list):
    """The image, its modality and the engine, with every check that needs the image done before the model
    loads: clicks inside it, room for the output."""
    import numpy as np

    from .io import read_image

    volume = read_image(args.image)
    _check_clicks_inside(clicks, boxes, volume, args.axis)
    _check_room(out.parent, int(np.prod(volume.array.shape[:3])) + (1 << 20))
    modality = _modality(args, volume)
    _loading(args)
    return volume, modality, _engine(args)


def cmd_refine(args: argparse.Namespace) -> int:
    """Correct an earlier result (SEG_FILE) of IMAGE with clicks and boxes; written as segment writes."""
    import numpy as np

    from .geometry import Volume, parse_slice_range
    from .io import OUTPUT_SUFFIXES, read_labelmap

    out = _check_output(args.output, OUTPUT_SUFFIXES, args.overwrite)
    clicks, boxes = _clicks_arg(args)
    if not clicks and not boxes:
        raise CLIError("nothing to correct with: give at least one --click or --box")
    slices = parse_slice_range(args.slices)
    labels, geometry, segments = read_labelmap(args.seg_file)
    prompt = _earlier_prompt(args.prompt, labels, segments, args.seg_file)
    volume, modality, engine = _image_and_engine(args, out, clicks, boxes)
    # The engine compares the earlier result's grid with the image's: another geometry is a one-line error.
    previous = _earlier_result(np.ascontiguousarray(labels, dtype=np.uint8), geometry, segments, prompt, args.axis) \
        or Volume(np.ascontiguousarray(labels, dtype=np.uint8), geometry, {})
    result = _run_refine(args, engine, volume, prompt, clicks, boxes, previous, modality, slices)
    return _write_and_report(out, result, volume)


def _clicks_arg(args: argparse.Namespace) -> tuple[list, list]:
    """--click and --box parsed (a malformed one fails in one line before anything loads)."""
    from .clicks import parse_box, parse_click

    clicks = [parse_click(c) for c in args.click]
    boxes = [parse_box(b) for b in args.box]
    if args.no_propagate and not clicks and not boxes:
        raise CLIError("--no-propagate only applies to corrections: give --click or --box too")
    return clicks, boxes


def _check_clicks_inside(clicks: list, boxes: list, volume, axis: str) -> None:
    """Every click and box corner within the image, checked before the model loads (the engine checks the
    rest: the slice range, a box's area, the targets)."""
    if not clicks and not boxes:
        return
    from .clicks import ras_to_stack

    frame = volume.slice_frame(axis)
    for c in clicks:
        ras_to_stack(c.ras, volume.geometry, volume.shape_zyx, frame,
                     "the include click" if c.include else "the exclude click")
    for b in boxes:
        for corner in (b.first, b.second):
            ras_to_stack(corner, volume.geometry, volume.shape_zyx, frame, "a box corner")


def _earlier_prompt(given: str | None, labels, segments: list, path: str) -> str:
    """The prompt that made SEG_FILE: --prompt, else the RCMed.prompt tag its segments carry (rcmed segment
    writes it), else its segment names in label order; label t must be the prompt's target t."""
    from .prompts import parse_targets

    if given is not None:
        prompt = given
    else:
        tagged = sorted({s.tags.get("RCMed.prompt", "") for s in segments} - {""})
        if len(tagged) > 1:
            raise CLIError(f"{path} holds the results of several prompts ({'; '.join(tagged)}): pass --prompt")
        if tagged:
            prompt = tagged[0]
        elif segments:
            prompt = ", ".join(s.name for s in sorted(segments, key=lambda s: s.label_value))
        else:
            raise CLIError(f"{path} names no segments (a plain label map): pass --prompt with the prompt that made it")
    n = len(parse_targets(prompt))
    top = int(labels.max(initial=0))
    if top > n:
        raise CLIError(f"{path} has label {top}, but the prompt {prompt!r} names {n} target(s) (label t is target t): "
                       "pass --prompt with the prompt that made it")
    return prompt


def _earlier_result(labels, geometry, segments: list, prompt: str, axis: str):
    """SEG_FILE as the SegmentResult it was, when its tags say the axis and slices the text reached (so a click
    beyond them is segmented first); None when they do not, or the axis differs (every slice then counts)."""
    import numpy as np

    from .geometry import parse_slice_range
    from .prompts import parse_targets
    from .results import SegmentResult

    ranges = {(s.tags.get("RCMed.axis"), s.tags.get("RCMed.slices")) for s in segments}
    if len(ranges) != 1 or None in next(iter(ranges)) or next(iter(ranges))[0] != axis:
        return None
    try:
        lo, hi = parse_slice_range(next(iter(ranges))[1])
    except ValueError:
        return None
    targets = parse_targets(prompt)
    return SegmentResult(labels, geometry, targets, np.full((len(targets), 0), np.nan, np.float32), (lo, hi), axis,
                         "", "", prompt, {}, {})


def _run_refine(args: argparse.Namespace, engine, volume, prompt: str, clicks: list, boxes: list, previous,
                modality: str, slices):
    update, close = _progress_bar("refine", unit="target")
    try:
        return engine.refine(volume, prompt, clicks, boxes=boxes, previous=previous,
                             propagate=not args.no_propagate, modality=modality, axis=args.axis, slices=slices,
                             progress=update)
    finally:
        close()


def _write_and_report(out: Path, result, volume) -> int:
    """Write the label map (atomically), then the notes and sentences on stderr and one JSON line on stdout."""
    from .io import write_labelmap

    write_labelmap(out, result.labels, result.geometry, result.segments(), reference_2d=volume.is_2d)
    for note in result.notes:
        print(f"rcmed: note: {note}", file=sys.stderr)
    for line in target_sentences(result):
        print(line, file=sys.stderr)
    voxels = {t: int((result.labels == i + 1).sum()) for i, t in enumerate(result.targets)}
    report = {"output": str(out), "targets": result.targets, "voxels": voxels,
              "presence": {t: _max_presence(result, i) for i, t in enumerate(result.targets)},
              "answer": result.answer, "modality": result.modality, "axis": result.axis,
              "notes": result.notes, "seconds": round(result.timings["total_s"], 3)}
    if "RCMed.clicks" in result.provenance:
        given = json.loads(result.provenance["RCMed.clicks"])
        report["refine"] = {"clicks": len(given["clicks"]), "boxes": len(given["boxes"]),
                            **{k: round(float(result.timings.get(k, 0.0)), 3)
                               for k in ("click_s", "propagate_s", "slices_carried")}}
    print(json.dumps(report))
    return 0


def _max_presence(result, i: int) -> float | None:
    import numpy as np

    scores = result.presence[i][np.isfinite(result.presence[i])]
    return round(float(scores.max()), 4) if scores.size else None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_dataset
    from .io import write_json_atomic

    out = _check_output(args.output, (".json",), args.overwrite)
    registry = _registry_arg(args)
    if not Path(args.dataset, "dataset.json").is_file():
        raise CLIError(f"no dataset.json in {args.dataset}: not an nnU-Net v2 raw data set")
    _loading(args)
    engine = _engine(args)
    if registry and hasattr(engine, "use_registry"):
        engine.use_registry(registry)  # evaluate_dataset's segment_many calls then use it
    update, close = _progress_bar("evaluate")
    try:
        report = evaluate_dataset(engine, args.dataset, split=args.split, axis=args.axis, limit=args.limit,
                                  progress=update)
    finally:
        close()
    write_json_atomic(out, report)
    print(json.dumps({"output": str(out), "mean_dice": report["mean_dice"],
                      "classes": {k: v["dice"] for k, v in report["classes"].items()}}))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """One prompt over a cohort (rcmed_engine/batch): bad input is a one-line error, a failed case is not."""
    from .batch.command import batch_command
    from .batch.errors import BatchUsageError

    try:
        return batch_command(args, lambda: (_loading(args), _engine(argparse.Namespace(**{**vars(args),
                                                                                          "server": None})))[1])
    except BatchUsageError as exc:
        raise CLIError(str(exc)) from None


def cmd_info(args: argparse.Namespace) -> int:
    engine = _engine(args)
    info = engine.info()
    if not info["trained"]:
        info["note"] = ("the RCMed parts of these weights are untrained (freshly initialised): masks are "
                        "not meaningful until trained weights ship")
    print(json.dumps(info, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServerSettings, serve

    for name in ("port", "cache_mb", "max_upload_mb", "max_voxels", "max_prompt_chars", "decode_workers"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    if args.max_request_mb is not None and args.max_request_mb < 1:
        raise CLIError("--max-request-mb must be positive")
    if args.max_waiting < 0:
        raise CLIError("--max-waiting must be 0 or more")
    if not args.body_timeout_s > 0:
        raise CLIError("--body-timeout-s must be positive")
    settings = ServerSettings(host=args.host, port=args.port, token=args.token, registry=args.registry,
                              cache_bytes=args.cache_mb << 20, max_upload_bytes=args.max_upload_mb << 20,
                              max_voxels=args.max_voxels, max_prompt_chars=args.max_prompt_chars,
                              max_request_bytes=None if args.max_request_mb is None else args.max_request_mb << 20,
                              decode_workers=args.decode_workers, max_waiting=args.max_waiting,
                              body_timeout_s=args.body_timeout_s)

    def load():
        return _local_engine(args)

    return serve(load, settings, log_level=args.log_level)


def _registry_arg(args: argparse.Namespace) -> str | None:
    """--registry for segment/evaluate: a folder that holds a registry (a remote engine uses the server's)."""
    if not getattr(args, "registry", None):
        return None
    if getattr(args, "server", None):
        return args.registry
    if not (Path(args.registry) / "registry.json").is_file():
        raise CLIError(f"no class registry in {args.registry}: register a class first (rcmed register IMAGE "
                       f"--mask MASK --name NAME --registry {args.registry})")
    return args.registry


def cmd_register(args: argparse.Namespace) -> int:
    from .io import read_image
    from .prompts import parse_targets

    if len(parse_targets(args.name)) != 1:  # the cheap part of otfa.validate_name, before torch loads
        raise CLIError(f"the class name {args.name!r} reads as several prompt targets; use a name without "
                       "commas or 'and', e.g. 'lateral ventricles'")
    registry = Path(args.registry)
    if registry.exists() and not registry.is_dir():
        raise CLIError(f"--registry {args.registry} is a file, not a folder")
    if not getattr(args, "server", None):
        if not registry.parent.is_dir():
            raise CLIError(f"the registry's parent folder does not exist: {registry.parent}")
        _check_writable(registry if registry.is_dir() else registry.parent)
    volume = read_image(args.image)
    mask = read_image(args.mask)
    from .otfa import validate_name

    validate_name(args.name)
    modality = _modality(args, volume)
    _loading(args)
    engine = _engine(args)
    kwargs: dict[str, Any] = {"label": args.label, "axis": args.axis, "slice": args.slice}
    if not getattr(args, "server", None):
        kwargs.update(registry=args.registry, modality=modality)
    info = engine.register_class(volume, mask, args.name, **kwargs)
    print(json.dumps(info if isinstance(info, dict) else {"name": args.name, "info": info}))
    return 0


def cmd_classes(args: argparse.Namespace) -> int:
    from .otfa import ClassRegistry

    if not (Path(args.registry) / "registry.json").is_file():
        raise CLIError(f"no class registry in {args.registry}")
    registry = ClassRegistry(args.registry)
    if args.remove:
        print(json.dumps({"removed": registry.remove(args.remove).as_dict()}))
    else:
        print(json.dumps({"registry": args.registry, "classes": [i.as_dict() for i in registry.list()]}, indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "segment": cmd_segment,
    "refine": cmd_refine,
    "evaluate": cmd_evaluate,
    "batch": cmd_batch,
    "info": cmd_info,
    "register": cmd_register,
    "classes": cmd_classes,
    "convert-syre": cmd_convert_syre,
    "serve": cmd_serve,
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _glue_negative_values(argv: Sequence[str]) -> list[str]:
    """``--click -12.5,40,3``: argparse reads a value that starts with '-' as an option of its own, and RAS
    coordinates are often negative; such a value is glued to its option (``--click=-12.5,40,3``)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--click", "--box") and arg[:1] == "-" and arg[1:2] in tuple("0123456789."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_glue_negative_values(sys.argv[1:] if argv is None else argv))
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
