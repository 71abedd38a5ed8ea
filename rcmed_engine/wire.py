"""The remote engine's wire format (HTTP API v1): arrays, image ids, geometry and masks.

Everything a client needs to talk to ``rcmed serve`` without this package is written here; the
server (``rcmed_engine.server``) and the client (``rcmed_engine.client``) both use these functions,
so the two sides cannot drift apart.

1. Array frames (the body of ``POST /v1/images``, ``Content-Type: application/octet-stream``)
   ::

       offset  size  content
       0       4     magic b"RCMA"
       4       1     frame version, 1
       5       4     H, the header's length in bytes (uint32, little-endian)
       9       H     header: a UTF-8 JSON object (below)
       9 + H   ...   payload: the array's C-order bytes, compressed with header["codec"]

   Header keys:

   - ``dtype``: numpy type string, little-endian or byte-free: ``|b1 |u1 |i1 <u2 <i2 <u4 <i4 <u8 <i8
     <f2 <f4 <f8``. Big-endian and any other type are refused.
   - ``shape``: ``[z, y, x]`` (grey) or ``[z, y, x, 3]`` (RGB, uint8 only); a 2D image is z = 1.
   - ``codec``: ``"zstd"`` (a zstd frame with its content size), ``"gzip"`` (RFC 1952) or ``"none"``.
   - ``geometry``: see 3. Optional; the identity geometry with unit spacing when absent.
   - ``meta``: optional ``{str: str}``, at most 16 keys; the engine reads the modality from
     ``modality``, ``Modality`` or ``0008|0060`` (a DICOM Modality code).
   - ``id``: optional; the image id the sender computed. When given, the receiver refuses a frame
     whose decoded content has another id (a corrupted or truncated upload).

   The payload must decompress to exactly ``prod(shape) * itemsize`` bytes, and no more is read
   (a compression bomb stops at that size).

2. Image ids: the lowercase hex SHA-256 of ``b"rcmed-image-v1\\0"``, then the canonical JSON
   (sorted keys, no spaces) of ``{"dtype", "shape", "geometry", "meta"}``, then ``b"\\0"``, then the
   raw array bytes. An image is named by its content: the same voxels, geometry and modality give
   the same id wherever they are hashed, so a client can ask ``HEAD /v1/images/{id}`` and skip an
   upload the server already holds.

3. Geometry JSON: ``{"origin": [3], "spacing": [3], "direction": [9]}`` in LPS millimetres, the
   direction row-major with column k the direction of index axis k (``rcmed_engine.geometry``).
   Numbers travel as JSON doubles, which round-trip Python floats exactly.

4. Label maps (segment results, and the support mask of ``POST /v1/classes``)::

       {"shape": [z, y, x],
        "masks": [{"label": 1, "bbox": [z0, z1, y0, y1, x0, x1], "codec": "zstd", "data": "<base64>"}]}

   One entry per label value present (1..255); an empty label map has no entries. ``bbox`` is
   half-open, in voxels of ``shape``. ``data`` is the base64 of the codec-compressed
   ``numpy.packbits(mask[z0:z1, y0:y1, x0:x1].ravel(), bitorder="little")``: the label's voxels
   inside its bounding box, one bit each. Decoding paints each label into its box. Round trips
   are exact.

5. Small arrays inside JSON (presence scores, with NaN for slices not processed)::

       {"dtype": "<f4", "shape": [T, n], "codec": "zstd", "data": "<base64>"}

   the same rules as 1, carried as base64: bit-exact, NaN included.

6. Clicks and boxes (the body of ``POST /v1/images/{id}/refine``; docs/remote.md has the whole body)::

       {"ras": [R, A, S], "label": "include" | "exclude", "target": str | null}
       {"corners_ras": [[R, A, S], [R, A, S]], "target": str | null}

   RAS millimetres (patient space as Slicer's markups hold it; LPS with the first two signs flipped),
   as ``rcmed_engine.clicks.Click.to_json`` and ``Box.to_json`` write them. The earlier result to
   correct travels as a label map (4) with its geometry (3).

Errors are JSON ``{"error": "one clear line"}`` with a 4xx status (5xx only for the server's own
failures, never with a stack trace).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
import struct
import zlib
from typing import Any, Mapping

import numpy as np

from .geometry import Geometry, Volume
from .results import IDENTITY_GEOMETRY  # one definition, shared with the engines

__all__ = [
    "WireError",
    "CODECS",
    "DTYPES",
    "IDENTITY_GEOMETRY",
    "MAGIC",
    "compress",
    "decompress",
    "geometry_to_json",
    "geometry_from_json",
    "image_id",
    "wire_meta",
    "as_wire_volume",
    "encode_frame",
    "encode_volume",
    "decode_volume",
    "peek_header",
    "encode_array",
    "decode_array",
    "encode_labels",
    "decode_labels",
]

MAGIC = b"RCMA"
VERSION = 1
CODECS = ("zstd", "gzip", "none")
DTYPES = ("|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8")
META_KEYS = ("modality", "Modality", "0008|0060", "dicom_modality")
MAX_META = 16
MAX_HEADER = 1 << 16
_PREFIX = b"rcmed-image-v1\0"


class WireError(ValueError):
    """Bytes or JSON that do not follow the wire format; the message says what is wrong."""


# ----------------------------------------------------------------------------------------- codecs
def compress(data: bytes | memoryview, codec: str = "zstd", level: int = 3) -> bytes:
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    if codec == "gzip":
        return gzip.compress(bytes(data), compresslevel=max(1, min(level, 9)), mtime=0)
    if codec == "none":
        return bytes(data)
    raise WireError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def decompress(data: bytes | memoryview, codec: str, size: int) -> bytes:
    """Decompress to exactly ``size`` bytes; a short, long or corrupt stream is a WireError."""
    if codec == "none":
        out = bytes(data)
    elif codec == "zstd":
        import zstandard

        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError:
            raise WireError("the payload is not a zstd frame (truncated or corrupt)") from None
        if params.content_size not in (size, zstandard.CONTENTSIZE_UNKNOWN):
            raise WireError(f"the zstd frame holds {params.content_size} bytes; the header says {size}")
        try:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size) if size else b""
        except zstandard.ZstdError as exc:
            raise WireError(f"the zstd payload is corrupt or truncated ({exc})") from None
    elif codec == "gzip":
        dobj = zlib.decompressobj(wbits=31)
        try:
            out = dobj.decompress(bytes(data), size + 1)
        except zlib.error as exc:
            raise WireError(f"the gzip payload is corrupt ({exc})") from None
        if len(out) <= size and not dobj.eof:
            raise WireError("the gzip payload is truncated")
    else:
        raise WireError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    if len(out) != size:
        raise WireError(f"the payload holds {len(out)} bytes after decompression; the header says {size}")
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise WireError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise WireError(f"{what} is not valid base64") from None


# ----------------------------------------------------------------------------------------- geometry
def geometry_to_json(g: Geometry) -> dict[str, list[float]]:
    return {"origin": list(g.origin), "spacing": list(g.spacing), "direction": list(g.direction)}


def geometry_from_json(data: Any) -> Geometry:
    if not isinstance(data, Mapping):
        raise WireError("geometry must be an object with origin, spacing and direction")
    missing = [k for k in ("origin", "spacing", "direction") if k not in data]
    if missing:
        raise WireError(f"geometry lacks {', '.join(missing)}")
    for key, n in (("origin", 3), ("spacing", 3), ("direction", 9)):
        v = data[key]
        if not isinstance(v, list) or len(v) != n or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise WireError(f"geometry {key} must be a list of {n} numbers")
    try:
        return Geometry(tuple(data["origin"]), tuple(data["spacing"]), tuple(data["direction"]))
    except (ValueError, OverflowError) as exc:
        raise WireError(str(exc)) from None


# ----------------------------------------------------------------------------------------- dtypes, meta, ids
def _check_dtype(text: Any) -> np.dtype:
    if not isinstance(text, str) or text not in DTYPES:
        raise WireError(f"unsupported dtype {text!r}; send one of {' '.join(DTYPES)} (little-endian)")
    return np.dtype(text)


def wire_dtype(dtype: np.dtype) -> np.dtype:
    """The little-endian dtype the wire carries for ``dtype`` (WireError when it has none)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">" or (dt.byteorder == "=" and not np.little_endian):
        dt = dt.newbyteorder("<")
    return _check_dtype(dt.str)


