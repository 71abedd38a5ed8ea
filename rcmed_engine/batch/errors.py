"""The batch's own user-facing error (one line, non-zero exit), and how any exception becomes one line."""

from __future__ import annotations


class BatchUsageError(ValueError):
    """Bad arguments, input or output folder: the run does not start."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
