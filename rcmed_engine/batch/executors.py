"""Where cases run. One protocol; ``LocalExecutor`` here (one model in this process, no Ray import),
``ray_executor.RayExecutor`` and ``server_executor.ServerExecutor`` beside it."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol

from .work import Task, process


class Executor(Protocol):
    """``model()``: the identity of the model that will run (preset, weights hash, engine version), asked once
    before any case; ``run(tasks)``: each task's outcome, in any order, pulling tasks only as it has room
    (back-pressure); ``close()``: free workers and models."""

    def model(self) -> dict[str, Any]: ...

    def run(self, tasks: Iterable[Task]) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...


def model_identity(info: dict[str, Any]) -> dict[str, Any]:
    return {"preset": info.get("preset"), "weights_sha256": info.get("weights_sha256"),
            "engine_version": info.get("engine_version")}


def model_key(identity: dict[str, Any]) -> str:
    """What the manifest compares: a result from other weights is not done."""
    return f"{identity.get('preset')}:{identity.get('weights_sha256')}"


class LocalExecutor:
    """One engine in this process; cases one after another. ``engine``: an Engine (or anything with its
    ``segment`` and ``info``), or a callable that makes one (called once, when first needed)."""

    def __init__(self, engine: Any = None, factory: Callable[[], Any] | None = None) -> None:
        self._engine, self._factory = engine, factory

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = self._factory()  # type: ignore[misc]
        return self._engine

    def model(self) -> dict[str, Any]:
        return model_identity(self.engine.info())

    def run(self, tasks: Iterable[Task]) -> Iterator[dict[str, Any]]:
        for task in tasks:
            yield process(self.engine, task)

    def close(self) -> None:
        pass
