"""What an uploaded file will cost, read from its header alone (no voxel is decompressed or allocated).

A NIfTI-1/2 header is the first 348/540 bytes (of the gzip stream, for ``.nii.gz``: only those bytes are
inflated); an NRRD header is the text before the first blank line. Each gives the image's size in voxels
and bytes per voxel, so the server can refuse an upload that would not fit before it does any work.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

from .errors import ApiError

# NIfTI datatype code -> (bytes per voxel in the file, is integer). ITK allocates by the datatype, not by
# bitpix, so a header that lies in bitpix does not shrink the estimate.
NIFTI_DATATYPES = {2: (1, True), 4: (2, True), 8: (4, True), 16: (4, False), 32: (8, False), 64: (8, False),
                   128: (3, True), 256: (1, True), 512: (2, True), 768: (4, True), 1024: (8, True),
                   1280: (8, True), 1536: (16, False), 1792: (16, False), 2048: (32, False), 2304: (4, True)}

# NRRD type names (every spelling of the NRRD0005 specification) -> bytes per value.
_NRRD_TYPES = {}
for _size, _names in ((1, "signed char|int8|int8_t|uchar|unsigned char|uint8|uint8_t"),
                      (2, "short|short int|signed short|signed short int|int16|int16_t|ushort|unsigned short|"
                          "unsigned short int|uint16|uint16_t"),
                      (4, "int|signed int|int32|int32_t|uint|unsigned int|uint32|uint32_t|float"),
                      (8, "longlong|long long|long long int|signed long long|signed long long int|int64|int64_t|"
                          "ulonglong|unsigned long long|unsigned long long int|uint64|uint64_t|double")):
    _NRRD_TYPES.update(dict.fromkeys(_names.split("|"), _size))
NRRD_ENCODINGS = ("raw", "gzip", "gz", "ascii", "text", "txt", "bzip2", "bz2", "hex")
NRRD_MAX_HEADER = 1 << 16
_SPATIAL_KINDS = ("domain", "space", "time", "???", "none")


@dataclass(frozen=True)
class ImageHeader:
    """An image as its file header announces it."""

    kind: str            # "nifti" or "nrrd"
    points: int          # voxels: the product of the sizes of every axis but the components'
    components: int      # values per voxel (3 for RGB)
    itemsize: int        # bytes per value in memory once read (after ITK's rescaling, if any)
    data_bytes: int      # bytes of voxel data the file must hold
    offset: int          # where the voxel data starts (NIfTI: vox_offset; NRRD: after the header)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded array (at most: ITK may still drop an alpha channel)."""
        return self.points * self.components * self.itemsize


def gunzip_head(body: bytes, n: int) -> bytes:
    """The first ``n`` bytes of a gzip stream, inflating no more than that (b"" when it is not gzip)."""
    try:
        return zlib.decompressobj(wbits=31).decompress(body[:65536], n)
    except zlib.error:
        return b""


def nifti_header(head: bytes) -> ImageHeader | None:
    """A NIfTI-1 or NIfTI-2 header (either byte order) from the file's first 540 bytes; None if unreadable."""
    for e in "<>":
        if len(head) >= 348 and struct.unpack(e + "i", head[:4])[0] == 348:
            dims = struct.unpack(e + "8h", head[40:56])
            datatype, bitpix = struct.unpack(e + "2h", head[70:74])
            offset = struct.unpack(e + "f", head[108:112])[0]
            slope, inter = struct.unpack(e + "2f", head[112:120])
            break
        if len(head) >= 540 and struct.unpack(e + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(e + "2h", head[12:16])
            dims = struct.unpack(e + "8q", head[16:80])
            offset = struct.unpack(e + "q", head[168:176])[0]
            slope, inter = struct.unpack(e + "2d", head[176:192])
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or not math.isfinite(offset) or offset < 0 or datatype not in NIFTI_DATATYPES:
        return None
    if any(d < 0 for d in dims[1:dims[0] + 1]):
        return None
    points = math.prod(max(1, int(d)) for d in dims[1:dims[0] + 1])
    size, integer = NIFTI_DATATYPES[datatype]
    file_bytes = points * max(size, bitpix // 8 if bitpix > 0 else 0)
    components, itemsize = 1, size
    scaled = math.isfinite(slope) and slope not in (0.0, 1.0) or (math.isfinite(inter) and inter != 0.0)
    if scaled and integer:
        itemsize = max(size, 4)  # ITK applies scl_slope/scl_inter and returns float voxels
    if datatype in (128, 2304):  # RGB24, RGBA32: three or four uint8 values per voxel
        components, itemsize = (3 if datatype == 128 else 4), 1
    return ImageHeader("nifti", points, components, itemsize, int(file_bytes), int(offset))


def nrrd_header(body: bytes) -> ImageHeader:
    """An attached NRRD header (the text up to the first blank line); ApiError 400 for anything unusable."""
    end = -1
    for sep in (b"\n\n", b"\r\n\r\n", b"\n\r\n"):
        i = body.find(sep, 0, NRRD_MAX_HEADER)
        if i >= 0 and (end < 0 or i < end):
            end = i + len(sep)
    if end < 0:
        raise ApiError(400, "the uploaded NRRD file has no complete header (no blank line within "
                            f"{NRRD_MAX_HEADER} bytes)")
    fields: dict[str, str] = {}
    for raw in body[:end].decode("latin-1").splitlines()[1:]:
        line = raw.strip()
        if not line or line.startswith("#") or ":=" in line.split(": ", 1)[0]:
            continue
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if "data file" in fields or "datafile" in fields:
        raise ApiError(400, "the uploaded NRRD file names a separate data file; send a single file with "
                            "the data attached (.nrrd, not .nhdr)")
    missing = [k for k in ("type", "dimension", "sizes", "encoding") if k not in fields]
    if missing:
        raise ApiError(400, f"the uploaded NRRD header lacks {', '.join(missing)}")
    itemsize = _NRRD_TYPES.get(" ".join(fields["type"].lower().split()))
    if itemsize is None:
        raise ApiError(400, f"the uploaded NRRD file has an unsupported type {fields['type']!r}")
    if fields["encoding"].lower() not in NRRD_ENCODINGS:
        raise ApiError(400, f"the uploaded NRRD file has an unsupported encoding {fields['encoding']!r}")
    try:
        dim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
    except ValueError:
        raise ApiError(400, "the uploaded NRRD header's dimension and sizes must be whole numbers") from None
    if not 1 <= dim <= 16 or len(sizes) != dim or min(sizes) < 1:
        raise ApiError(400, f"the uploaded NRRD header's sizes {sizes} do not match its dimension {dim}")
    # Axes whose kind is not spatial (RGB-color, vector, ...) hold a voxel's components.
    kinds = fields.get("kinds", "").lower().split()
    comp_axes = [i for i, k in enumerate(kinds) if i < dim and k not in _SPATIAL_KINDS]
    components = math.prod(sizes[i] for i in comp_axes)
    points = math.prod(sizes) // components
    return ImageHeader("nrrd", points, components, itemsize, points * components * itemsize, end)
