"""The Ray worker actor's class: one model per actor, loaded once, then case after case. No Ray import here;
``ray_executor`` wraps it with ``ray.remote`` (so Ray pickles it by reference: workers import this module)."""

from __future__ import annotations

import os
from typing import Any

from .work import Task, process


class CaseWorker:
    def __init__(self, preset: str, weights: str | None, device: str, batch_size: int, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        from ..engine import Engine

        self.engine = Engine.from_preset(preset, weights=weights, device=device, batch_size=batch_size)

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def pid(self) -> int:
        return os.getpid()

    def process(self, task: Task) -> dict[str, Any]:
        return process(self.engine, task)
