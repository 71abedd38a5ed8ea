"""Long work off the main thread, with progress and cancel, polled from the GUI thread.

The Slicer layer never touches Slicer objects from the worker: it copies what the job needs (a numpy array,
a geometry, a spec) on the main thread, starts a ``Job``, polls it with a QTimer, and writes the result into
the scene on the main thread when the job is done. Qt signals are not emitted across threads, so nothing
here depends on Qt.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"


class CancelFlag:
    """What the engine's ``cancel=`` takes: an object with ``is_set()``."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass
class JobStatus:
    state: str
    done: int
    total: int
    message: str
    elapsed_s: float

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total > 0 else 0


def is_cancellation(exc: BaseException) -> bool:
    """The engine raises ``rcmed_engine.engine.Cancelled``; recognise it without importing the engine."""
    return type(exc).__name__ == "Cancelled" or isinstance(exc, KeyboardInterrupt)


class Job:
    """Runs ``work(progress, cancel)`` in a daemon thread.

    ``progress(done, total)`` and ``message(text)`` may be called from the worker; ``status()``, ``result``
    and ``error`` are read from the main thread. A job is finished once; a cancelled job has no result.
    """

    def __init__(self, work: Callable[[Callable[[int, int], None], CancelFlag], Any], name: str = "RCMed") -> None:
        self._work = work
        self.name = name
        self.cancel_flag = CancelFlag()
        self._lock = threading.Lock()
        self._state = PENDING
        self._done = 0
        self._total = 0
        self._message = ""
        self._t0 = 0.0
        self._t1: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_traceback = ""
        self._thread: threading.Thread | None = None

    # -- worker side
    def progress(self, done: int, total: int) -> None:
        with self._lock:
            self._done, self._total = int(done), int(total)

    def message(self, text: str) -> None:
        with self._lock:
            self._message = str(text)

    def _run(self) -> None:
        try:
            result = self._work(self.progress, self.cancel_flag)
        except BaseException as exc:  # reported to the main thread, never raised in the worker
            with self._lock:
                self.error = exc
                self.error_traceback = traceback.format_exc()
                self._state = CANCELLED if (self.cancel_flag.is_set() or is_cancellation(exc)) else FAILED
                self._t1 = time.perf_counter()
            return
        with self._lock:
            if self.cancel_flag.is_set():
                self._state = CANCELLED  # finished anyway, but the user asked not to use it
            else:
                self.result = result
                self._state = DONE
            self._t1 = time.perf_counter()

    # -- main-thread side
    def start(self) -> "Job":
        if self._thread is not None:
            raise RuntimeError("a job starts once")
        self._t0 = time.perf_counter()
        self._state = RUNNING
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_flag.set()
        with self._lock:
            if self._state == RUNNING:
                self._message = "cancelling..."

    def status(self) -> JobStatus:
        with self._lock:
            end = self._t1 if self._t1 is not None else time.perf_counter()
            return JobStatus(self._state, self._done, self._total, self._message,
                             (end - self._t0) if self._t0 else 0.0)

    def wait(self, timeout: float | None = None) -> JobStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()


def progress_text(status: JobStatus) -> str:
    if status.state == RUNNING:
        if status.message == "cancelling...":
            return f"cancelling... ({status.elapsed_s:.0f} s)"
        if status.total:  # the engine reports slices once the model is loaded
            return f"segmenting: {status.done}/{status.total} slices ({status.elapsed_s:.0f} s)"
        return f"{status.message or 'starting'} ({status.elapsed_s:.0f} s)"
    if status.state == DONE:
        return f"done in {status.elapsed_s:.1f} s"
    if status.state == CANCELLED:
        return "cancelled; nothing was changed"
    if status.state == FAILED:
        return "failed"
    return ""
