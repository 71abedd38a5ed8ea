"""Which engine the extension uses, creating it, and keeping one loaded.

Two kinds, with the same methods (``segment``, ``info``, and ``register_class`` where OTFA is available):

* local: ``rcmed_engine.engine.Engine.from_preset(preset, weights, device)`` in Slicer's own Python
  (needs PyTorch), with each chosen adapter folder loaded into it (``Engine.load_adapter``);
* remote: ``rcmed_engine.client.RemoteEngine(url, token)`` talking to ``rcmed serve`` (no PyTorch needed).

Nothing here imports torch at module import time; the engine modules are imported only when an engine is
created, so the remote-only install works without PyTorch.
"""

from __future__ import annotations

import importlib.util
import inspect
import ipaddress
import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

LOCAL, REMOTE = "local", "remote"
MODES = (LOCAL, REMOTE)
# Preset names are the engine's contract (DESIGN.md); "tiny" is a small random model for tests.
PRESETS = ("lite", "tiny", "syre-7b")
PRESETS_NEEDING_WEIGHTS = ("syre-7b",)
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_URL = "http://127.0.0.1:8765"
TOKEN_ENV = "RCMED_TOKEN"
# rcmed_engine.adapters.CONFIG_NAME, spelled here because that module imports torch and the panel reads
# adapter folders without it (the remote-only install has no torch).
ADAPTER_CONFIG = "adapter_config.json"


class EngineUnavailable(RuntimeError):
    """The chosen engine cannot be created here; the message says what to install or change."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides which engine is used. Two equal specs share one loaded engine."""

    mode: str = LOCAL
    preset: str = "lite"
    weights: str = ""  # a folder of weights; "" = the preset's own
    device: str = "auto"
    url: str = ""
    token: str = field(default="", repr=False)  # never shown, never persisted (see settings.py)
    adapters: tuple[str, ...] = ()  # adapter folders loaded into a local engine, in order; remote: the server's

    def normalized(self) -> "EngineSpec":
        """Drop the fields that do not apply to the mode, so equal engines compare equal (the adapters are part
        of a local engine's identity: another list is another engine)."""
        if self.mode == REMOTE:
            return EngineSpec(mode=REMOTE, url=self.url.strip().rstrip("/"), token=self.token.strip(),
                              preset="", weights="", device="")
        weights = str(Path(self.weights).expanduser()) if self.weights.strip() else ""
        adapters = tuple(str(Path(a).expanduser()) for a in self.adapters if str(a).strip())
        return EngineSpec(mode=LOCAL, preset=self.preset, weights=weights, device=self.device or "auto",
                          adapters=adapters)

    def describe(self) -> str:
        s = self.normalized()
        if s.mode == REMOTE:
            return f"remote engine at {s.url or '(no URL)'}"
        model = f"weights in {s.weights}" if s.weights else f"the '{s.preset}' preset"
        n = len(s.adapters)
        extra = f" with {n} adapter{'s' if n > 1 else ''}" if n else ""
        return f"local engine: {model}{extra} on {s.device}"


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder declares (its ``rcmed`` section), or why it cannot be used (``problem``)."""

    folder: str
    name: str = ""
    classes: tuple[str, ...] = ()
    problem: str = ""

    def label(self) -> str:
        """One list line: the name and classes, or the folder and its problem."""
        if self.problem:
            return f"{Path(self.folder).name or self.folder}: {self.problem}"
        return f"{self.name}: {', '.join(self.classes)}"


def read_adapter(folder: str) -> AdapterInfo:
    """Read an adapter folder's adapter_config.json without torch (rcmed_engine.adapters checks the rest:
    tensors, base weights, overlapping classes, when the engine loads it)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return AdapterInfo(str(folder), problem=f"the adapter folder does not exist: {folder}")
    config = path / ADAPTER_CONFIG
    if not config.is_file():
        return AdapterInfo(str(path), problem=f"not an adapter folder (no {ADAPTER_CONFIG}): {path}")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return AdapterInfo(str(path), problem=f"{config} is not valid JSON: {' '.join(str(exc).split())}")
    meta = data.get("rcmed") if isinstance(data, dict) else None
    return _adapter_from_meta(str(path), meta) or AdapterInfo(
        str(path), problem=f"{config} lacks the rcmed section with a name and a list of classes")


def _adapter_from_meta(folder: str, meta: Any) -> AdapterInfo | None:
    if not isinstance(meta, dict) or not meta.get("name") or not isinstance(meta.get("classes"), list) \
            or not meta["classes"]:
        return None
    return AdapterInfo(folder, str(meta["name"]), tuple(str(c) for c in meta["classes"]))


