"""One run per output folder: ``OUT_DIR/.rcmed-batch.lock`` holds the owner's pid and host.

A second run refuses while the owner lives; a lock whose owner on this host is gone is taken over.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .errors import BatchUsageError

LOCK_NAME = ".rcmed-batch.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> "OutputLock":
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            self.held = True
            return self
        raise BatchUsageError(f"cannot take the lock {self.path}")

    def _refuse_or_clear(self) -> None:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            owner = {}
        pid, host = owner.get("pid"), owner.get("host")
        if isinstance(pid, int) and (host != socket.gethostname() or _alive(pid)):
            raise BatchUsageError(f"another rcmed batch (pid {pid} on {host}) is writing to {self.path.parent}; "
                                  f"wait for it, or remove {self.path} if it is gone")
        self.path.unlink(missing_ok=True)  # its owner is gone: a stale lock

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
