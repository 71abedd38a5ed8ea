"""A job's slice range as a run of short engine calls, so the model thread can answer waiting clients between
them (ModelThread.submit_steps). The calls give exactly what one call over the whole range gives: the engine
takes the intensity window and the slice frame from the whole volume whatever the range, each chunk starts
on a batch boundary of the whole range (the same slices share a batch), and the results are joined slice
by slice."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from ..geometry import SliceFrame, Volume, to_slices

DEFAULT_BATCH = 8  # an engine that does not say its batch size


def chunk_slices(engine: Any, wanted: int | None = None) -> int:
    """Slices per step: ``wanted`` (default one engine batch) rounded up to whole batches."""
    batch = getattr(engine, "batch_size", None)
    batch = batch if isinstance(batch, int) and batch > 0 else DEFAULT_BATCH
    wanted = batch if wanted is None else max(1, int(wanted))
    return -(-wanted // batch) * batch


def segment_in_chunks(segment: Callable[..., list], volume: Volume, axis: str, span: tuple[int, int], chunk: int,
                      progress: Callable[[int, int], None], cancel: Any) -> Iterator[None]:
    """Generator: ``segment(slices=(a, b), progress=..., cancel=...)`` for each chunk of ``span``, yielding
    after each but the last; returns the results of one call over ``span``. Progress counts over the span."""
    from ..engine import Cancelled

    lo, hi = span
    results: list | None = None
    for a in range(lo, hi, chunk):
        b = min(a + chunk, hi)
        if results is not None:
            yield  # between two chunks: a waiting client's request runs here
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled; nothing was written")

        def report(done: int, total: int, a: int = a) -> None:
            if done or a == lo:  # each call starts at 0: only the first start is news
                progress(a - lo + done, hi - lo)

        part = segment(slices=(a, b), progress=report, cancel=cancel)
        if results is None:
            results = [_own(r) for r in part]
        else:
            frame = volume.slice_frame(axis)
            results = [join(r, p, frame, a, b) for r, p in zip(results, part)]
    return results


def _own(result: Any) -> Any:
    """The first chunk's result, with arrays the later chunks can be written into."""
    for name in ("labels", "presence"):
        array = getattr(result, name)
        if not array.flags.writeable:
            setattr(result, name, array.copy())
    return result


def join(into: Any, part: Any, frame: SliceFrame, a: int, b: int) -> Any:
    """Add slices a..b of ``part`` (a SegmentResult) to ``into``: its labels, presence, range and timings."""
    # Only the chunk's own slab is copied (a view through the slice frame), not the whole label map.
    to_slices(into.labels, frame)[a:b] = to_slices(part.labels, frame)[a:b]
    into.presence[:, a:b] = part.presence[:, a:b]
    into.slices = (into.slices[0], b)
    # Every timing adds up over the chunks: seconds spent, and "slices" to the range's length.
    into.timings = {k: float(into.timings.get(k, 0.0)) + float(v) for k, v in part.timings.items()}
    return into
