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

    def resolved_token(self) -> tuple[str, bool]:
        """(token, generated): --token, then RCMED_TOKEN, then a fresh random one."""
        token = self.token or os.environ.get("RCMED_TOKEN") or ""
        if token.strip():
            return token.strip(), False
        return secrets.token_urlsafe(24), True
