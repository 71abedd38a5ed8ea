"""A PerSAM-style baseline (OTFAConfig(method="persam")), on the same encoder and decoder, for comparison."""

from __future__ import annotations

import torch

from .decode import AdaptOutput, _decode
from .grid import _grid_coords, cosine_map
from .shot import ClassAdapter


@torch.inference_mode()
def persam_slices(model, adapter: ClassAdapter, neck: torch.Tensor, transform, hw: tuple[int, int]) -> AdaptOutput:
    """A PerSAM-style baseline on the same encoder and decoder (Zhang et al., PerSAM, training-free variant).

    Per slice: cosine similarity of the mask-pooled prototype with every cell; the best cell is a positive
    point and the worst a negative one; a first mask from the points, then two cascaded refinements (the
    points plus the previous logits as a mask prompt, then also the previous mask's box; the mask the IoU
    head rates best among the multimask outputs). PerSAM's target-guided attention and target-semantic
    prompting change the decoder's attention and are left out. PerSAM always answers: every slice gets a mask.
    """
    from ..preprocess import postprocess_logits

    b, _, n, _ = neck.shape
    dev = neck.device
    S = transform.image_size
    scale = S / n
    _, _, valid = _grid_coords(transform, n, dev)
    sim = cosine_map(neck, adapter.prototype)
    out = torch.empty((b, 4 * n, 4 * n), device=dev)
    for i in range(b):
        s = torch.where(valid, sim[i], torch.full_like(sim[i], float("nan")))
        flat = torch.nan_to_num(s, nan=-2.0).flatten()
        best = int(flat.argmax())
        worst = int(torch.nan_to_num(s, nan=2.0).flatten().argmin())
        pts = torch.tensor([[[(best % n + 0.5) * scale, (best // n + 0.5) * scale],
                             [(worst % n + 0.5) * scale, (worst // n + 0.5) * scale]]], dtype=torch.float32)
        labels = torch.tensor([[1, 0]])
        emb = neck[i:i + 1]
        masks, iou = _decode(model, emb, points=(pts, labels))
        logits = masks[:, :1]
        masks, iou = _decode(model, emb, points=(pts, labels), mask_input=logits)
        k = int(iou[0, 1:].argmax()) + 1
        logits = masks[:, k:k + 1]
        fg = (logits[0, 0] > 0).nonzero()
        if len(fg):
            f = 4 * n / S  # low-res cells per S-frame pixel
            box = torch.tensor([[fg[:, 1].min() / f, fg[:, 0].min() / f, (fg[:, 1].max() + 1) / f,
                                 (fg[:, 0].max() + 1) / f]], dtype=torch.float32)
            masks, iou = _decode(model, emb, points=(pts, labels), boxes=box, mask_input=logits)
            k = int(iou[0, 1:].argmax()) + 1
            logits = masks[:, k:k + 1]
        out[i] = logits[0, 0]
    full = postprocess_logits(out[:, None], transform)[:, 0]
    return AdaptOutput(logits=full, presence=torch.ones(b), terms={"decoder": full},
                       gate=torch.ones_like(full, dtype=torch.bool))
