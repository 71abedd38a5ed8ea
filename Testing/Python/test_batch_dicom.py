"""``rcmed batch`` on DICOM studies: series found by walking the tree (and kept by --series-filter), and
``--format dcm``: DICOM SEG (highdicom) that references the source instances, whose frames reproduce the label
map exactly and whose segments carry the prompt's names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rcmed_engine.batch import BatchOptions, find_cases, run_batch
from rcmed_engine.batch.executors import LocalExecutor
from rcmed_engine.engine import Engine
from rcmed_engine.io import read_labelmap

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
pytestmark = pytest.mark.usefixtures("one_thread")


def ct_series(folder: Path, n=5, rows=20, cols=18, spacing=(0.8, 0.7), thickness=2.5, seed=0,
              description="CT abdomen", modality="CT") -> list[Path]:
    """A small single-frame DICOM series built with pydicom (positions along +z, CT Hounsfield rescale)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^Patient", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20240101", "120000", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = modality, 1, k + 1, description
        ds.Manufacturer = "test"
        ds.ImagePositionPatient = [-10.0, -12.0, 30.0 + k * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = list(spacing), thickness
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = (rng.normal(1064, 60, (rows, cols))).astype(np.int16).tobytes()
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def tiny_engine():
    return Engine.from_preset("tiny", device="cpu")


def studies(root: Path) -> dict[str, list[Path]]:
    return {"a": ct_series(root / "patient1" / "study1" / "ct", seed=1),
            "b": ct_series(root / "patient2" / "ct", seed=2, n=4),
            "mr": ct_series(root / "patient2" / "mr", seed=3, n=3, description="T1 axial", modality="MR")}


def test_dicom_tree_walk_and_series_filter(tmp_path):
    studies(tmp_path / "dicom")
    (tmp_path / "dicom" / "notes.txt").write_text("not dicom")
    assert [c.case_id for c in find_cases(tmp_path / "dicom")] == ["patient1_study1_ct", "patient2_ct",
                                                                    "patient2_mr"]
    kept = find_cases(tmp_path / "dicom", series_filter="^CT$")
    assert [(c.case_id, c.modality) for c in kept] == [("patient1_study1_ct", "CT"), ("patient2_ct", "CT")]
    assert [c.case_id for c in find_cases(tmp_path / "dicom", series_filter="t1")] == ["patient2_mr"]


def test_dicom_seg_references_the_source_and_reproduces_the_label_map(tmp_path, tiny_engine):
    files = studies(tmp_path / "dicom")
    common = dict(prompt="liver and spleen", series_filter="CT", progress=False)
    seg_out, ref_out = tmp_path / "seg", tmp_path / "ref"
    run = run_batch(BatchOptions(str(tmp_path / "dicom"), str(seg_out), fmt="dcm", **common),
                    LocalExecutor(tiny_engine))
    assert run.counts == {"done": 2, "failed": 0, "skipped": 0}
    run_batch(BatchOptions(str(tmp_path / "dicom"), str(ref_out), **common), LocalExecutor(tiny_engine))
    for case, key in (("patient1_study1_ct", "a"), ("patient2_ct", "b")):
        seg = hd.seg.segread(seg_out / f"{case}.dcm")
        sources = [pydicom.dcmread(f) for f in files[key]]
        uids = [s.SOPInstanceUID for s in sources]
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == set(uids)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
        assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "spleen"]
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "RCMed"
        expected, _, _ = read_labelmap(ref_out / f"{case}.seg.nrrd")
        assert expected.any()
        # label map slice k lies on source instance k (the series reader's order, by position)
        pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
        assert pixels.shape == expected.shape and np.array_equal(pixels.astype(np.uint8), expected)
