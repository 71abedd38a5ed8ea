"""Rotation matrices for the geometry tests (oblique and flipped directions), and a matrix as VTK takes it,
shared by every test file."""

from __future__ import annotations

import math

import numpy as np


def rotation(axis, angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` radians. ``axis``: a vector (Rodrigues, right-handed), or "x", "y" or "z"
    for the plane rotation of those two other axes (for "y" this is the inverse sense of the vector form,
    as the Slicer tests' fixtures were drawn)."""
    if isinstance(axis, str):
        c, s = math.cos(angle), math.sin(angle)
        i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def vtk_matrix(a):
    """A 4x4 array-like as a ``vtk.vtkMatrix4x4`` (vtk is imported here, only by the Slicer tests that use it)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r][c]))
    return m
