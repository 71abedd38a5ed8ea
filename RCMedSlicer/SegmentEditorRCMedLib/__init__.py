"""The "RCMed" Segment Editor effect. Slicer loads SegmentEditorEffect.py by path (see
RCMedSlicer.registerEditorEffect); this package file only lets tools import it."""
