"""``--server URL[,URL...]``: cases fanned out over running ``rcmed serve`` engines, one case at a time per
server (a thread each, with its RemoteEngine). Scans are read and outputs written here; the servers only
segment. A server that stops answering fails its case with the reason; the others go on."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator

from .errors import BatchUsageError, one_line
from .executors import model_identity, model_key
from .work import Task, process

_DONE = object()


class ServerExecutor:
    def __init__(self, urls: list[str], token: str | None = None, connect_timeout: float = 15.0) -> None:
        from ..client import RemoteEngine

        if not urls:
            raise BatchUsageError("--server: give at least one URL")
        self.engines = []
        for url in urls:
            engine = RemoteEngine(url, token=token, connect_timeout=connect_timeout)
            try:
                engine.info()  # a wrong URL or token fails now, in one line
            except Exception as exc:
                raise BatchUsageError(f"server {url}: {one_line(exc)}") from None
            self.engines.append(engine)

    def model(self) -> dict[str, Any]:
        infos = [e.info() for e in self.engines]
        keys = {model_key(model_identity(i)) for i in infos}
        if len(keys) != 1:
            raise BatchUsageError(f"the servers run different models ({', '.join(sorted(keys))})")
        return model_identity(infos[0])

    def run(self, tasks: Iterable[Task]) -> Iterator[dict[str, Any]]:
        todo: queue.Queue = queue.Queue(maxsize=len(self.engines))  # back-pressure: one waiting case per server
        done: queue.Queue = queue.Queue()

        def serve(engine) -> None:
            while (task := todo.get()) is not _DONE:
                done.put(process(engine, task))
            done.put(_DONE)

        threads = [threading.Thread(target=serve, args=(e,), daemon=True) for e in self.engines]
        for t in threads:
            t.start()

        def feed() -> None:
            for task in tasks:
                todo.put(task)
            for _ in threads:
                todo.put(_DONE)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        finished = 0
        while finished < len(threads):
            item = done.get()
            if item is _DONE:
                finished += 1
            else:
                yield item

    def close(self) -> None:
        for e in self.engines:
            e.close()
