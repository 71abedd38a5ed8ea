"""What the server needs from an engine it does not fully know (the local Engine, a test double, an older
build): optional parameters passed only when accepted, results and registry entries as JSON."""

from __future__ import annotations

import inspect
import json
import math
from typing import Any, Callable

from fastapi.concurrency import run_in_threadpool

from .. import wire
from .errors import ApiError
from .settings import ServerSettings


def accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def filtered(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None and accepts(fn, k)}


def jsonable(value: Any) -> Any:
    """Class registry entries (dataclasses, numpy scalars...) as plain JSON values."""
    import dataclasses

    import numpy as np

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"array{list(value.shape)}"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def result_to_wire(result: Any, codec: str = "zstd") -> dict[str, Any]:
    """A SegmentResult as JSON (rcmed_engine.wire sections 3 to 5)."""
    return {"prompt": result.prompt, "targets": list(result.targets), "answer": result.answer,
            "modality": result.modality, "axis": result.axis, "slices": [int(s) for s in result.slices],
            "geometry": wire.geometry_to_json(result.geometry),
            "labels": wire.encode_labels(result.labels, codec),
            "presence": wire.encode_array(result.presence, codec),
            "timings": {k: float(v) for k, v in result.timings.items()},
            "provenance": {k: str(v) for k, v in result.provenance.items()},
            "notes": [str(n) for n in getattr(result, "notes", [])]}


async def encode_results(results: list, image_id: str, codec: str) -> bytes:
    """The answer to a segment request, encoded off the event loop (label maps can be large)."""
    def run() -> bytes:
        data = {"image": image_id, "results": [result_to_wire(r, codec) for r in results]}
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()

    return await run_in_threadpool(run)


# ----------------------------------------------------------------------------------------- class registry
def call_registry(settings: ServerSettings, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a registry method with the server's registry, whatever the client asked for."""
    kwargs["registry"] = settings.registry
    return fn(*args, **filtered(fn, kwargs))


def require_registry(settings: ServerSettings, engine: Any) -> None:
    if settings.registry is None and getattr(engine, "registry", None) is None:
        raise ApiError(501, "this server has no class registry (one-shot adaptation): start it with "
                            "rcmed serve --registry DIR")
