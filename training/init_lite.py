"""Write freshly initialised RCMed parts for the lite preset (what ships until trained weights do).

    python -m rcmed_training.init_lite rcmed_engine/weights/lite

Deterministic (seed 0). The config says ``trained: false``, so ``rcmed info`` and the demo say so.
"""

from __future__ import annotations

import argparse

import torch

from rcmed_engine.model.checkpoint import save_checkpoint
from rcmed_engine.model.presets import build_model, lite_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write config.json and model.safetensors into")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(lite_config())
    save_checkpoint(model, args.out, metadata={"trained": "false", "note": "freshly initialised, seed 0"})
    print(f"wrote untrained lite RCMed parts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
