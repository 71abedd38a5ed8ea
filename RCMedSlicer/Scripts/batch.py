"""Segment a folder of scans with RCMed, headless, in Slicer:

    Slicer --no-main-window --python-script RCMedSlicer/Scripts/batch.py -- \\
        --input DIR --prompt "liver" --output DIR [--preset lite] [--server URL] ...

One ``<scan>.seg.nrrd`` per scan, written by Slicer (segments named after the targets, with colours and
terminology). Scans whose output exists are skipped; outputs are written to a temporary file and renamed when
complete; the run ends with a summary, and exits non-zero if any scan failed (2 for usage errors).
It uses the module's Logic (``RCMedSlicerLogic.process``), which needs no GUI. Packages are not installed
here (no one is there to agree): open the RCMed module once in Slicer, or use ``--server``.
"""

import os
import sys
import time
from pathlib import Path

# Slicer runs the script as __main__ with sys.argv[0] = the script's path; __file__ is set as well.
_SCRIPT = globals().get("__file__") or sys.argv[0]
_MODULE_DIR = Path(_SCRIPT).resolve().parent.parent  # holds RCMedSlicer.py and RCMedSlicerLib
if str(_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(_MODULE_DIR))


def _log(text):
    print(text, flush=True)


def _engineSpec(args):
    from RCMedSlicerLib import engines

    if args.server:
        spec = engines.EngineSpec(mode=engines.REMOTE, url=args.server, token=args.token)
    else:
        spec = engines.EngineSpec(mode=engines.LOCAL, preset=args.preset, weights=args.weights, device=args.device)
    return engines.with_env_token(spec)


def main(argv=None):
    import slicer

    import RCMedSlicer
    from RCMedSlicerLib import batch, engines

    try:
        args = batch.parse_arguments(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    except batch.BatchUsageError as exc:
        print(f"rcmed batch: {exc}", file=sys.stderr)
        return batch.EXIT_USAGE

    inputDir, outputDir = Path(args.input).expanduser(), Path(args.output).expanduser()
    try:
        outputDir.mkdir(parents=True, exist_ok=True)
        items = batch.plan(inputDir, outputDir, overwrite=args.overwrite)
    except (OSError, batch.BatchUsageError) as exc:
        print(f"rcmed batch: {exc}", file=sys.stderr)
        return batch.EXIT_USAGE
    if not items:
        print(f"rcmed batch: no scans ({', '.join(batch.SCAN_SUFFIXES)}) in {inputDir}", file=sys.stderr)
        return batch.EXIT_USAGE

    spec = _engineSpec(args)
    problems, warnings = engines.validate(spec)
    for w in warnings:
        _log(f"warning: {w}")
    logic = RCMedSlicer.RCMedSlicerLogic()
    if not problems:
        needTorch, missing, noDeps = logic.missingRequirements(spec)
        if needTorch or missing or noDeps:
            what = (["PyTorch"] if needTorch else []) + missing + noDeps
            problems.append("Slicer's Python lacks " + ", ".join(what)
                            + "; open the RCMed module once in Slicer to install them, or use --server")
    if problems:
        print("rcmed batch: " + "; ".join(problems), file=sys.stderr)
        return batch.EXIT_USAGE

    for stale in batch.remove_stale_temps(outputDir):
        _log(f"removed a temporary file left by an interrupted run: {stale.name}")

    report = batch.BatchReport(args.prompt)
    _log(f"RCMed batch: '{args.prompt}' on {len(items)} scans with the {spec.describe()}")
    for n, item in enumerate(items, start=1):
        if item.action == "skip":
            report.add(batch.ScanOutcome(item.scan.name, str(item.output), "skipped", message="output exists"))
            _log(f"[{n}/{len(items)}] {item.scan.name}: skipped ({item.output.name} exists)")
            continue
        t0 = time.perf_counter()
        temp = batch.temp_path(item.output)
        try:
            volume = slicer.util.loadVolume(str(item.scan))
            if not volume:
                raise RuntimeError("Slicer could not read it as a volume")
            segmentation = logic.createOutputSegmentation(volume)
            segmentation.SetName(item.output.name[: -len(batch.OUTPUT_SUFFIX)])
            result = logic.process(volume, segmentation, args.prompt, engineSpec=spec,
                                   modality=args.modality, axis=args.axis)
            if not slicer.util.saveNode(segmentation, str(temp)):
                raise RuntimeError("Slicer could not write the segmentation")
            batch.commit(temp, item.output)
            seconds = time.perf_counter() - t0
            report.add(batch.ScanOutcome(item.scan.name, str(item.output), "done", seconds,
                                         segments=list(result.targets)))
            _log(f"[{n}/{len(items)}] {item.scan.name}: {item.output.name} ({seconds:.1f} s)")
        except Exception as exc:  # one bad scan must not stop the others
            batch.discard(temp)
            report.add(batch.ScanOutcome(item.scan.name, str(item.output), "failed",
                                         time.perf_counter() - t0, batch.one_line(exc)))
            _log(f"[{n}/{len(items)}] {item.scan.name}: FAILED: {batch.one_line(exc)}")
        finally:
            slicer.mrmlScene.Clear(0)

    _log(report.summary())
    if args.report:
        reportPath = Path(args.report).expanduser()
        temp = reportPath.with_name(f".{reportPath.name}.tmp")
        temp.write_text(report.to_json(), encoding="utf-8")
        os.replace(temp, reportPath)
    return report.exit_code()


if __name__ == "__main__":
    code = main()
    try:
        import slicer

        slicer.util.exit(code)
    except ImportError:
        sys.exit(code)