def _check_shape(shape: Any, dtype: np.dtype) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise WireError("shape must be a list of whole numbers")
    if len(shape) not in (3, 4):
        raise WireError(f"shape must be [z, y, x] or [z, y, x, 3], got {shape}")
    if len(shape) == 4 and (shape[3] != 3 or dtype != np.uint8):
        raise WireError(f"a 4D shape is an RGB image: [z, y, x, 3] with dtype |u1, got {shape} {dtype.str}")
    if min(shape) < 1:
        raise WireError(f"shape {shape} is empty")
    if max(shape) > 1 << 24:
        raise WireError(f"shape {shape} is too large")
    return tuple(shape)


def wire_meta(meta: Mapping[str, Any] | None) -> dict[str, str]:
    """The part of a Volume's meta that travels (and is hashed): the modality keys, as strings."""
    if not meta:
        return {}
    return {k: str(meta[k]) for k in META_KEYS if isinstance(meta.get(k), str) and meta[k].strip()}


def _check_meta(meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or len(meta) > MAX_META or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256 for k, v in meta.items()):
        raise WireError(f"meta must be an object of at most {MAX_META} short strings")
    return dict(meta)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def image_id(array: np.ndarray, geometry: Geometry, meta: Mapping[str, str] | None = None) -> str:
    """The content id of an image (section 2); ``array`` must already have a wire dtype."""
    array = np.ascontiguousarray(array)
    desc = {"dtype": array.dtype.str, "shape": list(array.shape), "geometry": geometry_to_json(geometry),
            "meta": dict(meta or {})}
    h = hashlib.sha256(_PREFIX)
    h.update(_canonical(desc))
    h.update(b"\0")
    h.update(array.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def as_wire_volume(volume: Volume) -> tuple[np.ndarray, Geometry, dict[str, str]]:
    """The array (little-endian, C order), geometry and meta that represent ``volume`` on the wire."""
    array = volume.array
    dt = wire_dtype(array.dtype)
    array = np.ascontiguousarray(array, dtype=dt)
    _check_shape(list(array.shape), dt)
    return array, volume.geometry, wire_meta(volume.meta)


# ----------------------------------------------------------------------------------------- frames
def encode_frame(array: np.ndarray, geometry: Geometry, meta: Mapping[str, str], ident: str | None = None,
                 codec: str = "zstd", level: int = 1) -> bytes:
    """An array frame (section 1) for a wire array (see ``as_wire_volume``)."""
    header: dict[str, Any] = {"dtype": array.dtype.str, "shape": list(array.shape), "codec": codec,
                              "geometry": geometry_to_json(geometry), "meta": dict(meta)}
    if ident is not None:
        header["id"] = ident
    head = json.dumps(header, separators=(",", ":")).encode()
    payload = compress(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data, codec, level)
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(head)) + head + payload


