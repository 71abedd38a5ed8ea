"""STAND-IN for Slicer's compiled ``qSlicerSegmentationsEditorEffectsPythonQt`` module (test use only):
it provides ``qSlicerSegmentEditorScriptedEffect``, the adaptor that runs an effect written in Python."""

from slicer.widgets import qSlicerSegmentEditorAbstractEffect, qSlicerSegmentEditorScriptedEffect  # noqa: F401
