"""How a registered class is applied: the released constants, the fusion strategies, OTFAConfig."""

from __future__ import annotations

from dataclasses import dataclass

#: Released defaults (SYRE_SPEC §4): adapt_alpha, location_scale, the hard-coded decoder prior weight.
ADAPT_ALPHA = 0.3
LOCATION_SCALE = 0.5
LOGIT_PRIOR = 0.5

#: Fusion candidates (decoder, coarse similarity, appearance), chosen per class on the shot itself.
STRATEGIES: dict[str, tuple[float, float, float]] = {
    "decoder": (1.0, 0.0, 0.0),
    "appearance": (0.0, 1.0, 1.0),
    "fused": (1.0, 1.0, 1.0),
}


@dataclass
class OTFAConfig:
    """How a registered class is applied. The defaults are the ones the benchmark ran with.

    method: "otfa" (rcmed_engine.otfa.adapt) or "persam" (the PerSAM-style baseline, for comparison).
    alpha, beta, logit_prior: the released weights of S on F, of L on the pre-neck features, and of L on
        the decoder logits (SYRE_SPEC §4).
    prior_scale: the spatial Gaussian's spread is widened by this factor: other scans are placed
        differently than the shot.
    prior_floor: cells where the widened Gaussian is below this value are never part of the coarse region.
    tau: the coarse threshold, as a fraction of the way from the support's mean similarity outside the
        mask (0) to inside it (1).
    language: use the language side (G' = G ⊙ (1 + βL), L-V term, [SEG] prompt); None means "when the
        model's RCMed parts are trained" (for untrained ones they add only noise).
    strategy: force a fusion strategy ("decoder", "appearance", "fused") instead of the one the class
        chose on its shot.
    max_boxes: at most this many connected parts of the coarse region become box prompts.
    """

    method: str = "otfa"
    alpha: float = ADAPT_ALPHA
    beta: float = LOCATION_SCALE
    logit_prior: float = LOGIT_PRIOR
    prior_scale: float = 1.5
    prior_floor: float = 0.01
    tau: float = 0.75
    language: bool | None = None
    strategy: str | None = None
    min_cells: int = 2
    max_boxes: int = 4

    def __post_init__(self) -> None:
        if self.method not in ("otfa", "persam"):
            raise ValueError(f"unknown adaptation method {self.method!r}; use otfa or persam")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"unknown fusion strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
