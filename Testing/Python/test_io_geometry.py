"""Geometry survives every round trip; slicing is exact and anatomically oriented; bad input fails cleanly.

Geometry fidelity found (and asserted) here:
  .mha, .nrrd, .seg.nrrd  bit-exact origin, spacing and direction;
  .nii / .nii.gz          origin and spacing exactly the float32 rounding, direction within 2e-7.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcmed_engine import io as rio
from rcmed_engine.geometry import (
    PLANES,
    Geometry,
    Volume,
    from_slices,
    slice_frame,
    to_slices,
)
from rcmed_engine.io import (
    OUTPUT_SUFFIXES,
    ImageReadError,
    LabelmapError,
    OutputPathError,
    SegmentInfo,
    read_image,
    read_labelmap,
    write_labelmap,
)
from rotations import rotation

EXACT_FORMATS = (".seg.nrrd", ".nrrd", ".mha")
FLOAT32_FORMATS = (".nii.gz", ".nii")


# ------------------------------------------------------------------ helpers



OBLIQUE = rotation([0.3, -0.5, 0.8], 0.7)
FLIPPED = OBLIQUE @ np.diag([1.0, 1.0, -1.0])  # det -1
assert np.linalg.det(FLIPPED) < 0

ORIGIN = (12.345678901234567, -98.76543210987654, 3.3333333333333335)
SPACING = (0.7031249999999999, 0.8123456789012345, 2.4999999999999996)

DIRECTIONS = {"oblique": OBLIQUE, "flipped": FLIPPED}


def geometry(direction: np.ndarray, origin=ORIGIN, spacing=SPACING) -> Geometry:
    return Geometry(origin, spacing, tuple(direction.ravel()))


def f32(values) -> tuple[float, ...]:
    return tuple(float(np.float32(v)) for v in values)


def assert_geometry(got: Geometry, want: Geometry, suffix: str) -> None:
    if suffix in EXACT_FORMATS:
        assert got == want  # bit-exact, every component
    else:
        assert got.origin == f32(want.origin)
        assert got.spacing == f32(want.spacing)
        np.testing.assert_allclose(got.direction, want.direction, rtol=0, atol=2e-7)


def sample_labels(shape=(4, 5, 6), n=3, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n + 1, size=shape).astype(np.uint8)


def sample_segments(n=3) -> list[SegmentInfo]:
    return [
        SegmentInfo(f"structure {v}", v, (v / 10, 0.5, 1 - v / 10), {"RCMed.Prompt": f"prompt {v}"})
        for v in range(1, n + 1)
    ]


def folder_listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------ label map round trips

@pytest.mark.parametrize("suffix", OUTPUT_SUFFIXES)
@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_labelmap_round_trip_geometry(tmp_path, suffix, kind):
    g = geometry(DIRECTIONS[kind])
    labels = sample_labels()
    out = write_labelmap(tmp_path / f"mask{suffix}", labels, g, sample_segments())
    assert out == tmp_path / f"mask{suffix}"
    back, g2, _ = read_labelmap(out)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    assert_geometry(g2, g, suffix)
    assert folder_listing(tmp_path) == [out.name]  # no temp file left


@pytest.mark.parametrize("suffix", OUTPUT_SUFFIXES)
def test_labelmap_uint16_when_labels_exceed_255(tmp_path, suffix):
    labels = np.zeros((2, 3, 4), np.int32)
    labels[0, 0, 0] = 300
    segs = [SegmentInfo("big", 300, (1, 0, 0))]
    back, _, _ = read_labelmap(write_labelmap(tmp_path / f"m{suffix}", labels, geometry(OBLIQUE), segs))
    assert back.dtype == np.uint16 and back[0, 0, 0] == 300


@pytest.mark.parametrize("source_suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("suffix", OUTPUT_SUFFIXES)
def test_image_file_to_labelmap_round_trip(tmp_path, source_suffix, suffix):
    """Geometry read from an input image is what the label map carries back."""
    arr = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    geometry(FLIPPED).apply_to(img)
    src = tmp_path / f"ct{source_suffix}"
    sitk.WriteImage(img, str(src))
    vol = read_image(src)
    np.testing.assert_array_equal(vol.array, arr)
    assert vol.meta["source"] == str(src)
    if source_suffix == ".nrrd":  # a plain NRRD from another tool: direction rebuilt from spacing*direction
        assert vol.geometry.origin == ORIGIN
        np.testing.assert_allclose(vol.geometry.spacing, SPACING, rtol=1e-15)
        np.testing.assert_allclose(vol.geometry.direction, FLIPPED.ravel(), rtol=0, atol=1e-15)
    else:
        assert_geometry(vol.geometry, geometry(FLIPPED), source_suffix)

    labels = (vol.array > 0).astype(np.uint8)
    back, g2, _ = read_labelmap(write_labelmap(tmp_path / f"mask{suffix}", labels, vol.geometry, [SegmentInfo("x", 1, (1, 1, 0))]))
    np.testing.assert_array_equal(back, labels)
    if suffix in EXACT_FORMATS or source_suffix in FLOAT32_FORMATS:
        # NIfTI input geometry is already float32-representable, so origin/spacing stay exact.
        assert g2.origin == vol.geometry.origin and g2.spacing == vol.geometry.spacing
        tol = 0 if suffix in EXACT_FORMATS else 2e-7
        np.testing.assert_allclose(g2.direction, vol.geometry.direction, rtol=0, atol=tol)
    else:
        assert_geometry(g2, vol.geometry, suffix)


def test_nrrd_read_by_simpleitk_alone_is_within_one_ulp(tmp_path):
    """What Slicer/ITK see without our exact side field: origin, spacing exact, direction ~1e-16."""
    g = geometry(FLIPPED)
    out = write_labelmap(tmp_path / "m.nrrd", sample_labels(), g, [])
    img = sitk.ReadImage(str(out))
    assert img.GetOrigin() == g.origin
    np.testing.assert_allclose(img.GetSpacing(), g.spacing, rtol=1e-15)
    np.testing.assert_allclose(img.GetDirection(), g.direction, rtol=0, atol=1e-15)


def test_stale_exact_geometry_field_is_ignored(tmp_path):
    """A file whose NRRD geometry was changed by another tool must not use our old side field."""
    g = geometry(OBLIQUE)
    out = write_labelmap(tmp_path / "m.seg.nrrd", sample_labels(), g, sample_segments())
    data = out.read_bytes()
    old = b"space origin: (12.345678901234567,"
    assert old in data
    out.write_bytes(data.replace(old, b"space origin: (22.345678901234567,", 1))
    _, g2, _ = read_labelmap(out)
    assert g2.origin[0] == 22.345678901234567
    np.testing.assert_allclose(g2.direction, g.direction, atol=1e-15)


def test_seg_nrrd_segments_colours_and_tags_survive(tmp_path):
    segs = [
        SegmentInfo("liver", 1, (0.8666666666666667, 0.5098039215686274, 0.396078431372549),
                    {"RCMed.Preset": "abdomen-ct", "RCMed.WeightsSHA256": "ab12" * 16,
                     "RCMed.Prompt": "the liver", "RCMed.EngineVersion": "0.1.0",
                     "RCMed.PresenceScore": "0.9731"}),
        SegmentInfo("left kidney", 2, (0.1, 0.2, 0.3), {
            # What Slicer itself writes; slicerio parses these two, io must give them back as tags.
            "Segmentation.Status": "inprogress",
            "TerminologyEntry": "Segmentation category and type - 3D Slicer General Anatomy list"
                                "~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~^^"
                                "~Anatomic codes - DICOM master list~^^~^^"}),
        SegmentInfo("empty finding", 7, (1.0, 0.0, 0.0), {"RCMed.PresenceScore": "0.01"}),
    ]
    labels = sample_labels(n=2)
    back, _, segs2 = read_labelmap(write_labelmap(tmp_path / "s.seg.nrrd", labels, geometry(OBLIQUE), segs))
    np.testing.assert_array_equal(back, labels)
    assert segs2 == segs


def test_seg_nrrd_header_text_is_made_safe(tmp_path):
    """NRRD headers are ASCII lines and Slicer joins tags with '|': such text is rewritten, not fatal."""
    segs = [SegmentInfo("Hüftkopf\nrechts", 1, (1, 0, 0), {"RCMed.Prompt": "liver | spleen", "a:b": "x"})]
    _, _, segs2 = read_labelmap(write_labelmap(tmp_path / "s.seg.nrrd", sample_labels(n=1), geometry(OBLIQUE), segs))
    assert segs2[0].name == "Huftkopf rechts"
    assert segs2[0].tags == {"RCMed.Prompt": "liver / spleen", "a/b": "x"}


def test_seg_nrrd_opened_by_slicerio_like_slicer(tmp_path):
    import slicerio

    g = geometry(FLIPPED)
    out = write_labelmap(tmp_path / "s.seg.nrrd", sample_labels(), g, sample_segments())
    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_allclose(seg["ijkToLPS"], g.ijk_to_lps_matrix(), rtol=0, atol=0)
    assert [s["name"] for s in seg["segments"]] == ["structure 1", "structure 2", "structure 3"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 3]


@pytest.mark.parametrize("suffix", OUTPUT_SUFFIXES)
def test_2d_reference_labelmap_round_trip(tmp_path, suffix):
    img = sitk.GetImageFromArray(np.arange(30, dtype=np.uint8).reshape(5, 6))
    img.SetSpacing((0.15, 0.2))
    sitk.WriteImage(img, str(tmp_path / "xray.png"))
    vol = read_image(tmp_path / "xray.png")
    assert vol.array.shape == (1, 5, 6) and vol.is_2d
    mask2d = (np.arange(30).reshape(5, 6) % 3 == 0).astype(np.uint8)
    out = write_labelmap(tmp_path / f"m{suffix}", mask2d, vol.geometry, [SegmentInfo("nodule", 1, (1, 0, 0))], reference_2d=True)
    back, g2, _ = read_labelmap(out)
    np.testing.assert_array_equal(back, mask2d[None])
    assert_geometry(g2, vol.geometry, suffix)


# ------------------------------------------------------------------ image reading

def test_read_rgba_png_drops_alpha_and_embeds_2d_geometry(tmp_path):
    rgba = np.random.default_rng(2).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    img = sitk.GetImageFromArray(rgba, isVector=True)
    img.SetSpacing((0.5, 0.25))  # PNG stores pixel size (pHYs) but no origin
    sitk.WriteImage(img, str(tmp_path / "derm.png"))
    vol = read_image(tmp_path / "derm.png")
    assert vol.array.shape == (1, 5, 6, 3) and vol.array.dtype == np.uint8 and vol.is_rgb
    np.testing.assert_array_equal(vol.array[0], rgba[..., :3])
    assert vol.geometry == Geometry((0.0, 0.0, 0.0), (0.5, 0.25, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_2d_image_is_never_reoriented(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(tmp_path / "cxr.png"))
    vol = read_image(tmp_path / "cxr.png")
    for plane in PLANES:
        frame = vol.slice_frame(plane)
        assert frame.single_slice and frame.slice_axis == 0
        assert not frame.flip_rows and not frame.flip_cols
        stack = to_slices(vol.array, frame)
        np.testing.assert_array_equal(stack[0], gray)
        np.testing.assert_array_equal(from_slices(stack, frame), vol.array)


def test_3d_rgb_volume_and_other_channel_counts(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.mha"))
    assert read_image(tmp_path / "rgb.mha").array.shape == (2, 3, 4, 3)
    five = np.zeros((2, 3, 4, 5), np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(five, isVector=True), str(tmp_path / "five.mha"))
    with pytest.raises(ImageReadError, match="5 values per voxel"):
        read_image(tmp_path / "five.mha")


# ------------------------------------------------------------------ reading errors

def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found") as e:
        read_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(np.random.default_rng(4).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="cannot read") as e:
        read_image(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_4d_image(tmp_path):
    vols = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)) for _ in range(2)]
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(vols), str(path))
    with pytest.raises(ImageReadError, match="4D images are not supported") as e:
        read_image(path)
    assert f"{path} has 4 dimensions; extract one volume first" in str(e.value)


@pytest.mark.parametrize("suffix, dtype", [(".nii.gz", np.float32), (".nii", np.float64), (".nrrd", np.float32), (".mha", np.float64)])
def test_nan_voxels(tmp_path, suffix, dtype):
    """NIfTI included: ITK 5.4 silently reads NIfTI NaN/Inf as 0, so io scans the file bytes."""
    arr = np.zeros((3, 4, 5), dtype)
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    with pytest.raises(ImageReadError, match="contains 3 NaN voxels and 1 infinite voxels") as e:
        read_image(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_dicom_folder_without_series(tmp_path):
    (tmp_path / "readme.txt").write_text("not dicom")
    with pytest.raises(ImageReadError, match=f"no DICOM series in {tmp_path}"):
        read_image(tmp_path)


def test_labelmap_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_labelmap(tmp_path / "nope.seg.nrrd")


def test_corrupt_seg_nrrd(tmp_path):
    bad = tmp_path / "bad.seg.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: banana\n\n")
    with pytest.raises(ImageReadError, match="cannot read segmentation") as e:
        read_labelmap(bad)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ writing errors: nothing left behind

def test_bad_output_suffix(tmp_path):
    with pytest.raises(OutputPathError, match=r"\.seg\.nrrd, \.nii\.gz, \.nii, \.nrrd, \.mha"):
        write_labelmap(tmp_path / "mask.png", sample_labels(), geometry(OBLIQUE), [])
    assert folder_listing(tmp_path) == []


def test_missing_output_folder(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(OutputPathError, match=f"output folder does not exist: {missing}"):
        write_labelmap(missing / "mask.nii.gz", sample_labels(), geometry(OBLIQUE), [])
    assert folder_listing(tmp_path) == []


def test_inconsistent_labels_and_segments(tmp_path):
    with pytest.raises(LabelmapError, match=r"values \[3\] that no SegmentInfo describes"):
        write_labelmap(tmp_path / "m.seg.nrrd", sample_labels(n=3), geometry(OBLIQUE), sample_segments(2))
    with pytest.raises(LabelmapError, match="integers"):
        write_labelmap(tmp_path / "m.nrrd", np.zeros((2, 2, 2), np.float32), geometry(OBLIQUE), [])
    with pytest.raises(LabelmapError, match="more than one segment"):
        write_labelmap(tmp_path / "m.nrrd", sample_labels(n=1), geometry(OBLIQUE),
                       [SegmentInfo("a", 1, (0, 0, 0)), SegmentInfo("b", 1, (0, 0, 0))])
    assert folder_listing(tmp_path) == []


@pytest.mark.parametrize("suffix", OUTPUT_SUFFIXES)
def test_failed_write_leaves_no_partial_file_and_keeps_old_output(tmp_path, monkeypatch, suffix):
    out = tmp_path / f"mask{suffix}"
    write_labelmap(out, sample_labels(), geometry(OBLIQUE), sample_segments())
    before = out.read_bytes()

    def half_write(path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("Exception thrown in WriteImage: x.cxx:1:\nITK ERROR: NrrdImageIO(0x55d0): disk full\n")

    import slicerio
    monkeypatch.setattr(rio.sitk, "WriteImage", lambda image, path, *a: half_write(path))
    monkeypatch.setattr(slicerio, "write_segmentation", lambda path, *a, **k: half_write(path))
    with pytest.raises(OutputPathError, match="cannot write .*disk full") as e:
        write_labelmap(out, sample_labels(seed=9), geometry(FLIPPED), sample_segments())
    assert "\n" not in str(e.value)
    assert folder_listing(tmp_path) == [out.name]
    assert out.read_bytes() == before


# ------------------------------------------------------------------ DICOM

def write_dicom_series(folder: Path, arr: np.ndarray, g: Geometry, modality: str, uid_suffix: str) -> None:
    folder.mkdir(exist_ok=True)
    img = g.apply_to(sitk.GetImageFromArray(arr))
    d = g.direction
    study = "1.2.826.0.1.3680043.2.1125.1.1"
    series = f"1.2.826.0.1.3680043.2.1125.1.{uid_suffix}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    common = {
        "0008|0060": modality,
        "0008|0008": "DERIVED\\SECONDARY",
        "0020|000d": study,
        "0020|000e": series,
        "0020|0052": study + ".9",
        "0008|103e": f"test series {uid_suffix}",
        # Image Orientation (Patient): row direction (i axis) then column direction (j axis).
        "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
    }
    for k in range(arr.shape[0]):
        sl = img[:, :, k]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", f"{series}.{k + 1}")
        sl.SetMetaData("0020|0013", str(k + 1))
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in pos))
        writer.SetFileName(str(folder / f"{uid_suffix}_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_geometry_and_modality(tmp_path):
    arr = np.random.default_rng(5).integers(-1000, 1000, (4, 6, 7)).astype(np.int16)
    g = Geometry((-120.5, 80.25, -300.0), (0.75, 0.8, 2.5), tuple(OBLIQUE.ravel()))
    write_dicom_series(tmp_path / "dcm", arr, g, "CT", "2")
    vol = read_image(tmp_path / "dcm")
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.geometry.origin, g.origin, atol=1e-5)
    np.testing.assert_allclose(vol.geometry.spacing, g.spacing, atol=1e-5)
    np.testing.assert_allclose(vol.geometry.direction, g.direction, atol=1e-6)
    assert vol.meta["modality"] == "CT" and vol.meta["dicom_series_count"] == 1
    assert "note" not in vol.meta


def test_dicom_series_with_missing_slice_is_refused(tmp_path):
    g = Geometry((0, 0, 0), (1, 1, 2), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_dicom_series(tmp_path / "dcm", np.zeros((5, 4, 4), np.int16), g, "CT", "5")
    (tmp_path / "dcm" / "5_002.dcm").unlink()
    with pytest.raises(ImageReadError, match="uneven slice spacing .*4.000 mm between slices 2 and 3") as e:
        read_image(tmp_path / "dcm")
    assert "\n" not in str(e.value)


def test_dicom_folder_with_several_series_takes_largest(tmp_path):
    g = Geometry((0, 0, 0), (1, 1, 2), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_dicom_series(tmp_path / "dcm", np.zeros((2, 4, 4), np.int16), g, "MR", "3")
    write_dicom_series(tmp_path / "dcm", np.ones((3, 4, 4), np.int16), g, "DX", "4")
    vol = read_image(tmp_path / "dcm")
    assert vol.shape_zyx == (3, 4, 4)
    assert vol.meta["modality"] == "X-ray" and vol.meta["dicom_modality"] == "DX"
    assert vol.meta["dicom_series_count"] == 2 and "2 DICOM series" in vol.meta["note"]


# ------------------------------------------------------------------ matrices

@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_ijk_to_ras_matches_itk(kind):
    g = geometry(DIRECTIONS[kind])
    img = g.apply_to(sitk.Image(7, 8, 9, sitk.sitkUInt8))
    m = g.ijk_to_ras_matrix()
    for ijk in [(0, 0, 0), (6, 7, 8), (3, 1, 5), (2, 7, 0)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        ras = m @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(g.ijk_to_lps(ijk), lps, rtol=0, atol=1e-12)
        np.testing.assert_allclose(g.lps_to_ijk(lps), ijk, rtol=0, atol=1e-9)
    cont = (1.25, 3.5, 7.75)
    np.testing.assert_allclose(g.ijk_to_lps(cont), img.TransformContinuousIndexToPhysicalPoint(cont), atol=1e-12)
    assert m[3].tolist() == [0, 0, 0, 1]


def test_geometry_rejects_nonsense():
    with pytest.raises(ValueError, match="positive"):
        Geometry((0, 0, 0), (1, 0, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="singular"):
        Geometry((0, 0, 0), (1, 1, 1), (1, 0, 0, 1, 0, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="NaN"):
        Geometry((0, float("nan"), 0), (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1))


# ------------------------------------------------------------------ slicing

def index_grid(shape) -> np.ndarray:
    """(z, y, x, 3) array whose value at each voxel is its own (z, y, x) index."""
    return np.stack(np.indices(shape), axis=-1)


def lps_of_pixel(g: Geometry, sliced_grid: np.ndarray, n: int, r: int, c: int) -> np.ndarray:
    z, y, x = sliced_grid[n, r, c]
    return g.ijk_to_lps((x, y, z))


# plane -> (LPS axis of rows, wanted sign, LPS axis of columns, wanted sign, LPS normal axis)
DISPLAY = {
    "axial": (1, +1, 0, +1, 2),      # top anterior, image left = patient right
    "coronal": (2, -1, 0, +1, 1),    # top superior, image left = patient right
    "sagittal": (2, -1, 1, +1, 0),   # top superior, image left = anterior
}


def check_display_orientation(g: Geometry, shape, plane: str, strict_axis_aligned: bool) -> None:
    frame = slice_frame(g, plane, shape)
    grid = to_slices(index_grid(shape), frame)
    row_ax, row_sign, col_ax, col_sign, normal = DISPLAY[plane]
    p = lps_of_pixel(g, grid, 0, 0, 0)
    down = lps_of_pixel(g, grid, 0, 1, 0) - p
    right = lps_of_pixel(g, grid, 0, 0, 1) - p
    step = lps_of_pixel(g, grid, 1, 0, 0) - p
    assert down[row_ax] * row_sign > 0 and right[col_ax] * col_sign > 0
    assert np.argmax(np.abs(step)) == normal
    np.testing.assert_allclose(frame.pixel_spacing, (np.linalg.norm(down), np.linalg.norm(right)), rtol=1e-12)
    np.testing.assert_allclose(frame.slice_spacing, np.linalg.norm(step), rtol=1e-12)
    if strict_axis_aligned:
        np.testing.assert_allclose(down[[a for a in range(3) if a != row_ax]], 0, atol=1e-12)
        np.testing.assert_allclose(right[[a for a in range(3) if a != col_ax]], 0, atol=1e-12)


SIGNED_PERMUTATIONS = [
    np.eye(3)[list(perm)].T * np.array(signs)[None, :]
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1, -1), repeat=3)
]


@st.composite
def near_permutation_geometries(draw):
    base = SIGNED_PERMUTATIONS[draw(st.integers(0, len(SIGNED_PERMUTATIONS) - 1))]
    axis = draw(st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda a: np.linalg.norm(a) > 0.1))
    angle = draw(st.floats(0, 0.35))  # < 20 degrees: the nearest permutation stays unambiguous
    direction = rotation(axis, angle) @ base
    spacing = draw(st.tuples(*[st.floats(0.1, 5)] * 3))
    origin = draw(st.tuples(*[st.floats(-500, 500)] * 3))
    shape = draw(st.tuples(*[st.integers(2, 5)] * 3))
    return Geometry(origin, spacing, tuple(direction.ravel())), shape


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_permutation_geometries(), st.booleans(), st.integers(0, 2**31))
def test_slices_are_exact_inverses_and_radiologically_oriented(case, rgb, seed):
    g, shape = case
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 1000, shape + ((3,) if rgb else ())).astype(np.int16)
    axes = set()
    for plane in PLANES:
        frame = slice_frame(g, plane, shape)
        stack = to_slices(arr, frame)
        assert stack.shape[:3] == (shape[frame.slice_axis], shape[frame.row_axis], shape[frame.col_axis])
        back = from_slices(stack, frame)
        assert back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)
        # Stack index n is voxel index n along the slice axis (no reversal).
        np.testing.assert_array_equal(stack[1], to_slices(np.take(arr, [1], axis=frame.slice_axis), frame)[0])
        axes.add(frame.slice_axis)
        check_display_orientation(g, shape, plane, strict_axis_aligned=False)
    assert axes == {0, 1, 2}


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda a: np.linalg.norm(a) > 0.1),
    st.floats(0, np.pi),
    st.booleans(),
    st.sampled_from(PLANES),
)
def test_any_rotation_gives_distinct_axes_and_exact_inverse(axis, angle, flip, plane):
    direction = rotation(axis, angle) @ np.diag([1.0, 1.0, -1.0 if flip else 1.0])
    g = Geometry((0, 0, 0), (1, 2, 3), tuple(direction.ravel()))
    assert {slice_frame(g, p).slice_axis for p in PLANES} == {0, 1, 2}
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    frame = slice_frame(g, plane)
    np.testing.assert_array_equal(from_slices(to_slices(arr, frame), frame), arr)


@pytest.mark.parametrize("direction", SIGNED_PERMUTATIONS[::5] + [np.eye(3)])
@pytest.mark.parametrize("plane", PLANES)
def test_axis_aligned_display_orientation(direction, plane):
    g = Geometry((10, -20, 30), (0.5, 0.75, 2.0), tuple(direction.ravel()))
    check_display_orientation(g, (3, 4, 5), plane, strict_axis_aligned=True)


def marker_position(g: Geometry, shape, plane: str, ijk) -> tuple[int, int, int]:
    arr = np.zeros(shape, np.uint8)
    arr[ijk[2], ijk[1], ijk[0]] = 1
    stack = to_slices(arr, slice_frame(g, plane, shape))
    return tuple(int(v) for v in np.argwhere(stack)[0])


def test_identity_lps_known_voxel_lands_where_radiologists_expect():
    g = Geometry((-50, -60, -70), (1, 2, 3), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    shape = (4, 5, 6)  # z, y, x
    ijk = (1, 3, 2)
    lps = g.ijk_to_lps(ijk)
    np.testing.assert_allclose(lps, (-49, -54, -64))
    # Axial: slice k=2; a point 6 mm posterior to the front edge (j=3 of 0..4) is row 3,
    # and 1 mm left of the patient-right edge (i=1) is column 1.
    assert marker_position(g, shape, "axial", ijk) == (2, 3, 1)
    # A more anterior (smaller P) voxel sits higher; a more right (smaller L) one further left.
    assert marker_position(g, shape, "axial", (1, 0, 2))[1] < 3
    assert marker_position(g, shape, "axial", (0, 3, 2))[2] < 1
    # Coronal: slice j=3; superior at the top, so k=2 of 0..3 is row 3-2=1; column = i.
    assert marker_position(g, shape, "coronal", ijk) == (3, 1, 1)
    # Sagittal: slice i=1; row = 3-k = 1; anterior at image left, so column = j = 3.
    assert marker_position(g, shape, "sagittal", ijk) == (1, 1, 3)


def test_flipped_matrix_known_voxel():
    # i points to patient right, k points inferior (det -1 after both flips: det +1; add a j flip).
    direction = np.diag([-1.0, 1.0, -1.0])
    g = Geometry((50, -60, 70), (1, 2, 3), tuple(direction.ravel()))
    shape = (4, 5, 6)
    ijk = (1, 3, 2)
    # Axial: still slice k=2 (never reversed); columns go right->left, i goes left->right: col = 5-1.
    assert marker_position(g, shape, "axial", ijk) == (2, 3, 4)
    # Coronal: rows superior->inferior and k already goes inferior: row = k = 2.
    assert marker_position(g, shape, "coronal", ijk) == (3, 2, 4)
    det_neg = Geometry((0, 0, 0), (1, 1, 1), tuple(np.diag([-1.0, 1.0, 1.0]).ravel()))
    assert np.linalg.det(det_neg.direction_matrix) < 0
    assert marker_position(det_neg, shape, "axial", ijk) == (2, 3, 4)
    assert marker_position(det_neg, shape, "sagittal", ijk) == (1, 3 - 2, 3)


def test_coronally_acquired_volume_is_still_cut_axially():
    # DICOM coronal: rows along +L, columns along -S, slices along +P.
    direction = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    g = Geometry((0, 0, 0), (0.5, 0.6, 3.0), tuple(direction.ravel()))
    shape = (4, 5, 6)  # 4 coronal slices of 5 (S-I) x 6 (R-L)
    axial = slice_frame(g, "axial", shape)
    assert axial.slice_axis == 1  # the j axis is the one along S
    assert axial.pixel_spacing == (3.0, 0.5) and axial.slice_spacing == 0.6
    ijk = (2, 1, 3)
    n, r, c = marker_position(g, shape, "axial", ijk)
    assert n == 1  # stack index == voxel index j
    assert (r, c) == (3, 2)  # k grows towards P (down), i towards L (right)
    coronal = slice_frame(g, "coronal", shape)
    assert coronal.slice_axis == 0 and not coronal.flip_rows and not coronal.flip_cols
    check_display_orientation(g, shape, "axial", strict_axis_aligned=True)


def test_single_slice_3d_volume_keeps_its_plane():
    g = geometry(OBLIQUE)
    frame = slice_frame(g, "sagittal", (1, 4, 5))
    assert frame.single_slice and frame.slice_axis == 0 and (frame.row_axis, frame.col_axis) == (1, 2)
    assert frame.pixel_spacing == (SPACING[1], SPACING[0])
    vol = Volume(np.zeros((1, 4, 5), np.uint8), g, {})
    assert vol.slice_frame("axial").single_slice


def test_unknown_plane():
    with pytest.raises(ValueError, match="axial, coronal, sagittal"):
        slice_frame(geometry(OBLIQUE), "oblique")
