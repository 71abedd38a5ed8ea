"""One-shot, training-free adaptation (OTFA): a class registry and the adaptation applied at inference.

A radiologist outlines one slice of a structure, names it, and from then on the name works as a prompt.
Nothing is trained. From each outlined slice (a *shot*) the registry keeps:

* a **semantic prototype**: the mask-pooled neck embedding F of the support slice, taken before the L-V
  term is added, with the mask resized bilinearly to the embedding grid in the padded frame
  (SYRE_SPEC §4 "Registration"), plus the mean embedding outside the mask;
* a **spatial prior**: a Gaussian on the mask's centroid and spread (covariance) in normalised slice
  coordinates (row, column in [0, 1] of the slice as the engine cuts it), plus the relative slice position;
* a **calibration** of the similarity map on the support itself (mean cosine inside and outside the mask)
  and an **appearance model**: intensity histograms inside the mask and in a ring around it.

More shots of one class are averaged: prototypes by their mean (SYRE_SPEC §4), the Gaussians by moment
matching (the mixture's mean and covariance), calibrations and histograms by their mean.

At inference, for a target that names a registered class (per slice, SYRE_SPEC §4 "Adaptation"):

1. similarity map s = cos(p̄, F(x, y)) on the embedding grid; S = σ((s - mean s) / (std s + 1e-6));
2. F' = F ⊙ (1 + α S), α = 0.3;  location prior L (the Gaussian on the grid);
3. when the language side is used (a trained model): the pre-neck features G' = G ⊙ (1 + β L), β = 0.5,
   go through the prefix again, giving the L-V term and the [SEG] prompt for this target;
4. beyond the released code (it has no prompts from the shot, and never says how L is built): the cells
   where the calibrated similarity and the prior agree form a coarse region R; each connected part of R
   gives a **box prompt** (LiteMedSAM's decoder was trained on boxes) to SAM's prompt encoder, next to the
   [SEG] prompt when the language side is used. No cell in R means the class is absent from the slice;
5. decoder logits M' = M + 0.5 (mean|M| + 1e-6) L (SYRE_SPEC §4 step 5);
6. the final logit fuses the decoder's logit, the coarse similarity evidence and the appearance log-ratio
   with weights chosen **on the shot itself** at registration (the candidate that best reproduces the
   support mask from the support image): for thin, dark structures that a box decoder segments poorly
   (the lateral ventricles on T1) appearance wins, for blob-like organs the decoder does.

Plain prompts never reach this module: their path is unchanged, bit for bit.

The package, one concept a module:

* ``registry.py``: the class registry on disk (names, storage, atomic writes, format versions);
* ``shot.py``: what a shot keeps (``Shot``, ``make_shot``) and how shots merge (``ClassAdapter``);
* ``grid.py``: the maps on the embedding grid both of them use (prior, similarity, mask resizing);
* ``config.py``: ``OTFAConfig``, the released constants and the fusion strategies;
* ``decode.py``: SAM's prompt encoder and mask decoder on one embedding;
* ``adapt.py``: the inference-time adaptation and fusion (steps 1-6 above) and its calibration on the shot;
* ``persam.py``: the PerSAM-style baseline;
* ``plan.py``: the engine's side (which targets of a call name registered classes);
* ``errors.py``: ``RegistryError`` and ``ClassNotFound``.

Every name other modules use is re-exported here, so ``from rcmed_engine.otfa import X`` keeps working.
"""

from __future__ import annotations

import os  # noqa: F401 (tests patch otfa.os.replace to fail a registry write)

from .adapt import (NEG_LOGIT, _components, adapt_slices, appearance_lut, calibrate_shot, dice_score, fuse,
                    language_inputs, uses_language)
from .config import ADAPT_ALPHA, LOCATION_SCALE, LOGIT_PRIOR, STRATEGIES, OTFAConfig
from .decode import AdaptOutput, _decode, _prompt_encoder_fp32
from .errors import ClassNotFound, RegistryError
from .grid import _grid_coords, cosine_map, grey_levels, mask_to_grid, prior_map, standardised_sigmoid
from .persam import persam_slices
from .plan import PromptAdaptation, plan_adaptation
from .registry import (CLASSES_DIR, LOCK_NAME, MAX_NAME_CHARS, REGISTRY_FORMAT, REGISTRY_JSON, REGISTRY_VERSION,
                       ClassInfo, ClassRegistry, _slug, as_registry, default_registry_dir, normalise_name,
                       validate_name)
from .shot import HIST_BINS, ClassAdapter, Shot, _ring, _smooth_hist, make_shot

__all__ = [
    "ADAPT_ALPHA", "AdaptOutput", "CLASSES_DIR", "ClassAdapter", "ClassInfo", "ClassNotFound", "ClassRegistry",
    "HIST_BINS", "LOCATION_SCALE", "LOCK_NAME", "LOGIT_PRIOR", "MAX_NAME_CHARS", "NEG_LOGIT", "OTFAConfig",
    "PromptAdaptation", "REGISTRY_FORMAT", "REGISTRY_JSON", "REGISTRY_VERSION", "RegistryError", "STRATEGIES",
    "Shot", "adapt_slices", "appearance_lut", "as_registry", "calibrate_shot", "cosine_map", "default_registry_dir",
    "dice_score", "fuse", "grey_levels", "language_inputs", "make_shot", "mask_to_grid", "normalise_name",
    "persam_slices", "plan_adaptation", "prior_map", "standardised_sigmoid", "uses_language", "validate_name",
]
