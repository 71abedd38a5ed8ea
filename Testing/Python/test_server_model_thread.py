"""The model thread: one call at a time; a waiting client's request goes ahead of queued jobs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

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


def test_a_click_waits_for_one_step_of_a_job_not_the_whole_job():
    """A job submitted in steps lets waiting clients in between two steps; it keeps its place before the jobs
    that came after it, and ends (its future) with its last step."""
    thread = ModelThread("test-model")
    gate = threading.Event()
    ran: list[str] = []
    steps = iter(["job A 1", "job A 2", "job A 3"])

    def step() -> bool:
        name = next(steps)
        if name == "job A 1":
            gate.wait(10)  # clients and another job arrive while the first step runs
        ran.append(name)
        return name != "job A 3"

    try:
        job_a = thread.submit_steps(step)
        while not job_a.running():
            time.sleep(0.01)
        job_b = thread.submit(ran.append, "job B")
        click = thread.submit(ran.append, "click", priority=INTERACTIVE)
        gate.set()
        for f in (job_a, job_b, click):
            f.result(timeout=10)
        assert ran == ["job A 1", "click", "job A 2", "job A 3", "job B"]
        assert job_a.result() is None
    finally:
        thread.shutdown(wait=True)


def test_a_failing_step_ends_the_stepped_work_and_shutdown_drops_the_rest():
    thread = ModelThread("test-model")
    try:
        calls = []

        def failing() -> bool:
            calls.append(1)
            if len(calls) == 2:
                raise KeyError("second step")
            return True

        with pytest.raises(KeyError, match="second step"):
            thread.submit_steps(failing).result(timeout=10)
        assert len(calls) == 2  # no third step
    finally:
        thread.shutdown(wait=True)
    # Shut down with cancel_futures between two steps: the remaining steps never run.
    other = ModelThread("test-model")
    gate = threading.Event()
    count = []

    def endless() -> bool:
        count.append(1)
        gate.wait(10)
        return True

    stepped = other.submit_steps(endless)
    while not stepped.running():
        time.sleep(0.01)
    other.shutdown(wait=False, cancel_futures=True)
    gate.set()
    with pytest.raises(CancelledError):
        stepped.result(timeout=10)
    assert len(count) == 1
