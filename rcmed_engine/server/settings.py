"""What ``rcmed serve`` is told: address, token, registry and every limit."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass


@dataclass
class ServerSettings:
    """What ``rcmed serve`` is told; every limit answers 413 or 422 with a message when crossed."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None              # None: RCMED_TOKEN, else a generated one (printed at start)
    registry: str | None = None           # the class registry folder for one-shot adaptation
    max_upload_bytes: int = 1 << 30       # request body of an upload
    max_voxels: int = 1 << 29             # z * y * x of one image
    max_prompt_chars: int = 500
    max_prompts: int = 16                 # prompts in one request
    cache_bytes: int = 2 << 30            # uploaded images kept in memory (least recently used go first)
    max_active_jobs: int = 32             # queued plus running; more answer 503 with Retry-After
    keep_jobs: int = 16                   # finished jobs (and their results) kept for the client to fetch
    job_ttl_s: float = 600.0
    max_wait_s: float = 30.0              # the longest long poll
    max_request_bytes: int | None = None  # memory one request may cost (body + decoding); None: from the machine
    decode_workers: int = 2               # uploads decoded at once (each within max_request_bytes)
    max_waiting: int = 16                 # requests waiting for a decode slot or the model; more answer 503
    check_memory: bool = True             # rcmed serve refuses to start when its memory bound exceeds the machine
    body_timeout_s: float = 120.0         # a request body must arrive within this, once reading starts; else 408
    job_chunk_slices: int | None = None   # slices a job runs per turn on the model (whole batches); None: one batch

    def request_bytes(self, machine_bytes: int | None = None) -> int:
        """The per-request memory budget: --max-request-mb, else derived from the machine's memory."""
        if self.max_request_bytes is not None:
            return int(self.max_request_bytes)
        from .memory import default_request_bytes, machine_memory_bytes

        return default_request_bytes(machine_memory_bytes() if machine_bytes is None else machine_bytes)

    def resolved_token(self) -> tuple[str, bool]:
        """(token, generated): --token, then RCMED_TOKEN, then a fresh random one."""
        token = self.token or os.environ.get("RCMED_TOKEN") or ""
        if token.strip():
            return token.strip(), False
        return secrets.token_urlsafe(24), True
