"""STAND-IN for Slicer's ``SegmentEditorEffects`` package (test use only): the base class of scripted
Segment Editor effects, with the API of Slicer's
``Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/AbstractScriptedSegmentEditorEffect.py``:
``__init__(scriptedEffect)`` keeps the C++ adaptor as ``self.scriptedEffect``, ``register()`` hands it to
the effect factory, ``cleanup()`` is the hook for disconnecting signals.
"""

import slicer

__all__ = ["AbstractScriptedSegmentEditorEffect"]


class AbstractScriptedSegmentEditorEffect:
    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def register(self):
        return slicer.qSlicerSegmentEditorEffectFactory.instance().registerEffect(self.scriptedEffect)

    def cleanup(self):
        pass
