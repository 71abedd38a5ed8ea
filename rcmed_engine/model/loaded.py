"""The result of loading a preset: the model, where its weights came from, and what the load found.

Its own module so that presets.py (which dispatches to load_syre) and syre.py (which returns one)
can both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import LoadReport
from .rcmed import RCMed


@dataclass
class LoadedModel:
    model: RCMed
    weights: str  # where the RCMed weights came from
    report: LoadReport | None
