"""``--ray auto|ADDRESS``: cases on a Ray cluster (or a local one Ray starts), one model per worker actor.

Cases are streamed: each actor holds one case at a time and the next case is read from the plan only when an
actor is free (back-pressure; the cohort is never in memory). Scans are read and outputs written by the actors
(the output folder must be shared with them). A worker that dies (killed, out of memory) is replaced and its
case given to the new one; a case that kills its worker twice is marked failed. Ray is imported only here.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

from .errors import BatchUsageError, one_line
from .executors import model_identity, model_key
from .ray_worker import CaseWorker
from .work import Task

MAX_DEATHS = 2


def check_reachable(address: str, timeout: float) -> None:
    """A TCP connection to ADDRESS (host:port or ray://host:port) within ``timeout``: one line if not."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise BatchUsageError(f"--ray {address}: give auto or HOST:PORT (ray://HOST:PORT for Ray Client)")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as exc:
        raise BatchUsageError(f"cannot reach the Ray cluster at {address} within {timeout:g} s: "
                              f"{exc.strerror or exc}") from None


def _init_within(ray, address: str | None, timeout: float) -> None:
    """``ray.init`` that gives up after ``timeout`` seconds (it can wait much longer on a silent address)."""
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                     include_dashboard=False if address is None else None)
        except BaseException as exc:  # reported below, in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise BatchUsageError(f"the Ray cluster at {address or 'auto'} did not answer within {timeout:g} s")
    if failure:
        raise BatchUsageError(f"cannot connect to Ray at {address or 'auto'}: {one_line(failure[0])}")


class RayExecutor:
    def __init__(self, address: str = "auto", workers: int = 1, gpus_per_worker: float = 0.0,
                 cpus_per_worker: float = 1.0, preset: str = "lite", weights: str | None = None,
                 device: str = "auto", batch_size: int = 8, connect_timeout: float = 15.0) -> None:
        if address not in ("auto", "local"):
            check_reachable(address, connect_timeout)
        import ray

        self.ray = ray
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            _init_within(ray, None if address in ("auto", "local") else address, connect_timeout + 30)
        self.actor_class = ray.remote(CaseWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                           max_restarts=0)
        self.args = (preset, weights, "cuda" if gpus_per_worker > 0 and device == "auto" else device, batch_size,
                     max(1, int(cpus_per_worker)))
        self.actors = [self._new_actor() for _ in range(workers)]

    def _new_actor(self):
        return self.actor_class.remote(*self.args)

    def model(self) -> dict[str, Any]:
        infos = self.ray.get([a.info.remote() for a in self.actors])
        keys = {model_key(model_identity(i)) for i in infos}
        if len(keys) != 1:
            raise BatchUsageError(f"the Ray workers loaded different models ({', '.join(sorted(keys))})")
        return model_identity(infos[0])

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def run(self, tasks: Iterable[Task]) -> Iterator[dict[str, Any]]:
        from ray.exceptions import RayActorError, RayTaskError

        plan = iter(tasks)
        pending: dict[Any, tuple[Task, int]] = {}  # object ref -> (task, actor slot)
        deaths: dict[str, int] = {}
        free = list(range(len(self.actors)))

        def submit(task: Task, slot: int) -> None:
            pending[self.actors[slot].process.remote(task)] = (task, slot)

        def fill() -> None:
            while free:
                task = next(plan, None)
                if task is None:
                    return
                submit(task, free.pop(0))

        fill()
        while pending:
            (ref,), _ = self.ray.wait(list(pending), num_returns=1)
            task, slot = pending.pop(ref)
            try:
                outcome = self.ray.get(ref)
            except RayActorError as exc:
                self.ray.kill(self.actors[slot], no_restart=True)
                self.actors[slot] = self._new_actor()
                deaths[task.case.case_id] = deaths.get(task.case.case_id, 0) + 1
                if deaths[task.case.case_id] < MAX_DEATHS:
                    submit(task, slot)  # the case in flight is redone on the new worker
                    continue
                outcome = {"case": task.case.case_id, "status": "failed", "seconds": 0.0,
                           "reason": f"it killed its worker {MAX_DEATHS} times ({one_line(exc, 200)})"}
            except RayTaskError as exc:
                outcome = {"case": task.case.case_id, "status": "failed", "seconds": 0.0, "reason": one_line(exc)}
            free.append(slot)
            fill()
            yield outcome

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
