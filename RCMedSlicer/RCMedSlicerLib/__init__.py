"""Slicer-free helpers of the RCMed Slicer extension.

Nothing here imports ``slicer``, ``qt``, ``ctk``, ``vtk`` or ``torch``: every module can be imported and
tested with plain Python (numpy, and ``rcmed_engine.geometry`` where geometry is needed). The Slicer layer
(``RCMedSlicer.py``, the Segment Editor effect and ``Scripts/batch.py``) converts Slicer objects to plain
values and calls these.

- ``geometry``: Slicer IJKToRAS / parent transforms / slice views <-> rcmed_engine ``Geometry`` and slice axes
- ``engines``: which engine to use (local preset or folder of weights, or a remote server), creating and caching it
- ``settings``: persistent user settings (never the token) and the recent-prompts list
- ``segmenting``: one request (copied voxels + world geometry) -> engine -> one mask per target
- ``refining``: include / exclude clicks (markups fiducials, world RAS) correcting a segment through ``Engine.refine``
- ``jobs``: running long work off the main thread with progress and cancel
- ``batch``: bookkeeping of the headless batch run (what to do, atomic writes, the summary and exit code)
- ``dependencies``: which Python packages each install profile needs, and which are missing
- ``terminology``: segment names to Slicer terminology entries and colours
- ``testdata``: the self-test's small oblique volume
"""

__all__ = ["geometry", "engines", "settings", "segmenting", "refining", "jobs", "batch", "dependencies", "terminology", "testdata"]
