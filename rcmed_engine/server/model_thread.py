"""The one thread that runs the model. The engine is not thread-safe, so everything that touches it runs
here, one call at a time. A request whose client waits for the answer (a direct segment, a class
registration) goes ahead of queued background jobs, so a cached re-prompt is not stuck behind a whole
volume; within each kind, work runs in the order it came. A running call is never interrupted, so a job
runs in steps (``submit_steps``: a few slices each) and a waiting client waits for one step at most."""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import CancelledError, Future
from typing import Any, Callable

INTERACTIVE = 0
JOB = 1
_STOP = 2  # sorts after all work: a plain shutdown lets what was queued finish


class ModelThread:
    def __init__(self, name: str = "rcmed-model") -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._closed = False
        self._dropped = False  # shut down with cancel_futures: stepped work is not put back
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = JOB, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; INTERACTIVE work runs before any JOB still waiting."""
        return self._put(priority, fn, args, kwargs, steps=False)

    def submit_steps(self, step: Callable[[], bool], priority: int = JOB) -> Future:
        """Queue work done in steps: ``step()`` does one and returns True while more remain. Between two
        steps, INTERACTIVE work that came meanwhile runs first; the work keeps its place ahead of JOB work
        queued after it (jobs still end in the order they came). The future ends with the last step: None,
        or the exception a step raised."""
        return self._put(priority, step, (), {}, steps=True)

    def queued(self) -> int:
        """Work waiting for the thread (not the call running now)."""
        return self._queue.qsize()

    def _put(self, priority: int, fn: Callable[..., Any], args: tuple, kwargs: dict, steps: bool) -> Future:
        if priority not in (INTERACTIVE, JOB):
            raise ValueError(f"priority must be INTERACTIVE or JOB, not {priority!r}")
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the model thread is shut down")
            self._queue.put((priority, next(self._order), future, fn, args, kwargs, steps))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            future, fn, args, kwargs, steps = item[2:]
            if future is None:
                return
            # A stepped item put back is already running; anything else starts here (or was cancelled).
            if not future.running() and not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
                continue
            if steps and result:
                self._put_back(item)
            else:
                future.set_result(None if steps else result)

    def _put_back(self, item: tuple) -> None:
        """Queue the next step under the item's first place: only INTERACTIVE work can overtake it."""
        with self._lock:
            if not self._dropped:
                self._queue.put(item)
                return
        item[2].set_exception(CancelledError("the model thread was shut down between two steps"))

    def shutdown(self, wait: bool = False, cancel_futures: bool = False) -> None:
        """As ThreadPoolExecutor.shutdown: stop taking work; ``cancel_futures`` drops what has not started
        (and the remaining steps of stepped work)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures:
                self._dropped = True
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item[2] is not None and not item[2].cancel():  # a stepped item between two steps
                        item[2].set_exception(CancelledError("the model thread was shut down between two steps"))
            self._queue.put((_STOP, next(self._order), None, None, (), {}, False))
        if wait:
            self._thread.join()
