"""Uploaded images by content id, bounded in bytes (the least recently used go first)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..geometry import Volume
from .errors import ApiError


class ImageCache:
    """Uploaded images by id, bounded in bytes; the least recently used go first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Volume] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.peak_bytes = 0
        self.evictions = 0

    def get(self, key: str) -> Volume | None:
        with self._lock:
            vol = self._items.get(key)
            if vol is not None:
                self._items.move_to_end(key)
            return vol

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, volume: Volume) -> bool:
        """Store; False when it was already there. Raises ApiError 413 when it can never fit."""
        size = int(volume.array.nbytes)
        if size > self.max_bytes:
            raise ApiError(413, f"the image takes {size} bytes, more than this server's image cache "
                                f"({self.max_bytes} bytes); ask its operator to raise --cache-mb")
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return False
            while self._items and self.nbytes + size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= int(old.array.nbytes)
                self.evictions += 1
            self._items[key] = volume
            self.nbytes += size
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
            return True

    def remove(self, key: str) -> bool:
        with self._lock:
            vol = self._items.pop(key, None)
            if vol is None:
                return False
            self.nbytes -= int(vol.array.nbytes)
            return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"images": len(self._items), "bytes": self.nbytes, "cap_bytes": self.max_bytes,
                    "peak_bytes": self.peak_bytes, "evictions": self.evictions}
