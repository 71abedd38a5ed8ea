"""The extension's persistent user settings, as flat string key/values (what QSettings stores).

The server token is never part of the settings: it lives in memory, or in the RCMED_TOKEN environment
variable. Neither the settings nor the scene's parameter node ever hold it, so it is not written to disk
or into saved scenes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Mapping

from .engines import DEFAULT_URL, DEVICES, LOCAL, MODES, PRESETS, EngineSpec

PREFIX = "RCMed/"
MAX_RECENT = 12
MAX_PROMPT_CHARS = 500
# The panel's modality choices: "auto" plus the engine's canonical names (rcmed_engine.preprocess.MODALITY_TEXT).
MODALITIES = ("auto", "CT", "MR", "X-ray", "US", "PET", "microscopy", "histopathology", "endoscopy",
              "dermoscopy", "fundus", "OCT")


def clean_prompt(text: str) -> str:
    return " ".join(str(text).split())[:MAX_PROMPT_CHARS]


def push_recent(recent: list[str], prompt: str, limit: int = MAX_RECENT) -> list[str]:
    """The recent-prompts list with ``prompt`` first; duplicates (ignoring case and spacing) removed."""
    p = clean_prompt(prompt)
    if not p:
        return list(recent)[:limit]
    key = p.lower()
    rest = [r for r in recent if clean_prompt(r).lower() != key and clean_prompt(r)]
    return ([p] + rest)[:limit]


@dataclass
class Settings:
    engine_mode: str = LOCAL
    preset: str = "lite"
    use_weights_folder: bool = False
    weights: str = ""
    device: str = "auto"
    url: str = DEFAULT_URL
    recent_prompts: list[str] = field(default_factory=list)
    learned_classes: list[str] = field(default_factory=list)  # names registered by one-shot adaptation
    adapters: list[str] = field(default_factory=list)  # adapter folders for a local engine, in loading order

    def engine_spec(self, token: str = "") -> EngineSpec:
        return EngineSpec(mode=self.engine_mode, preset=self.preset,
                          weights=self.weights if self.use_weights_folder else "",
                          device=self.device, url=self.url, token=token, adapters=tuple(self.adapters))

    def with_adapter(self, folder: str) -> "Settings":
        """The adapter folder added at the end (once: the engine refuses two adapters claiming one class)."""
        folder = str(folder).strip()
        if not folder or folder in self.adapters:
            return replace(self, adapters=list(self.adapters))
        return replace(self, adapters=[*self.adapters, folder])

    def without_adapters(self, folders: list[str] | tuple[str, ...]) -> "Settings":
        return replace(self, adapters=[a for a in self.adapters if a not in set(folders)])

    def with_prompt(self, prompt: str) -> "Settings":
        return replace(self, recent_prompts=push_recent(self.recent_prompts, prompt))

    def with_learned_class(self, name: str) -> "Settings":
        return replace(self, learned_classes=push_recent(self.learned_classes, name, limit=200))

    def prompt_choices(self, vocabulary: list[str] | tuple[str, ...] = ()) -> list[str]:
        """What the prompt box offers: recent prompts, then learned classes, then ``vocabulary`` (the classes
        of the engine's adapters and those its weights were trained on: engines.prompt_vocabulary), each once."""
        out: list[str] = []
        seen: set[str] = set()
        for choice in (*self.recent_prompts, *self.learned_classes, *vocabulary):
            if choice.lower() not in seen:
                seen.add(choice.lower())
                out.append(choice)
        return out

    # ------------------------------------------------------------------------------------- (de)serialize
    def to_strings(self) -> dict[str, str]:
        return {
            PREFIX + "EngineMode": self.engine_mode,
            PREFIX + "Preset": self.preset,
            PREFIX + "UseWeightsFolder": "true" if self.use_weights_folder else "false",
            PREFIX + "WeightsFolder": self.weights,
            PREFIX + "Device": self.device,
            PREFIX + "ServerURL": self.url,
            PREFIX + "RecentPrompts": json.dumps(self.recent_prompts),
            PREFIX + "LearnedClasses": json.dumps(self.learned_classes),
            PREFIX + "AdapterFolders": json.dumps(self.adapters),  # JSON: a folder may hold any separator
        }

    @classmethod
    def from_strings(cls, values: Mapping[str, object]) -> "Settings":
        """Read settings back; unknown or damaged values fall back to the defaults."""
        d = cls()

        def get(key: str, default: str) -> str:
            v = values.get(PREFIX + key)
            return default if v is None else str(v)

        def get_list(key: str) -> list[str]:
            try:
                v = json.loads(get(key, "[]"))
            except (ValueError, TypeError):
                return []
            return [clean_prompt(x) for x in v if isinstance(x, str) and clean_prompt(x)] if isinstance(v, list) else []

        def get_paths(key: str) -> list[str]:
            """Folders exactly as saved (not cleaned like prompts: spaces are part of a path), each once."""
            try:
                v = json.loads(get(key, "[]"))
            except (ValueError, TypeError):
                return []
            paths = [x for x in v if isinstance(x, str) and x.strip()] if isinstance(v, list) else []
            return list(dict.fromkeys(paths))

        mode = get("EngineMode", d.engine_mode)
        preset = get("Preset", d.preset)
        device = get("Device", d.device)
        return cls(
            engine_mode=mode if mode in MODES else d.engine_mode,
            preset=preset if preset in PRESETS else d.preset,
            use_weights_folder=get("UseWeightsFolder", "false").lower() == "true",
            weights=get("WeightsFolder", ""),
            device=device if device in DEVICES or device.startswith("cuda:") else d.device,
            url=get("ServerURL", d.url) or d.url,
            recent_prompts=get_list("RecentPrompts")[:MAX_RECENT],
            learned_classes=get_list("LearnedClasses"),
            adapters=get_paths("AdapterFolders"),
        )
