"""The class registry on disk: names, storage, atomic writes and format versions.

The registry is a folder:

* ``registry.json``: format, version and per class the display name, the key, the tensor file, the
  preset and embedding size it was registered with, and one record per shot (source image hash, slice,
  axis, modality, area, date);
* ``classes/<key>.<hash>.safetensors``: the shots' tensors, stacked.

Writes are atomic: a new tensor file under a new name, then ``registry.json`` through a temporary file and
``os.replace`` (the commit), then the old tensor file is removed. An error before the commit removes what it
wrote, so a failed registration leaves the folder byte-identical. A lock file serialises writers.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import ClassNotFound, RegistryError
from .shot import ClassAdapter, Shot


REGISTRY_FORMAT = "rcmed-otfa-registry"
REGISTRY_VERSION = 1
REGISTRY_JSON = "registry.json"
CLASSES_DIR = "classes"
LOCK_NAME = ".lock"
MAX_NAME_CHARS = 100


def normalise_name(name: str) -> str:
    """The lookup key of a class name: NFKC, lower case, underscores as spaces, single spaces."""
    text = unicodedata.normalize("NFKC", str(name)).replace("_", " ").lower()
    return " ".join(text.split())


def validate_name(name: object) -> str:
    """A class name as it will be shown: stripped and single-spaced. Raises RegistryError if unusable.

    A usable name has a letter or digit, is at most 100 characters, and reads as exactly one prompt target
    (no commas, "and", brackets), so that ``--prompt NAME`` finds it again.
    """
    from ..prompts import PromptError, parse_targets

    if not isinstance(name, str):
        raise RegistryError("the class name must be text")
    shown = " ".join(unicodedata.normalize("NFKC", name).split())
    if not shown:
        raise RegistryError("the class name is empty: give the structure a name, e.g. 'lateral ventricles'")
    if not any(ch.isalnum() for ch in shown):
        raise RegistryError(f"the class name {name!r} has no letter or digit: give the structure a real name")
    if len(shown) > MAX_NAME_CHARS:
        raise RegistryError(f"the class name is {len(shown)} characters long; the limit is {MAX_NAME_CHARS}")
    try:
        targets = parse_targets(shown)
    except PromptError as exc:
        raise RegistryError(f"the class name {name!r} cannot be used as a prompt: {exc}") from None
    if len(targets) != 1 or normalise_name(targets[0]) != normalise_name(shown):
        raise RegistryError(
            f"the class name {name!r} would be read as the prompt target(s) {targets}; use a name without "
            "commas, 'and', brackets or a leading verb or article, e.g. 'lateral ventricles'")
    return shown


def _slug(key: str) -> str:
    ascii_key = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_key).strip("-")[:40] or "class"
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class ClassInfo:
    """A registered class as ``list`` shows it."""

    name: str
    key: str
    shots: int
    preset: str
    embedding_dim: int
    strategy: str
    created: str
    updated: str
    records: list[dict]

    def as_dict(self) -> dict:
        return {"name": self.name, "shots": self.shots, "preset": self.preset, "embedding_dim": self.embedding_dim,
                "strategy": self.strategy, "created": self.created, "updated": self.updated,
                "records": self.records}


class ClassRegistry:
    """Registered classes in a folder (see the module docstring for the layout and the write protocol)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise RegistryError(f"the registry path {self.folder} is a file, not a folder")
        self._adapters: dict[str, ClassAdapter] = {}

    def __repr__(self) -> str:
        return f"ClassRegistry({str(self.folder)!r})"

    # ------------------------------------------------------------------------------------------ reading
    @property
    def index_path(self) -> Path:
        return self.folder / REGISTRY_JSON

    def _read_index(self) -> dict:
        path = self.index_path
        if not path.is_file():
            return {"format": REGISTRY_FORMAT, "version": REGISTRY_VERSION, "classes": {}}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path} is not a readable class registry ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT or not isinstance(
                data.get("classes"), dict):
            raise RegistryError(f"{path} is not an RCMed class registry (format {REGISTRY_FORMAT!r} expected)")
        if int(data.get("version", 0)) > REGISTRY_VERSION:
            raise RegistryError(f"{path} was written by a newer RCMed (registry version {data.get('version')}); "
                                "update rcmed")
        return data

    @staticmethod
    def _info(entry: dict) -> ClassInfo:
        records = list(entry.get("shots", []))
        return ClassInfo(name=entry["name"], key=entry["key"], shots=len(records), preset=entry["preset"],
                         embedding_dim=int(entry["embedding_dim"]), strategy=entry.get("strategy", "fused"),
                         created=entry["created"], updated=entry["updated"], records=records)

    def list(self) -> list[ClassInfo]:
        """Registered classes, sorted by name."""
        entries = self._read_index()["classes"].values()
        return sorted((self._info(e) for e in entries), key=lambda i: i.key)

    def names(self) -> list[str]:
        return [i.name for i in self.list()]

    def get(self, name: str) -> ClassInfo | None:
        entry = self._read_index()["classes"].get(normalise_name(name))
        return None if entry is None else self._info(entry)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._read_index()["classes"]

    def _load_tensors(self, entry: dict) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.folder / entry["file"]
        try:
            tensors = load_file(str(path))
        except FileNotFoundError:
            raise RegistryError(f"class {entry['name']!r}: its tensor file {path} is missing") from None
        except (SafetensorError, OSError) as exc:
            raise RegistryError(f"class {entry['name']!r}: {path} is not a readable safetensors file ({exc})") from None
        n = len(entry.get("shots", []))
        for key in Shot.TENSORS + ("scalars",):
            if key not in tensors or tensors[key].shape[0] != n:
                raise RegistryError(f"class {entry['name']!r}: {path} lacks {key!r} for its {n} shot(s)")
        return tensors

    def shots(self, name: str) -> list[Shot]:
        """The shots of a class, as registered (tensors and per-shot records)."""
        data = self._read_index()
        entry = data["classes"].get(normalise_name(name))
        if entry is None:
            raise ClassNotFound(self._unknown(name, data))
        return self._shots(entry)

    def _shots(self, entry: dict) -> list[Shot]:
        t = self._load_tensors(entry)
        out = []
        for i, record in enumerate(entry["shots"]):
            scalars = dict(zip(Shot.SCALARS, (float(v) for v in t["scalars"][i])))
            out.append(Shot(**{k: t[k][i].clone() for k in Shot.TENSORS}, **scalars,
                            scores=dict(record.get("scores", {})), meta=dict(record)))
        return out

    def adapter(self, name: str) -> ClassAdapter | None:
        """The merged adapter of a class, or None when the name is not registered."""
        for attempt in range(2):
            entry = self._read_index()["classes"].get(normalise_name(name))
            if entry is None:
                return None
            cached = self._adapters.get(entry["file"])
            if cached is not None:
                return cached
            try:
                adapter = ClassAdapter.merge(entry["name"], self._shots(entry))
            except RegistryError:
                if attempt == 0 and not (self.folder / entry["file"]).exists():
                    continue  # a writer replaced the file between our two reads
                raise
            adapter.strategy = entry.get("strategy", adapter.strategy)
            self._adapters[entry["file"]] = adapter
            return adapter
        return None

    @staticmethod
    def _unknown(name: str, data: dict) -> str:
        known = sorted(e["name"] for e in data["classes"].values())
        listing = ", ".join(repr(k) for k in known) if known else "none"
        return f"no class named {name!r} in the registry (registered: {listing})"

    # ------------------------------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: writers are not serialised across processes
            yield
            return
        with open(self.folder / LOCK_NAME, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _atomic_write(self, rel: str, writer) -> Path:
        target = self.folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            writer(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def _commit(self, data: dict, new_file: tuple[str, dict[str, torch.Tensor]] | None,
                old_files: Sequence[str]) -> None:
        """Write a new tensor file (if any), then the index (the commit), then drop replaced files."""
        from safetensors.torch import save_file

        written: Path | None = None
        try:
            if new_file is not None:
                rel, tensors = new_file
                written = self._atomic_write(rel, lambda p: save_file(tensors, p, metadata={"format": REGISTRY_FORMAT}))
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
            self._atomic_write(REGISTRY_JSON, lambda p: Path(p).write_text(text, encoding="utf-8"))
        except BaseException:
            if written is not None and written.name not in {Path(f).name for f in old_files}:
                written.unlink(missing_ok=True)
            raise
        for rel in old_files:
            if new_file is None or rel != new_file[0]:
                (self.folder / rel).unlink(missing_ok=True)

    def add_shot(self, name: str, shot: Shot, *, preset: str, embedding_dim: int, record: dict | None = None) -> ClassInfo:
        """Register a class, or add a shot to it when the name exists (nothing is ever overwritten)."""
        shown = validate_name(name)
        key = normalise_name(shown)
        if shot.prototype.shape != (embedding_dim,):
            raise RegistryError(f"the shot's prototype has shape {tuple(shot.prototype.shape)}, "
                                f"expected ({embedding_dim},)")
        with self._locked():
            data = self._read_index()
            entry = data["classes"].get(key)
            now = _now()
            if entry is None:
                entry = {"name": shown, "key": key, "preset": preset, "embedding_dim": int(embedding_dim),
                         "created": now, "shots": []}
                shots: list[Shot] = []
                old_files: list[str] = []
            else:
                if entry["preset"] != preset or int(entry["embedding_dim"]) != int(embedding_dim):
                    raise RegistryError(
                        f"class {entry['name']!r} was registered with the {entry['preset']} preset "
                        f"({entry['embedding_dim']}-channel embeddings); this model is {preset} "
                        f"({embedding_dim} channels). Register it under another name or in another registry")
                same = ("source_sha256", "axis", "slice", "mask_sha256")
                if record and all(record.get(f) is not None for f in same) and any(
                        all(old.get(f) == record[f] for f in same) for old in entry.get("shots", [])):
                    raise RegistryError(f"class {entry['name']!r} already has this shot (the same image, slice "
                                        f"{record['slice']} and outline); nothing was added")
                shots = self._shots(entry)
                old_files = [entry["file"]]
            rec = {"date": now, **(record or {}), "scores": dict(shot.scores)}
            shots = shots + [Shot(**{**shot.__dict__, "meta": rec})]
            tensors = {k: torch.stack([s.__dict__[k].float().cpu() for s in shots]).contiguous()
                       for k in Shot.TENSORS}
            tensors["scalars"] = torch.tensor([[float(s.__dict__[k]) for k in Shot.SCALARS] for s in shots],
                                              dtype=torch.float32)
            digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors.values())
                                    + now.encode()).hexdigest()[:12]
            rel = f"{CLASSES_DIR}/{_slug(key)}.{digest}.safetensors"
            merged = ClassAdapter.merge(shown, shots)
            new_entry = {**entry, "file": rel, "updated": now, "strategy": merged.strategy,
                         "shots": [s.meta for s in shots]}
            new_data = {**data, "format": REGISTRY_FORMAT, "version": REGISTRY_VERSION,
                        "classes": {**data["classes"], key: new_entry}}
            self._commit(new_data, (rel, tensors), old_files)
            return self._info(new_entry)

    def remove(self, name: str) -> ClassInfo:
        """Remove a class and its tensors. Raises RegistryError when it is not registered."""
        key = normalise_name(name)
        if not self.index_path.is_file():
            raise ClassNotFound(f"no class named {name!r}: {self.folder} holds no registry")
        with self._locked():
            data = self._read_index()
            entry = data["classes"].get(key)
            if entry is None:
                raise ClassNotFound(self._unknown(name, data))
            classes = {k: v for k, v in data["classes"].items() if k != key}
            self._commit({**data, "classes": classes}, None, [entry["file"]])
            self._adapters.pop(entry["file"], None)
            return self._info(entry)


def default_registry_dir() -> Path:
    """Where an engine keeps classes when it is given no registry: $RCMED_REGISTRY, else the user's data folder
    (~/.local/share/rcmed/classes, ~/Library/Application Support/rcmed/classes, %APPDATA%/rcmed/classes)."""
    env = os.environ.get("RCMED_REGISTRY")
    if env:
        return Path(env).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "rcmed" / "classes"


def as_registry(registry: "ClassRegistry | str | os.PathLike | None", must_exist: bool = False) -> ClassRegistry | None:
    """A ClassRegistry from a registry or a folder path (None stays None)."""
    if registry is None or isinstance(registry, ClassRegistry):
        return registry
    reg = ClassRegistry(registry)
    if must_exist and not reg.index_path.is_file():
        raise RegistryError(f"no class registry in {reg.folder} (register a class first: rcmed register ...)")
    return reg
