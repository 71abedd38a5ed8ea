"""The self-test's volume: small, oblique and flipped, with a bright blob. Built in memory by the Slicer
self-test, and stored as ``Testing/Data/RCMedSlicerTest_oblique.nrrd`` (a test keeps the two identical) so
that the self-test can also check that Slicer reads the file into exactly this IJK -> RAS geometry."""

from __future__ import annotations

import numpy as np

FILE_NAME = "RCMedSlicerTest_oblique.nrrd"
SHAPE = (8, 16, 14)  # (z, y, x)


def oblique_test_volume() -> tuple[np.ndarray, np.ndarray]:
    """(int16 voxels (z, y, x), IJK -> RAS 4x4) of the self-test volume."""
    zz, yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]]
    array = (600 * np.exp(-((xx - 7) ** 2 + (yy - 8) ** 2 + 4 * (zz - 4) ** 2) / 20.0) - 500).astype(np.int16)
    c, s = np.cos(0.4), np.sin(0.4)
    directions = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])  # rotated about S, K flipped
    m = np.eye(4)
    m[:3, :3] = directions * np.array([0.8, 0.9, 2.5])[None, :]
    m[:3, 3] = (12.0, -30.0, 40.0)
    return array, m


def same_voxels_in_ras(array: np.ndarray, ijk_to_ras: np.ndarray, expected: np.ndarray,
                       expected_ijk_to_ras: np.ndarray, atol: float = 1e-4) -> bool:
    """Whether two (z, y, x) volumes hold the same value at every voxel centre in RAS, whatever their axis order.

    Slicer's reader may store a file's voxels in another order than the file (it reads this test volume with K
    reversed and IJK -> RAS changed to match), so the self-test compares voxels where they are, not by index.
    """
    a, b = np.asarray(array), np.asarray(expected)
    if a.size != b.size:
        return False
    zyx = np.indices(a.shape).reshape(3, -1)
    ijk1 = np.vstack([zyx[::-1], np.ones(zyx.shape[1])])
    other = (np.linalg.inv(np.asarray(expected_ijk_to_ras, float)) @ np.asarray(ijk_to_ras, float) @ ijk1)[:3]
    rounded = np.rint(other)
    if not np.allclose(other, rounded, atol=atol):
        return False
    ozyx = rounded[::-1].astype(int)
    if (ozyx < 0).any() or (ozyx >= np.array(b.shape)[:, None]).any():
        return False
    return bool(np.array_equal(a.reshape(-1), b[tuple(ozyx)]))
