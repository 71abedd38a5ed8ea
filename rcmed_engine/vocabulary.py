"""The classes a set of weights was trained on, and the words a person types for them.

A weights folder may list its classes in ``config.json`` (``vocabulary``). A prompt's target is mapped
to its class name before it reaches the model ("caudate" -> "caudate nucleus", "Left Pallidum" -> "left
globus pallidus"), so every synonym gets the mask the trained name gets. A target outside the list is
still asked (the presence score decides), with a note that says the weights never saw it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .data_locations import lite_weights_dir

SIDES = ("left", "right")

# Structures drawn in both hemispheres: the bilateral class plus one per side.
PAIRED: dict[str, tuple[str, ...]] = {
    "thalamus": ("thalami", "thalamus proper"),
    "caudate nucleus": ("caudate", "caudate nuclei"),
    "putamen": ("putamina",),
    "globus pallidus": ("pallidum", "pallidus", "globus pallidi"),
    "hippocampus": ("hippocampi", "hippocampal formation"),
    "amygdala": ("amygdalae", "amygdaloid body"),
    "cerebellum": ("cerebellar hemisphere", "cerebellar hemispheres"),
    "lateral ventricle": ("lateral ventricles", "ventricles", "ventricle"),
    "insula": ("insular cortex", "insulae", "insular lobe"),
}

# Classes without sides.
SINGLE: dict[str, tuple[str, ...]] = {
    "brainstem": ("brain stem", "brain-stem"),
    "frontal lobe": ("frontal cortex",),
    "parietal lobe": ("parietal cortex",),
    "temporal lobe": ("temporal cortex",),
    "occipital lobe": ("occipital cortex",),
    "white matter": ("cerebral white matter", "wm"),
    "grey matter": ("gray matter", "gm"),
    "cerebral cortex": ("cortex", "cortical grey matter", "cortical gray matter"),
    "cell nuclei": ("nuclei", "cell nucleus", "nucleus", "cells"),
}


def _key(text: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", text.lower()).split())


def _side_variants(side: str) -> tuple[str, ...]:
    return (side, side[0], f"{side}-sided")


def _build_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for name, synonyms in PAIRED.items():
        for word in (name, *synonyms):
            table[_key(word)] = name
            for side in SIDES:
                for s in _side_variants(side):
                    table[_key(f"{s} {word}")] = f"{side} {name}"
                    table[_key(f"{word} {s}")] = f"{side} {name}"
    for name, synonyms in SINGLE.items():
        for word in (name, *synonyms):
            table[_key(word)] = name
    return table


SYNONYMS = _build_table()

BRAIN_CLASSES: tuple[str, ...] = tuple(
    [n for base in PAIRED for n in (base, f"left {base}", f"right {base}")]
    + [n for n in SINGLE if n != "cell nuclei"]
)
ALL_CLASSES: tuple[str, ...] = BRAIN_CLASSES + ("cell nuclei",)


def canonical(target: str, vocabulary: tuple[str, ...] | list[str] | None = None) -> str | None:
    """The class a typed target names, or None when it names none of ``vocabulary`` (default: all)."""
    vocab = ALL_CLASSES if vocabulary is None else tuple(vocabulary)
    name = SYNONYMS.get(_key(target))
    if name is None:
        key = _key(target)
        name = next((v for v in vocab if _key(v) == key), None)
    return name if name in vocab else None


def resolve_targets(targets: list[str], vocabulary: tuple[str, ...] | list[str] | None,
                    label: str = "these weights", keep: set[int] = frozenset()) -> tuple[list[str], list[str]]:
    """Targets as the model is asked them (one per typed target, same order), and one note per target
    outside ``vocabulary``. Targets whose index is in ``keep`` (registered one-shot classes) pass as typed.

    With no vocabulary (weights that list none, e.g. the released SyRe model), targets pass unchanged.
    """
    if not vocabulary:
        return list(targets), []
    out, notes = [], []
    for i, t in enumerate(targets):
        name = None if i in keep else canonical(t, vocabulary)
        if name is None and i not in keep:
            notes.append(f"{label} were not trained on {t!r}: its mask stays empty unless the presence score says "
                         "it is there; load released weights (--weights) for other anatomy")
        out.append(name or t)
    return out, notes


def weights_vocabulary(folder: str | Path | None = None) -> list[str]:
    """The classes a weights folder lists (default: the shipped lite weights); reads JSON only, no torch."""
    path = Path(folder) if folder else lite_weights_dir()
    try:
        return [str(v) for v in json.loads((path / "config.json").read_text()).get("vocabulary", [])]
    except (OSError, ValueError):
        return []


__all__ = ["weights_vocabulary", "ALL_CLASSES", "BRAIN_CLASSES", "PAIRED", "SINGLE", "SYNONYMS", "canonical", "resolve_targets"]
