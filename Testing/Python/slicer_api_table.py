"""Signatures of the Slicer Python API the extension calls, taken from the source (parameter names in order,
``self`` left out, ``*args`` / ``**kwargs`` spelled with their stars). Tests hold every stand-in and fake against
these tables with ``inspect.signature``, and the tables against slicer-core's own ``slicer.util`` where it has it.

Sources: Slicer main (github.com/Slicer/Slicer, commit 583e9b37d50e, August 2026): Base/Python/slicer/util.py,
Base/Python/slicer/packaging.py (new in 5.12), Base/Python/slicer/ScriptedLoadableModule.py;
SlicerPyTorch (github.com/fepegar/SlicerPyTorch, commit e1c85cc0a62e): PyTorchUtils/PyTorchUtils.py;
Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorAbstractEffect.h for the effect adaptor (C++
slots, PythonQt names their parameters as the header does).
"""

from __future__ import annotations

import inspect

SLICER_UTIL = {
    "loadUI": ["path"],
    "childWidgetVariables": ["widget"],
    "exit": ["status"],
    "delayDisplay": ["message", "autoCloseMsec", "parent", "**kwargs"],
    "errorDisplay": ["text", "windowTitle", "parent", "standardButtons", "**kwargs"],
    "confirmOkCancelDisplay": ["text", "windowTitle", "parent", "**kwargs"],
    "arrayFromVolume": ["volumeNode"],
    "updateVolumeFromArray": ["volumeNode", "narray"],
    "arrayFromSegmentBinaryLabelmap": ["segmentationNode", "segmentId", "referenceVolumeNode"],
    "updateSegmentBinaryLabelmapFromArray": ["narray", "segmentationNode", "segmentId", "referenceVolumeNode"],
    "loadVolume": ["filename", "properties", "returnNode"],
    "saveNode": ["node", "filename", "properties"],
    "pip_install": ["requirements", "**kwargs"],  # before 5.12: ["requirements"]
    "VTKObservationMixin.addObserver": ["obj", "event", "method", "group", "priority"],
    "VTKObservationMixin.removeObserver": ["obj", "event", "method"],
    "VTKObservationMixin.removeObservers": ["method"],
}

SLICER_PACKAGING = {
    "load_requirements": ["path"],
    "pip_check": ["req", "_seen"],
    "pip_ensure": ["requirements", "constraints", "skip_packages", "prompt_install", "prompt_restart", "requester",
                   "skip_in_testing", "show_progress"],
    "pip_install": ["requirements", "constraints", "no_deps_requirements", "skip_packages", "blocking",
                    "show_progress", "requester", "logCallback", "completedCallback"],
}

SCRIPTED_LOADABLE_MODULE = {
    "ScriptedLoadableModule.__init__": ["parent"],
    "ScriptedLoadableModule.resourcePath": ["filename"],
    "ScriptedLoadableModuleWidget.__init__": ["parent"],
    "ScriptedLoadableModuleWidget.resourcePath": ["filename"],
    "ScriptedLoadableModuleWidget.setup": [],
    "ScriptedLoadableModuleWidget.cleanup": [],
    "ScriptedLoadableModuleLogic.__init__": ["parent"],
    "ScriptedLoadableModuleLogic.getParameterNode": [],
    "ScriptedLoadableModuleTest.delayDisplay": ["message", "requestedDelay", "msec"],
}

PYTORCH_UTILS_LOGIC = {
    "torchInstalled": [],  # a staticmethod
    "installTorch": ["askConfirmation", "forceComputationBackend", "torchVersionRequirement",
                     "torchvisionVersionRequirement"],
}

# qSlicerSegmentEditorAbstractEffect / qSlicerSegmentEditorScriptedEffect slots the RCMed effect calls.
EFFECT_ADAPTOR = {
    "parameterSetNode": [],
    "parameter": ["name"],
    "parameterDefined": ["name"],
    "setParameter": ["name", "value"],
    "setParameterDefault": ["name", "value"],
    "addOptionsWidget": ["widget"],
    "addLabeledOptionsWidget": ["label", "widget"],
    "sourceVolumeImageData": [],
    "selectedSegmentLabelmap": [],
    "saveStateForUndo": [],
    "modifySelectedSegmentByLabelmap": ["modifierLabelmap", "modificationMode", "extent", "bypassMasking"],
    "viewNode": ["viewWidget"],  # static Q_INVOKABLE
    "xyToRas": ["xy", "sliceWidget"],  # static Q_INVOKABLE, the (QPoint, qMRMLSliceWidget*) overload
}

# Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/AbstractScriptedSegmentEditorEffect.py:
# the Python base class of scripted effects (the methods the RCMed effect inherits and calls), and the
# hooks the C++ adaptor calls on the effect (qSlicerSegmentEditorScriptedEffect.cxx passes them positionally).
ABSTRACT_SCRIPTED_EFFECT = {
    "__init__": ["scriptedEffect"],
    "register": [],
    "cleanup": [],
    "xyToRas": ["xy", "viewWidget"],
}
EFFECT_HOOKS = {
    "processInteractionEvents": ["callerInteractor", "eventId", "viewWidget"],
    "activate": [],
    "deactivate": [],
}


# Qt's static file dialog, as the panel's adapter "Add…" calls it: qtbase src/widgets/dialogs/qfiledialog.h
# `static QString getExistingDirectory(QWidget *parent = nullptr, const QString &caption = QString(),
# const QString &dir = QString(), Options options = ShowDirsOnly)` (Qt 5.15, which Slicer builds, and Qt 6 alike;
# PythonQt wraps the static and names its parameters as the header does).
QT = {
    "QFileDialog.getExistingDirectory": ["parent", "caption", "dir", "options"],
}


def parameters(func) -> list[str]:
    out = []
    for p in inspect.signature(func).parameters.values():
        if p.name == "self":
            continue
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
        out.append(prefix + p.name)
    return out


def lookup(owner, dotted: str):
    obj = owner
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def mismatches(owner, table: dict[str, list[str]], only_present: bool = False) -> dict[str, tuple]:
    """{name: (stand-in's parameters, Slicer's)} for every entry that differs (or is missing, unless only_present)."""
    out = {}
    for name, expected in table.items():
        try:
            func = lookup(owner, name)
        except AttributeError:
            if not only_present:
                out[name] = (None, expected)
            continue
        got = parameters(func)
        if got != expected:
            out[name] = (got, expected)
    return out
