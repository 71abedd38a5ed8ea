"""STAND-IN for ``slicer.ScriptedLoadableModule`` (test use only), after Slicer's
``Base/Python/slicer/ScriptedLoadableModule.py``: the four base classes of a scripted module.

Differences: no developer "Reload & Test" section, and ``runTest`` runs the ``<Module>Test`` case directly.
"""

from __future__ import annotations

import importlib
import os
import unittest

import qt

import slicer

__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
           "ScriptedLoadableModuleTest"]


def _module_name(obj, suffix: str) -> str:
    """The module's name: the class name without ``suffix`` ("RCMedSlicerLogic" -> "RCMedSlicer"), as Slicer does."""
    name = type(obj).__name__
    return name[:-len(suffix)] if name.endswith(suffix) else name


class ScriptedLoadableModule:
    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        moduleDir = os.path.dirname(self.parent.path)
        iconPath = os.path.join(moduleDir, "Resources/Icons", self.moduleName + ".png")
        if os.path.isfile(iconPath):
            parent.icon = qt.QIcon(iconPath)
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ""

    def runTest(self, msec=100, **kwargs):
        module = importlib.import_module(self.__module__)
        testCase = getattr(module, self.moduleName + "Test")()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = _module_name(self, "Widget")
        self.developerMode = False
        if not parent:
            self.parent = slicer.qMRMLWidget()
            self.parent.setLayout(qt.QVBoxLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

    def cleanup(self):
        pass

    def setupDeveloperSection(self):
        pass

    def setup(self):
        self.setupDeveloperSection()


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = _module_name(self, "Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        if self.isSingletonParameterNode:
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.SetHideFromEditors(True)
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName)
                     if hasattr(slicer.mrmlScene, "GenerateUniqueName") else self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messageDelay = 100

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        slicer.util.delayDisplay(message)

    def takeScreenshot(self, name, description, type=-1):
        pass
