"""Uploaded images: an RCMA array frame (rcmed_engine.wire) or a NIfTI/NRRD file, checked against the limits
before it is decoded, then kept in the image cache under its content id."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import wire
from ..geometry import Volume
from .errors import ApiError, one_line

if TYPE_CHECKING:
    from .state import ServerState


def _sniff_file(body: bytes) -> str | None:
    """The suffix of a NIfTI or NRRD file, from its first bytes; None when it is neither."""
    if body[:4] == b"NRRD":
        return ".nrrd"
    if body[:2] == b"\x1f\x8b":
        import zlib

        try:
            head = zlib.decompressobj(wbits=31).decompress(body[:65536], 352)
        except zlib.error:
            return None
        return ".nii.gz" if _is_nifti(head) else None
    return ".nii" if _is_nifti(body[:352]) else None


def _is_nifti(head: bytes) -> bool:
    return len(head) >= 348 and (head[344:347] in (b"n+1", b"ni1", b"n+2") or head[4:8] in (b"n+2\0",))


def _nifti_required_bytes(head: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file needs for its header's voxels (None when the header is unreadable)."""
    import struct

    for e in "<>":
        if len(head) >= 348 and struct.unpack(e + "i", head[:4])[0] == 348:
            dims = struct.unpack(e + "8h", head[40:56])
            bitpix = struct.unpack(e + "h", head[72:74])[0]
            offset = struct.unpack(e + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(e + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(e + "h", head[14:16])[0]
            dims = struct.unpack(e + "8q", head[16:80])
            offset = struct.unpack(e + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or not math.isfinite(offset) or bitpix <= 0:
        return None
    return int(offset) + math.prod(max(1, int(d)) for d in dims[1:dims[0] + 1]) * bitpix // 8


def _check_nifti_complete(body: bytes, suffix: str) -> None:
    """ITK reads a NIfTI file cut short without complaint (the missing voxels come back as garbage);
    refuse it here: the gzip stream must end properly and hold every voxel the header announces."""
    import zlib

    if suffix == ".nii.gz":
        d = zlib.decompressobj(wbits=31)
        head, total, data = b"", 0, body
        try:
            while data and not d.eof:
                out = d.decompress(data, 1 << 24)
                if len(head) < 540:
                    head += out[:540 - len(head)]
                total += len(out)
                data = d.unconsumed_tail
            while not d.eof:  # output still buffered inside
                out = d.decompress(b"", 1 << 24)
                if not out:
                    break
                total += len(out)
        except zlib.error:
            raise ApiError(400, "the uploaded .nii.gz file is corrupt") from None
        if not d.eof:
            raise ApiError(400, "the uploaded .nii.gz file is truncated (its gzip stream ends early)")
    else:
        head, total = body[:540], len(body)
    need = _nifti_required_bytes(head)
    if need is None:
        raise ApiError(400, f"the uploaded {suffix} file has an unreadable NIfTI header")
    if total < need:
        raise ApiError(400, f"the uploaded {suffix} file is truncated: its header announces {need} bytes, "
                            f"it holds {total}")


def ingest(state: "ServerState", body: bytes) -> tuple[dict[str, Any], bool]:
    """Decode an uploaded body into the image cache; returns (image description, created)."""
    s = state.settings
    if body[:4] == wire.MAGIC:
        header = wire.peek_header(body)
        if header["voxels"] > s.max_voxels:
            raise ApiError(413, f"the image has {header['voxels']} voxels; this server's limit is {s.max_voxels}")
        if header["nbytes"] > s.cache_bytes:
            raise ApiError(413, f"the image takes {header['nbytes']} bytes, more than this server's image cache "
                                f"({s.cache_bytes} bytes)")
        if header["id"] is not None:
            cached = state.images.get(header["id"])
            if cached is not None:  # the same content again: nothing to decode
                return describe(header["id"], cached, existed=True), False
        ident, volume = wire.decode_volume(body, header)
    else:
        suffix = _sniff_file(body)
        if suffix is None:
            raise ApiError(400, "the body is neither an RCMA array frame (see rcmed_engine.wire) nor a NIfTI "
                                "or NRRD file")
        ident, volume = _read_file(state, body, suffix)
    created = state.images.put(ident, volume)
    return describe(ident, volume, existed=not created), created


def _read_file(state: "ServerState", body: bytes, suffix: str) -> tuple[str, Volume]:
    import SimpleITK as sitk

    from ..io import read_image

    if suffix.startswith(".nii"):
        _check_nifti_complete(body, suffix)
    with tempfile.TemporaryDirectory(prefix="rcmed-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(body)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise ApiError(400, f"the uploaded {suffix} file is corrupt or truncated") from None
        voxels = math.prod(reader.GetSize()[:3])
        if voxels > state.settings.max_voxels:
            raise ApiError(413, f"the image has {voxels} voxels; this server's limit is {state.settings.max_voxels}")
        try:
            volume = read_image(path)
        except (ValueError, RuntimeError) as exc:
            raise ApiError(400, one_line(str(exc).replace(str(path), f"the uploaded {suffix} file"))) from None
    volume.meta.pop("source", None)
    array, geometry, meta = wire.as_wire_volume(volume)
    return wire.image_id(array, geometry, meta), Volume(array, geometry, meta)


def describe(ident: str, volume: Volume, existed: bool = False) -> dict[str, Any]:
    return {"id": ident, "shape": list(volume.array.shape), "dtype": volume.array.dtype.str,
            "geometry": wire.geometry_to_json(volume.geometry), "meta": dict(volume.meta), "existed": existed}

