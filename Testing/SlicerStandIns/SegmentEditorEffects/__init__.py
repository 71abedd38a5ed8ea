"""STAND-IN for Slicer's ``SegmentEditorEffects`` package (test use only): the base class of scripted
Segment Editor effects, with the API of Slicer's
``Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/AbstractScriptedSegmentEditorEffect.py``:
``__init__(scriptedEffect)`` keeps the C++ adaptor as ``self.scriptedEffect``, ``register()`` hands it to
the effect factory, ``cleanup()`` is the hook for disconnecting signals, ``xyToRas(xy, viewWidget)`` turns a
view position into a qt.QPoint, asks the adaptor's ``xyToRas`` and returns its QVector3D as a list [R, A, S].
"""

import qt

import slicer

__all__ = ["AbstractScriptedSegmentEditorEffect"]


class AbstractScriptedSegmentEditorEffect:
    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def register(self):
        return slicer.qSlicerSegmentEditorEffectFactory.instance().registerEffect(self.scriptedEffect)

    def cleanup(self):
        pass

    def xyToRas(self, xy, viewWidget):
        ras = self.scriptedEffect.xyToRas(qt.QPoint(xy[0], xy[1]), viewWidget)
        return [ras.x(), ras.y(), ras.z()]