def encode_volume(volume: Volume, codec: str = "zstd", level: int = 1) -> tuple[str, bytes]:
    """A Volume as an array frame (section 1); returns ``(image_id, frame_bytes)``."""
    array, geometry, meta = as_wire_volume(volume)
    ident = image_id(array, geometry, meta)
    return ident, encode_frame(array, geometry, meta, ident, codec, level)


def peek_header(frame: bytes | memoryview) -> dict[str, Any]:
    """The validated header of an array frame (no payload work): dtype, shape, codec, geometry, meta."""
    if len(frame) < 9 or bytes(frame[:4]) != MAGIC:
        raise WireError("not an RCMA array frame (bad magic); see rcmed_engine.wire for the format")
    if frame[4] != VERSION:
        raise WireError(f"array frame version {frame[4]} is not supported; this server reads version {VERSION}")
    (hlen,) = struct.unpack("<I", bytes(frame[5:9]))
    if hlen > MAX_HEADER or 9 + hlen > len(frame):
        raise WireError("the array frame's header is truncated or too long")
    try:
        header = json.loads(bytes(frame[9:9 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WireError("the array frame's header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise WireError("the array frame's header must be a JSON object")
    dtype = _check_dtype(header.get("dtype"))
    shape = _check_shape(header.get("shape"), dtype)
    codec = header.get("codec", "zstd")
    if codec not in CODECS:
        raise WireError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    geometry = IDENTITY_GEOMETRY if header.get("geometry") is None else geometry_from_json(header["geometry"])
    expected = header.get("id")
    if expected is not None and (not isinstance(expected, str) or len(expected) != 64):
        raise WireError("header id must be a 64-character hex string")
    return {"dtype": dtype, "shape": shape, "codec": codec, "geometry": geometry,
            "meta": _check_meta(header.get("meta")), "id": expected, "offset": 9 + hlen,
            "voxels": math.prod(shape[:3]), "nbytes": math.prod(shape) * dtype.itemsize}


def decode_volume(frame: bytes | memoryview, header: dict[str, Any] | None = None) -> tuple[str, Volume]:
    """An array frame back to ``(image_id, Volume)``; WireError for anything malformed."""
    h = header or peek_header(frame)
    raw = decompress(memoryview(frame)[h["offset"]:], h["codec"], h["nbytes"])
    array = np.frombuffer(raw, dtype=h["dtype"]).reshape(h["shape"])
    ident = image_id(array, h["geometry"], h["meta"])
    if h["id"] is not None and h["id"] != ident:
        raise WireError("the decoded image does not match the id in its header (corrupted upload)")
    return ident, Volume(array, h["geometry"], dict(h["meta"]))


# ----------------------------------------------------------------------------------------- small arrays
def encode_array(array: np.ndarray, codec: str = "zstd") -> dict[str, Any]:
    a = np.ascontiguousarray(array, dtype=wire_dtype(array.dtype))
    return {"dtype": a.dtype.str, "shape": list(a.shape), "codec": codec,
            "data": _b64(compress(a.reshape(-1).view(np.uint8).data, codec))}


def decode_array(data: Any, max_bytes: int = 1 << 28) -> np.ndarray:
    if not isinstance(data, Mapping):
        raise WireError("an array must be an object with dtype, shape, codec and data")
    dtype = _check_dtype(data.get("dtype"))
    shape = data.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise WireError("array shape must be a list of whole numbers")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise WireError(f"array of {nbytes} bytes is over the limit of {max_bytes}")
    raw = decompress(_unb64(data.get("data"), "array data"), data.get("codec", "zstd"), nbytes)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


# ----------------------------------------------------------------------------------------- label maps
def _bbox(mask: np.ndarray) -> list[int]:
    """Half-open [z0, z1, y0, y1, x0, x1] of a non-empty (z, y, x) mask, in two passes over it."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    plane = mask[zs[0]:zs[-1] + 1].any(axis=0)
    ys = np.flatnonzero(plane.any(axis=1))
    xs = np.flatnonzero(plane.any(axis=0))
    return [int(zs[0]), int(zs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1]


def encode_labels(labels: np.ndarray, codec: str = "zstd") -> dict[str, Any]:
    """A uint8 (z, y, x) label map as bit-packed, bbox-cropped, compressed masks (section 4)."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype != np.uint8:
        raise WireError(f"a label map must be uint8 (z, y, x), got {labels.dtype} {labels.shape}")
    masks = []
    for value in range(1, int(labels.max(initial=0)) + 1):
        mask = labels == value
        if not mask.any():
            continue
        z0, z1, y0, y1, x0, x1 = box = _bbox(mask)
        bits = np.packbits(mask[z0:z1, y0:y1, x0:x1], axis=None, bitorder="little")
        masks.append({"label": int(value), "bbox": box, "codec": codec, "data": _b64(compress(bits.data, codec))})
    return {"shape": list(labels.shape), "masks": masks}


def decode_labels(data: Any, max_voxels: int = 1 << 31) -> np.ndarray:
    """Section 4 back to a uint8 (z, y, x) label map; WireError for anything malformed."""
    if not isinstance(data, Mapping):
        raise WireError("a label map must be an object with shape and masks")
    shape = data.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise WireError("label map shape must be [z, y, x] with positive sizes")
    if math.prod(shape) > max_voxels:
        raise WireError(f"label map of {math.prod(shape)} voxels is over the limit of {max_voxels}")
    masks = data.get("masks")
    if not isinstance(masks, list) or len(masks) > 255:
        raise WireError("label map masks must be a list of at most 255 entries")
    labels = np.zeros(shape, dtype=np.uint8)
    for m in masks:
        if not isinstance(m, Mapping):
            raise WireError("each mask must be an object with label, bbox, codec and data")
        value, box = m.get("label"), m.get("bbox")
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
            raise WireError("mask label must be a whole number from 1 to 255")
        if not isinstance(box, list) or len(box) != 6 or not all(
                isinstance(n, int) and not isinstance(n, bool) for n in box):
            raise WireError("mask bbox must be [z0, z1, y0, y1, x0, x1]")
        if not all(0 <= box[2 * a] < box[2 * a + 1] <= shape[a] for a in range(3)):
            raise WireError(f"mask bbox {box} lies outside the shape {shape}")
        size = (box[1] - box[0]) * (box[3] - box[2]) * (box[5] - box[4])
        packed = decompress(_unb64(m.get("data"), "mask data"), m.get("codec", "zstd"), (size + 7) // 8)
        bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=size, bitorder="little")
        region = labels[box[0]:box[1], box[2]:box[3], box[4]:box[5]]
        np.copyto(region, np.uint8(value), where=bits.reshape(region.shape).view(bool))
    return labels