def server_adapters(info: dict[str, Any]) -> list[AdapterInfo]:
    """The adapters a (remote) engine's info lists (``Engine.info()["adapters"]``: name, folder, classes...)."""
    found = info.get("adapters") if isinstance(info, dict) else None
    out = []
    for a in found if isinstance(found, list) else []:
        item = _adapter_from_meta(str(a.get("folder", "")), a) if isinstance(a, dict) else None
        if item is not None:
            out.append(item)
    return out


def with_env_token(spec: EngineSpec, environ: dict[str, str] | None = None) -> EngineSpec:
    """Fill an empty remote token from RCMED_TOKEN (as the ``rcmed`` command does)."""
    env = os.environ if environ is None else environ
    if spec.mode == REMOTE and not spec.token and env.get(TOKEN_ENV):
        return replace(spec, token=env[TOKEN_ENV])
    return spec


_SESSION = {"token": ""}


def session_token() -> str:
    """The token typed in this session (kept in memory only)."""
    return _SESSION["token"]


def set_session_token(token: str) -> None:
    _SESSION["token"] = str(token or "").strip()


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(spec: EngineSpec) -> tuple[list[str], list[str]]:
    """(problems, warnings) for a spec. Problems stop the run; warnings are shown."""
    problems: list[str] = []
    warnings: list[str] = []
    s = spec.normalized()
    if spec.mode not in MODES:
        return [f"unknown engine mode {spec.mode!r}; use local or remote"], []
    if s.mode == LOCAL:
        if s.preset not in PRESETS:
            problems.append(f"unknown model preset {s.preset!r}; choose one of {', '.join(PRESETS)}")
        if s.device not in DEVICES and not s.device.startswith("cuda:"):
            problems.append(f"unknown device {s.device!r}; choose auto, cpu or cuda")
        if s.weights:
            if not Path(s.weights).is_dir():
                problems.append(f"the weights folder does not exist: {s.weights}")
        elif s.preset in PRESETS_NEEDING_WEIGHTS:
            problems.append(f"the '{s.preset}' preset needs a folder of weights; choose one")
        if s.preset == "tiny" and not s.weights:
            warnings.append("the 'tiny' preset is an untrained test model: its masks are meaningless")
        problems += _adapter_problems(s.adapters)
    else:
        u = urlparse(s.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            problems.append(f"the server URL must look like http://host:port, got {s.url!r}")
        else:
            if not s.token:
                problems.append(f"the server needs a token (type it, or set {TOKEN_ENV})")
            if u.scheme == "http" and not _is_loopback(u.hostname):
                warnings.append("the token and images travel unencrypted over http to a non-local host; "
                                "prefer https or an SSH tunnel")
    return problems, warnings


def _adapter_problems(folders: tuple[str, ...]) -> list[str]:
    problems = [a.problem for a in map(read_adapter, folders) if a.problem]
    twice = sorted({f for f in folders if folders.count(f) > 1})
    return problems + [f"the adapter folder is chosen twice: {f}" for f in twice]


def local_engine_importable() -> bool:
    """Whether Slicer's Python has what a local engine needs (PyTorch); checked without importing it."""
    return importlib.util.find_spec("torch") is not None


def create_engine(spec: EngineSpec, quick: bool = False) -> Any:
    """Create the engine a spec names (slow for local models: run it off the main thread).

    ``quick``: a remote client that gives up after one retry (for "Test connection").
    """
    problems, _ = validate(spec)
    if problems:
        raise EngineUnavailable("; ".join(problems))
    s = spec.normalized()
    if s.mode == REMOTE:
        try:
            from rcmed_engine.client import RemoteEngine
        except ImportError as exc:
            raise EngineUnavailable(f"the remote client cannot be imported ({exc}); "
                                    "install the extension's remote-only requirements") from None
        if quick:
            try:
                return RemoteEngine(s.url, s.token, retries=1, connect_timeout=3.0)
            except TypeError:  # a client without those options
                pass
        return RemoteEngine(s.url, s.token)
    if not local_engine_importable():
        raise EngineUnavailable("a local engine needs PyTorch in Slicer's Python: install the PyTorch "
                                "extension and let RCMed install its requirements, or use a remote engine")
    try:
        from rcmed_engine.engine import Engine
    except ImportError as exc:
        raise EngineUnavailable(f"the local engine cannot be imported ({exc}); "
                                "let RCMed install its requirements") from None
    engine = Engine.from_preset(s.preset, weights=s.weights or None, device=s.device)
    load_adapters(engine, s.adapters)
    return engine


def load_adapters(engine: Any, folders: tuple[str, ...]) -> None:
    """Load each adapter folder into a new engine. The engine's one-line reason (other base weights, a corrupt
    file, a class two adapters claim...) becomes EngineUnavailable, as a bad spec does, and no engine results."""
    from rcmed_engine.adapters import AdapterError

    for folder in folders:
        try:
            engine.load_adapter(folder)
        except AdapterError as exc:
            raise EngineUnavailable(" ".join(str(exc).split())) from None


def supports_otfa(engine: Any) -> bool:
    """Whether the engine can learn a class from one labelled slice (one-shot adaptation)."""
    return callable(getattr(engine, "register_class", None))


def register_class(engine: Any, volume: Any, mask: Any, name: str, axis: str, slice_index: int,
                   modality: str | None = None) -> Any:
    """Learn ``name`` from ``mask`` on one slice (one-shot adaptation), on a local or a remote engine.

    The slice is passed under the keyword the engine's ``register_class`` declares (``slice_index`` or
    ``slice``), so both engines work whichever spelling they use.
    """
    if not supports_otfa(engine):
        raise EngineUnavailable("this engine cannot learn new classes (one-shot adaptation is not available in it)")
    method = engine.register_class
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: dict[str, Any] = {"axis": axis}
    if modality and (not params or "modality" in params):
        kwargs["modality"] = modality
    if "slice_index" in params:
        kwargs["slice_index"] = int(slice_index)
    elif "slice" in params:
        kwargs["slice"] = int(slice_index)
    else:
        kwargs["slice_index"] = int(slice_index)
    return method(volume, mask, name, **kwargs)


def adapter_vocabulary(spec: EngineSpec, server: list[AdapterInfo] | tuple[AdapterInfo, ...] = ()) -> list[str]:
    """The classes the engine's adapters answer: a local spec's adapter folders (unreadable ones skipped: the
    spec's problems say why), or for a remote spec ``server``, the adapters the server listed."""
    s = spec.normalized()
    found = server if s.mode == REMOTE else [read_adapter(f) for f in s.adapters]
    return [c for a in found if not a.problem for c in a.classes]


def trained_vocabulary(spec: EngineSpec) -> list[str]:
    """The classes a local engine's weights were trained on, without loading them (remote: unknown, [])."""
    s = spec.normalized()
    if s.mode == REMOTE:
        return []
    try:
        from rcmed_engine.vocabulary import weights_vocabulary
    except ImportError:  # the engine is not installed yet
        return []
    if s.weights:
        return weights_vocabulary(s.weights)
    return weights_vocabulary() if s.preset == "lite" else []


def prompt_vocabulary(spec: EngineSpec, server: list[AdapterInfo] | tuple[AdapterInfo, ...] = ()) -> list[str]:
    """The classes the prompt box suggests besides the user's own: the adapters' (chosen on purpose, so first),
    then those the weights were trained on."""
    return [*adapter_vocabulary(spec, server), *trained_vocabulary(spec)]


def engine_info(engine: Any) -> dict[str, Any]:
    info = getattr(engine, "info", None)
    return dict(info()) if callable(info) else {}


def test_connection(spec: EngineSpec, factory: Callable[[EngineSpec], Any] | None = None) -> str:
    """One line saying what answered, or raise with why not."""
    return probe(spec, factory)[0]


def probe(spec: EngineSpec, factory: Callable[[EngineSpec], Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(one line saying what answered, its info), or raise with why not (the panel's "Test connection", which
    also lists the server's adapters from the info)."""
    engine = factory(spec) if factory is not None else create_engine(spec, quick=True)
    try:
        info = engine_info(engine)
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
    parts = [f"{k}: {info[k]}" for k in ("preset", "device", "engine_version", "trained") if k in info]
    names = [a.name for a in server_adapters(info)]
    if names:
        parts.append("adapters: " + ", ".join(names))
    return "connected: " + (", ".join(parts) if parts else "the server answered"), info


class EngineCache:
    """Keeps one engine loaded per process; a different spec replaces it. Thread-safe."""

    def __init__(self, factory: Callable[[EngineSpec], Any] = create_engine) -> None:
        self.factory = factory
        self._lock = threading.Lock()
        self._spec: EngineSpec | None = None
        self._engine: Any = None

    def get(self, spec: EngineSpec) -> Any:
        key = spec.normalized()
        with self._lock:
            if self._engine is not None and self._spec == key:
                return self._engine
        engine = self.factory(spec)  # outside the lock: loading can take a while
        with self._lock:
            self._drop()
            self._spec, self._engine = key, engine
            return engine

    def put(self, spec: EngineSpec, engine: Any) -> None:
        """Install an engine for a spec (tests, and engines built elsewhere)."""
        with self._lock:
            self._drop()
            self._spec, self._engine = spec.normalized(), engine

    def current(self) -> tuple[EngineSpec | None, Any]:
        with self._lock:
            return self._spec, self._engine

    def clear(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._engine is not None:
            close = getattr(self._engine, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # closing an old client must not stop the new one
                    pass
        self._spec, self._engine = None, None


# One per process: the module panel and the Segment Editor effect share the loaded model.
SHARED_CACHE = EngineCache()
