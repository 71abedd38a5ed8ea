"""Uploaded images: an RCMA array frame (rcmed_engine.wire) or a NIfTI/NRRD file, checked against the limits
before it is decoded, then kept in the image cache under its content id."""

from __future__ import annotations

import math
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import wire
from ..geometry import Volume
from .errors import ApiError, one_line
from .headers import ImageHeader, gunzip_head, nifti_header, nrrd_header
from .memory import FILE_COPIES

if TYPE_CHECKING:
    from .state import ServerState


def _sniff_file(body: bytes) -> str | None:
    """The suffix of a NIfTI or NRRD file, from its first bytes; None when it is neither."""
    if body[:4] == b"NRRD":
        return ".nrrd"
    if body[:2] == b"\x1f\x8b":
        return ".nii.gz" if _is_nifti(gunzip_head(body, 540)) else None
    return ".nii" if _is_nifti(body[:540]) else None


def _is_nifti(head: bytes) -> bool:
    return len(head) >= 348 and (head[344:347] in (b"n+1", b"ni1", b"n+2") or head[4:8] in (b"n+2\0",))


def file_header(body: bytes, suffix: str) -> ImageHeader:
    """The header of an uploaded NIfTI/NRRD file (gz: only its first bytes are inflated); 400 if unreadable."""
    if suffix == ".nrrd":
        return nrrd_header(body)
    header = nifti_header(gunzip_head(body, 540) if suffix == ".nii.gz" else body[:540])
    if header is None:
        raise ApiError(400, f"the uploaded {suffix} file has an unreadable NIfTI header")
    return header


def check_cost(state: "ServerState", points: int, nbytes: int, cost: int) -> None:
    """Refuse (413) an image before any work: over the voxel limit, larger than the image cache, or costing
    more than one request may (``cost``: the body plus every copy decoding makes)."""
    s = state.settings
    if points > s.max_voxels:
        raise ApiError(413, f"the image has {points} voxels; this server's limit is {s.max_voxels}")
    if nbytes > s.cache_bytes:
        raise ApiError(413, f"the image takes {nbytes} bytes, more than this server's image cache "
                            f"({s.cache_bytes} bytes); ask its operator to raise --cache-mb")
    if cost > state.request_bytes:
        raise ApiError(413, f"decoding the image would take about {cost >> 20} MB of memory (it announces "
                            f"{nbytes} bytes), more than this server allows one request "
                            f"({state.request_bytes >> 20} MB, --max-request-mb)")


def _check_nifti_complete(body: bytes, suffix: str, header: ImageHeader) -> None:
    """ITK reads a NIfTI file cut short without complaint (the missing voxels come back as garbage);
    refuse it here: the gzip stream must end properly and hold every voxel the header announces. No more
    than the announced bytes are ever inflated: a stream that holds more is cut off there (413)."""
    need = header.offset + header.data_bytes
    if suffix == ".nii.gz":
        d = zlib.decompressobj(wbits=31)
        total, data, more = 0, body, b""
        try:
            while total < need:
                out = d.decompress(data, min(1 << 24, need - total))
                total += len(out)
                data = d.unconsumed_tail
                if not out:
                    break
            if not d.eof:
                more = d.decompress(data, 1)  # the trailer ends the stream; a byte more is over the header
        except zlib.error:
            raise ApiError(400, "the uploaded .nii.gz file is corrupt") from None
        if more:
            raise ApiError(413, f"the uploaded .nii.gz file inflates to more than the {need} bytes its header "
                                "announces; decompression was stopped there")
        if total >= need and not d.eof:
            raise ApiError(400, "the uploaded .nii.gz file is truncated (its gzip stream ends early)")
    else:
        total = len(body)
    if total < need:
        raise ApiError(400, f"the uploaded {suffix} file is truncated: its header announces {need} bytes, "
                            f"it holds {total}")


def ingest(state: "ServerState", body: bytes) -> tuple[dict[str, Any], bool]:
    """Decode an uploaded body into the image cache; returns (image description, created).

    What decoding will cost is read from the header first (frame, NIfTI or NRRD) and checked against the
    limits before anything is decompressed or allocated."""
    if body[:4] == wire.MAGIC:
        header = wire.peek_header(body)
        # The body, a copy of the payload for gzip, and the decompressed array.
        copies = len(body) * (2 if header["codec"] == "gzip" else 1)
        check_cost(state, header["voxels"], header["nbytes"], copies + header["nbytes"])
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
        header = file_header(body, suffix)
        # The body, ITK's buffer and its copies (FILE_COPIES), and a byte a voxel for the NaN scan.
        check_cost(state, header.points, header.nbytes,
                   len(body) + FILE_COPIES * header.nbytes + header.points * header.components)
        ident, volume = _read_file(state, body, suffix, header)
    created = state.images.put(ident, volume)
    return describe(ident, volume, existed=not created), created


def _read_file(state: "ServerState", body: bytes, suffix: str, header: ImageHeader) -> tuple[str, Volume]:
    import SimpleITK as sitk

    from ..io import read_image

    if suffix.startswith(".nii"):
        _check_nifti_complete(body, suffix, header)
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

