"""Segment a folder of scans with RCMed, headless, in Slicer:

    Slicer --no-main-window --python-script RCMedSlicer/Scripts/batch.py -- \\
        --input DIR --prompt "liver" --output DIR [--preset lite] [--server URL] ...

One ``<scan>.seg.nrrd`` per scan, written by Slicer (segments named after the targets, with colours and
terminology). The run goes through the same batch code as ``rcmed batch`` (rcmed_engine.batch): the output
folder gets its ``manifest.jsonl``, ``summary.csv`` and ``qc/`` pictures, and scans done with the same input,
prompt and model are skipped; outputs are written to a temporary file and renamed when complete; the run ends
with a summary, and exits non-zero if any scan failed (2 for usage errors).
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


class SlicerExecutor:
    """The batch core's local executor inside Slicer (rcmed_engine.batch.executors.Executor): each case is read
    by Slicer, segmented by the module's Logic and saved by Slicer (segments with colours and terminology);
    the core keeps the manifest, the summary and the QC page, the same as ``rcmed batch``."""

    def __init__(self, logic, spec):
        self.logic, self.spec = logic, spec

    def model(self):
        from rcmed_engine.batch.executors import model_identity

        return model_identity(self.logic.engine(self.spec).info())

    def run(self, tasks):
        for task in tasks:
            yield self.process(task)

    def process(self, task):
        import slicer

        from RCMedSlicerLib import batch
        from rcmed_engine.batch.errors import one_line
        from rcmed_engine.batch.work import target_stats

        t0 = time.perf_counter()
        output = Path(task.out_dir) / task.output_name
        temp = batch.temp_path(output)
        outcome = {"case": task.case.case_id, "status": "failed"}
        try:
            volume = slicer.util.loadVolume(task.case.path)
            if not volume:
                raise RuntimeError("Slicer could not read it as a volume")
            segmentation = self.logic.createOutputSegmentation(volume)
            segmentation.SetName(task.case.case_id)
            result = self.logic.process(volume, segmentation, task.prompt, engineSpec=self.spec,
                                        modality=task.modality or "auto", axis=task.axis)
            if not slicer.util.saveNode(segmentation, str(temp)):
                raise RuntimeError("Slicer could not write the segmentation")
            batch.commit(temp, output)
            outcome.update(status="done", output=output.name, targets=target_stats(result, result.volume()),
                           modality=result.modality)
            if task.qc:
                self._picture(task, result, outcome)
        except Exception as exc:  # one bad scan must not stop the others
            batch.discard(temp)
            outcome["reason"] = one_line(exc)
        finally:
            slicer.mrmlScene.Clear(0)
        outcome["seconds"] = round(time.perf_counter() - t0, 3)
        return outcome

    @staticmethod
    def _picture(task, result, outcome):
        from rcmed_engine.batch.errors import one_line
        from rcmed_engine.batch.qc import write_montage
        from rcmed_engine.batch.work import read_case
        from rcmed_engine.geometry import Volume

        try:
            image = Volume(read_case(task.case).array, result.geometry)
            outcome["qc"] = write_montage(Path(task.out_dir) / "qc" / f"{task.case.case_id}.png", image, result).name
        except Exception as exc:  # a picture that fails must not fail the case
            outcome["qc_error"] = one_line(exc)

    def close(self):
        pass


def _check(args, spec, logic):
    """Problems that stop the run before it starts (exit status 2), and warnings."""
    from RCMedSlicerLib import engines

    problems, warnings = engines.validate(spec)
    for w in warnings:
        _log(f"warning: {w}")
    if not problems:
        needTorch, missing, noDeps = logic.missingRequirements(spec)
        if needTorch or missing or noDeps:
            what = (["PyTorch"] if needTorch else []) + missing + noDeps
            problems.append("Slicer's Python lacks " + ", ".join(what)
                            + "; open the RCMed module once in Slicer to install them, or use --server")
    return problems


def main(argv=None):
    import RCMedSlicer
    from RCMedSlicerLib import batch

    try:
        args = batch.parse_arguments(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    except batch.BatchUsageError as exc:
        print(f"rcmed batch: {exc}", file=sys.stderr)
        return batch.EXIT_USAGE

    inputDir, outputDir = Path(args.input).expanduser(), Path(args.output).expanduser()
    if not inputDir.is_dir():
        print(f"rcmed batch: input folder does not exist: {inputDir}", file=sys.stderr)
        return batch.EXIT_USAGE
    spec = _engineSpec(args)
    logic = RCMedSlicer.RCMedSlicerLogic()
    problems = _check(args, spec, logic)
    if problems:
        print("rcmed batch: " + "; ".join(problems), file=sys.stderr)
        return batch.EXIT_USAGE
    return _run(args, inputDir, outputDir, spec, logic)


def _run(args, inputDir, outputDir, spec, logic):
    from RCMedSlicerLib import batch
    from rcmed_engine.batch import BatchOptions, BatchUsageError, run_batch

    report = batch.BatchReport(args.prompt)
    _log(f"RCMed batch: '{args.prompt}' on {inputDir} with the {spec.describe()}")

    def onCase(record):
        status, n = record["status"], len(report.outcomes) + 1
        outcome = batch.ScanOutcome(Path(record["input"]).name, str(outputDir / record.get("output", "")), status,
                                    record.get("seconds", 0.0) if status != "skipped" else 0.0,
                                    record.get("reason", "output exists" if status == "skipped" else ""),
                                    [t["target"] for t in record.get("targets", [])])
        report.add(outcome)
        text = {"done": f"{record.get('output')} ({outcome.seconds:.1f} s)", "skipped": "skipped (already done)",
                "failed": f"FAILED: {outcome.message}"}[status]
        _log(f"[{n}] {outcome.scan}: {text}")

    opts = BatchOptions(str(inputDir), str(outputDir), prompt=args.prompt, axis=args.axis,
                        modality=None if args.modality == "auto" else args.modality, overwrite=args.overwrite,
                        progress=False)
    try:
        run_batch(opts, SlicerExecutor(logic, spec), on_case=onCase)
    except (BatchUsageError, OSError) as exc:
        print(f"rcmed batch: {exc}", file=sys.stderr)
        return batch.EXIT_USAGE
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
