"""The model thread: one call at a time; a waiting client's request goes ahead of queued jobs."""

from __future__ import annotations

import threading
import time

import pytest

from rcmed_engine.server.model_thread import INTERACTIVE, JOB, ModelThread


def test_interactive_work_goes_ahead_of_queued_jobs_in_order():
    thread = ModelThread("test-model")
    gate = threading.Event()
    ran: list[str] = []
    try:
        first = thread.submit(gate.wait, 10)  # running: never interrupted
        time.sleep(0.05)
        futures = [thread.submit(ran.append, "job 1"), thread.submit(ran.append, "job 2"),
                   thread.submit(ran.append, "click 1", priority=INTERACTIVE),
                   thread.submit(ran.append, "click 2", priority=INTERACTIVE)]
        gate.set()
        for f in futures:
            f.result(timeout=10)
        assert first.result() is True
        assert ran == ["click 1", "click 2", "job 1", "job 2"]
    finally:
        thread.shutdown(wait=True)


def test_errors_reach_the_caller_and_the_thread_goes_on():
    thread = ModelThread("test-model")
    try:
        with pytest.raises(ZeroDivisionError):
            thread.submit(lambda: 1 / 0).result(timeout=10)
        assert thread.submit(lambda: 7, priority=INTERACTIVE).result(timeout=10) == 7
        with pytest.raises(ValueError, match="priority"):
            thread.submit(print, priority=5)
    finally:
        thread.shutdown(wait=True)


def test_shutdown_cancels_what_has_not_started_and_refuses_more():
    thread = ModelThread("test-model")
    gate = threading.Event()
    running = thread.submit(gate.wait, 10)
    time.sleep(0.05)
    queued = thread.submit(time.sleep, 0)
    thread.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        thread.submit(time.sleep, 0)
    gate.set()
    assert running.result(timeout=10) is True
    # A plain shutdown lets queued work finish first.
    other = ModelThread("test-model")
    done = [other.submit(time.sleep, 0.01, priority=JOB) for _ in range(3)]
    other.shutdown(wait=True)
    assert all(f.done() and not f.cancelled() for f in done)
