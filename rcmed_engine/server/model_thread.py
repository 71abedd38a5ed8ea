"""The one thread that runs the model. The engine is not thread-safe, so everything that touches it runs
here, one call at a time. A request whose client waits for the answer (a direct segment, a class
registration) goes ahead of queued background jobs, so a cached re-prompt is not stuck behind a whole
volume; within each kind, work runs in the order it came. A running call is never interrupted."""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

INTERACTIVE = 0
JOB = 1
_STOP = 2  # sorts after all work: a plain shutdown lets what was queued finish


class ModelThread:
    def __init__(self, name: str = "rcmed-model") -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = JOB, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; INTERACTIVE work runs before any JOB still waiting."""
        if priority not in (INTERACTIVE, JOB):
            raise ValueError(f"priority must be INTERACTIVE or JOB, not {priority!r}")
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the model thread is shut down")
            self._queue.put((priority, next(self._order), future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn, args, kwargs = self._queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self, wait: bool = False, cancel_futures: bool = False) -> None:
        """As ThreadPoolExecutor.shutdown: stop taking work; ``cancel_futures`` drops what has not started."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item[2] is not None:
                        item[2].cancel()
            self._queue.put((_STOP, next(self._order), None, None, (), {}))
        if wait:
            self._thread.join()
