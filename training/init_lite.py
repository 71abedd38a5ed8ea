"""Write freshly initialised RCMed parts for the lite preset (what ships until trained weights do).

    python -m rcmed_training.init_lite rcmed_engine/weights/lite

Deterministic (seed 0). The config says ``trained: false``, so ``rcmed info`` and the demo say so.
"""

from __future__ import annotations

import argparse

import torch

from rcmed_engine.model.checkpoint import save_checkpoint
from rcmed_engine.model.presets import build_model, lite_config
from rcmed_engine.model.rcmed import RCMed, added_token_rows
from rcmed_engine.prompts import ADDED_TOKENS, IM_END, IM_START, P_END, P_START, SEG_TOKEN

# What each added token stands for, in words the base vocabulary already has.
SPELLED = {IM_START: "start of image", IM_END: "end of image", "<bbox>": "bounding box", "<point>": "point",
           SEG_TOKEN: "segmentation mask", P_START: "start of phrase", P_END: "end of phrase"}


def init_added_tokens(model: RCMed, spelled_weight: float = 0.2) -> None:
    """Each added token's row: the vocabulary's mean row, moved a little towards its spelled-out words.

    With the output layer tied, the mean row scores about the average logit everywhere (HF's
    ``mean_resizing``): the tokens start near 1/V instead of ~30 nats below everything (the std-0.02
    default), and never take probability from the words the base model predicts (a row at the scale of
    real words does). The spelled-out part keeps the seven tokens apart as inputs.
    """
    embed = model.language_model.get_input_embeddings().weight
    rows = added_token_rows(model)
    base = embed[: rows.start]
    mean = base.mean(0)
    hf = model.tokenizer.hf
    with torch.no_grad():
        for i, token in enumerate(ADDED_TOKENS):
            ids = hf.encode(SPELLED[token], add_special_tokens=False)
            embed[rows.start + i] = mean + spelled_weight * (base[ids].mean(0) - mean)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write config.json and model.safetensors into")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(lite_config())
    # The L-V term starts at zero (as LoRA's B does): an untrained projection would otherwise add noise to
    # LiteMedSAM's neck embedding, and the box-trained mask decoder would start from damaged features.
    last = model.lv_projection.mlp[2]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    init_added_tokens(model)
    save_checkpoint(model, args.out, metadata={"trained": "false", "note": "freshly initialised, seed 0"})
    print(f"wrote untrained lite RCMed parts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
