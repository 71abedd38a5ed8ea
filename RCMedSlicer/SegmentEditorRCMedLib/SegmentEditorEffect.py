"""The "RCMed" Segment Editor effect: type a prompt, press Apply, and the selected segment gets the mask.

It edits through ``modifySelectedSegmentByLabelmap``, so the editor's editable area (masking, editable
intensity range) and "modify other segments" settings apply, and it saves one undo state per Apply.
"Learn from this slice" registers the selected segment, as outlined on the current slice, as a new class
(one-shot adaptation) under the name typed next to it; the name is then offered in the prompt box.

The work runs off the main thread (RCMedSlicer.JobPoller); the effect shares the module's Logic and its
loaded engine.
"""

import logging
import os

import numpy as np
import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

import RCMedSlicer
from RCMedSlicerLib import engines, jobs, segmenting
from RCMedSlicerLib import geometry as rgeom
from RCMedSlicerLib import settings as rsettings
from rcmed_engine.geometry import Volume

SCOPES = [("slice", "Current slice"), ("volume", "Whole volume")]


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """RCMed text-prompted segmentation into the selected segment, and one-shot learning of new classes."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "RCMed"
        scriptedEffect.perSegment = True  # it writes into the selected segment
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = RCMedSlicer.RCMedSlicerLogic()
        self.poller = None
        self._pending = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Segment what a text prompt names into the selected segment.<br>
Type e.g. <i>liver</i> and press Apply. Scope "Current slice" segments the slice shown in the chosen view
(its orientation picks the model's axis); "Whole volume" segments every axial slice. The editable area and
"modify other segments" settings apply, and Undo reverts each Apply.<p>
<b>Learn from this slice</b>: outline a structure on one slice in the selected segment, type a name and press
the button. The model learns it (one-shot adaptation) and the name becomes a prompt.</html>"""

    def setupOptionsFrame(self):
        self.promptComboBox = qt.QComboBox()
        self.promptComboBox.editable = True
        self.promptComboBox.insertPolicy = qt.QComboBox.NoInsert
        self.promptComboBox.objectName = "RCMedPromptComboBox"
        self.promptComboBox.toolTip = "What to segment, e.g. 'liver'. Several targets all go into the selected segment."
        self.scriptedEffect.addLabeledOptionsWidget("Prompt:", self.promptComboBox)

        self.modalityComboBox = qt.QComboBox()
        for m in rsettings.MODALITIES:
            self.modalityComboBox.addItem(m)
        self.scriptedEffect.addLabeledOptionsWidget("Modality:", self.modalityComboBox)

        self.scopeComboBox = qt.QComboBox()
        for value, label in SCOPES:
            self.scopeComboBox.addItem(label, value)
        self.scriptedEffect.addLabeledOptionsWidget("Scope:", self.scopeComboBox)

        self.viewComboBox = qt.QComboBox()
        for view in RCMedSlicer.SLICE_VIEWS:
            self.viewComboBox.addItem(view)
        self.viewComboBox.toolTip = "The slice view whose slice is used ('Current slice' and 'Learn from this slice')."
        self.scriptedEffect.addLabeledOptionsWidget("Slice view:", self.viewComboBox)

        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.toolTip = "Segment what the prompt names into the selected segment"
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        row = qt.QHBoxLayout()
        row.addWidget(self.applyButton)
        row.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(row)

        self.learnNameLineEdit = qt.QLineEdit()
        self.learnNameLineEdit.placeholderText = "name of the new class"
        self.learnNameLineEdit.objectName = "RCMedLearnNameLineEdit"
        self.learnButton = qt.QPushButton("Learn from this slice")
        self.learnButton.objectName = "RCMedLearnButton"
        self.learnButton.toolTip = ("Register the selected segment, as outlined on the current slice, as a new class "
                                    "under this name (one-shot adaptation)")
        learnRow = qt.QHBoxLayout()
        learnRow.addWidget(self.learnNameLineEdit)
        learnRow.addWidget(self.learnButton)
        self.scriptedEffect.addOptionsWidget(learnRow)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.statusLabel.objectName = "RCMedStatusLabel"
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.poller = RCMedSlicer.JobPoller(self._onJobUpdate, self._onJobFinished)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.learnButton.connect("clicked()", self.onLearn)
        for widget, signal in ((self.promptComboBox, "editTextChanged(QString)"),
                               (self.modalityComboBox, "currentIndexChanged(int)"),
                               (self.scopeComboBox, "currentIndexChanged(int)"),
                               (self.viewComboBox, "currentIndexChanged(int)")):
            widget.connect(signal, self.updateMRMLFromGUI)
        self._fillPromptChoices()

    def cleanup(self):
        if self.poller is not None:
            self.poller.cancel()
            self.poller.timer.stop()

    def deactivate(self):
        pass

    # -- parameters (stored on the segment editor node)
    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Prompt", "")
        self.scriptedEffect.setParameterDefault("Modality", "auto")
        self.scriptedEffect.setParameterDefault("Scope", "slice")
        self.scriptedEffect.setParameterDefault("SliceView", "Red")

    def updateGUIFromMRML(self):
        widgets = (self.promptComboBox, self.modalityComboBox, self.scopeComboBox, self.viewComboBox)
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            prompt = self.scriptedEffect.parameter("Prompt")
            if self.promptComboBox.currentText != prompt:
                self.promptComboBox.setEditText(prompt)
            self.modalityComboBox.currentIndex = max(self.modalityComboBox.findText(self.scriptedEffect.parameter("Modality")), 0)
            self.scopeComboBox.currentIndex = max(self.scopeComboBox.findData(self.scriptedEffect.parameter("Scope")), 0)
            self.viewComboBox.currentIndex = max(self.viewComboBox.findText(self.scriptedEffect.parameter("SliceView")), 0)
        finally:
            for w, b in zip(widgets, blocked):
                w.blockSignals(b)
        self._updateButtons()

    def updateMRMLFromGUI(self, *args):
        self.scriptedEffect.setParameter("Prompt", self.promptComboBox.currentText)
        self.scriptedEffect.setParameter("Modality", self.modalityComboBox.currentText)
        self.scriptedEffect.setParameter("Scope", self.scopeComboBox.itemData(self.scopeComboBox.currentIndex))
        self.scriptedEffect.setParameter("SliceView", self.viewComboBox.currentText)
        self._updateButtons()

    def _updateButtons(self):
        busy = self.poller is not None and self.poller.running
        self.applyButton.enabled = (not busy) and bool(rsettings.clean_prompt(self.promptComboBox.currentText))
        self.learnButton.enabled = not busy
        self.cancelButton.enabled = busy
        self.viewComboBox.enabled = True

    def _fillPromptChoices(self, select=None):
        current = select if select is not None else self.promptComboBox.currentText
        blocked = self.promptComboBox.blockSignals(True)
        self.promptComboBox.clear()
        for choice in self.logic.loadSettings().prompt_choices():
            self.promptComboBox.addItem(choice)
        self.promptComboBox.setEditText(current)
        self.promptComboBox.blockSignals(blocked)
        if select is not None:
            self.updateMRMLFromGUI()

    # -- the source volume as the editor sees it
    def _sourceImage(self):
        """The source volume resampled to the segmentation's geometry (sourceVolumeImageData: Slicer 5.2+)."""
        return self.scriptedEffect.sourceVolumeImageData()

    def _sourceGrid(self):
        """(voxels copy, IJK -> world RAS, IJK -> segmentation coordinates, extent) of the aligned source volume."""
        source = self._sourceImage()
        if source is None:
            raise ValueError("select a source volume in the Segment Editor")
        array = np.array(RCMedSlicer.arrayFromOrientedImage(source), copy=True)
        ijkToSegmentation = RCMedSlicer.orientedImageToWorld(source)
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segmentationToWorld = RCMedSlicer.RCMedSlicerLogic.nodeToWorld(segmentationNode)
        ijkToWorld = ijkToSegmentation if segmentationToWorld is None else segmentationToWorld @ ijkToSegmentation
        return array, ijkToWorld, ijkToSegmentation, source.GetExtent()

    def _engineSpec(self):
        spec = self.logic.engineSpec()
        problems, _ = engines.validate(spec)
        if problems:
            raise ValueError("; ".join(problems) + " (set the engine in the RCMed module)")
        if not self.logic.ensureRequirements(spec):
            raise ValueError("RCMed needs its Python packages; nothing was done")
        return spec

    # -- Apply
    def _busy(self):
        if self.poller is not None and self.poller.running:
            self.statusLabel.text = "RCMed is already working; wait for it or press Cancel."
            return True
        return False

    def onApply(self):
        if self._busy():
            return
        node = self.scriptedEffect.parameterSetNode()
        segmentId = node.GetSelectedSegmentID() if node is not None else ""
        prompt = rsettings.clean_prompt(self.promptComboBox.currentText)
        try:
            if not segmentId:
                raise ValueError("select the segment to write into")
            array, ijkToWorld, ijkToSegmentation, sourceExtent = self._sourceGrid()
            geometry = rgeom.geometry_from_ijk_to_ras(ijkToWorld)
            scope = self.scopeComboBox.itemData(self.scopeComboBox.currentIndex)
            axis, slices = "axial", None
            if scope == "slice":
                pick = self.logic.pickSlice(ijkToWorld, array.shape, self.viewComboBox.currentText)
                axis, slices = pick.plane, (pick.index, pick.index + 1)
            request = segmenting.make_request(array, geometry, prompt, self.modalityComboBox.currentText, axis, slices)
            spec = self._engineSpec()
        except Exception as exc:
            self.statusLabel.text = f"Cannot start: {exc}"
            return
        self.logic.saveSettings(self.logic.loadSettings().with_prompt(prompt))
        self._fillPromptChoices(prompt)
        self._pending = ("segment", request, ijkToSegmentation, node.GetSegmentationNode(), segmentId,
                         sourceExtent)
        logic = self.logic
        job = jobs.Job(lambda progress, cancel: logic.run(request, spec, progress, cancel), name="RCMed effect")
        self.statusLabel.text = f"Segmenting {request.describe()}..."
        self._start(job)

    def onCancel(self):
        if self.poller is not None:
            self.poller.cancel()

    def _start(self, job):
        try:
            self.poller.start(job)
        except RuntimeError as exc:
            self.statusLabel.text = str(exc)
        self._updateButtons()

    def _onJobUpdate(self, status):
        if status.state == jobs.RUNNING:
            self.statusLabel.text = jobs.progress_text(status)

    def _onJobFinished(self, job):
        kind = self._pending[0] if self._pending else ""
        pending, self._pending = self._pending, None
        status = job.status()
        try:
            if status.state == jobs.CANCELLED:
                self.statusLabel.text = "Cancelled; the segment was not changed."
            elif status.state != jobs.DONE:
                logging.error("RCMed effect failed:\n%s", job.error_traceback)
                self.statusLabel.text = f"Failed: {RCMedSlicer.oneLine(job.error)}"
            elif kind == "segment":
                self._writeResult(job.result, *pending[1:])
            elif kind == "learn":
                self._learned(*pending[1:])
        finally:
            self._updateButtons()

    def _writeResult(self, result, request, ijkToSegmentation, segmentationNode, segmentId, sourceExtent=None):
        """Set the segment to the result on the processed voxels, through the Segment Editor (masking, overwrite).

        ``sourceExtent``: the aligned source volume's extent when the request was made (None: it starts at 0).
        The modifier is built on that very geometry, as Slicer's default modifier labelmap is.

        Slicer's ModificationModeSet makes the segment equal to the modifier everywhere: it clears the whole
        segment (MODE_MERGE_MIN without extent) and then fills the modifier within the extent
        (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap). So for a slice or range, Set alone would erase
        the segment outside the slab. The segment outside the slab is read first and added back after the Set
        with MODE_MERGE_MASK (no editable area, no other segment overwritten: they only apply to what RCMed
        changed); both changes are one undo step.
        """
        node = self.scriptedEffect.parameterSetNode()
        if node.GetSegmentationNode() is not segmentationNode:
            self.statusLabel.text = "The segmentation changed while RCMed worked; nothing was written."
            return
        if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            self.statusLabel.text = "The segment was deleted while RCMed worked; nothing was written."
            return
        items = segmenting.targets(result, request)
        mask = np.zeros(result.labels.shape, dtype=np.uint8)
        for item in items:
            mask[item.mask] = 1
        shape = result.labels.shape
        start = (0, 0, 0) if sourceExtent is None else tuple(int(v) for v in sourceExtent[0::2])
        gridExtent = rgeom.shift_extent(rgeom.slab_extent(shape), start)
        if request.slices is None:
            extent = gridExtent
        else:
            extent = rgeom.shift_extent(rgeom.slab_extent(shape, request.slice_axis, *request.slices), start)
        modifier = RCMedSlicer.orientedImageFromArray(mask, ijkToSegmentation, start)
        previous = node.GetSelectedSegmentID()
        if previous != segmentId:
            node.SetSelectedSegmentID(segmentId)
        try:
            keep = None
            if request.slices is not None:
                try:
                    keep = self._segmentOutside(extent, gridExtent, ijkToSegmentation, start)
                except ValueError as exc:
                    self.statusLabel.text = f"Nothing was written: {exc}"
                    return
            self.scriptedEffect.saveStateForUndo()
            self.scriptedEffect.modifySelectedSegmentByLabelmap(
                modifier, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet, list(extent))
            if keep is not None:
                # not through the editor: its intensity mask applies even with bypassMasking
                # (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap), and these voxels must come back as they were
                Logic = slicer.vtkSlicerSegmentationsModuleLogic
                if not Logic.SetBinaryLabelmapToSegment(keep, segmentationNode, segmentId, Logic.MODE_MERGE_MASK,
                                                        list(gridExtent)):
                    raise RuntimeError("Slicer did not accept the segment outside the processed slices")
        finally:
            if previous != segmentId:
                node.SetSelectedSegmentID(previous)
        self.statusLabel.text = f"{segmenting.readable_answer(result.answer)}\n{segmenting.presence_text(items)}"

    def _segmentOutside(self, slabExtent, gridExtent, ijkToSegmentation, start):
        """The selected segment on the source grid with the slab cleared (a modifier labelmap), or None if empty."""
        segmentImage = self.scriptedEffect.selectedSegmentLabelmap()
        if segmentImage is None or segmentImage.GetPointData().GetScalars() is None:
            return None
        segmentMatrix, gridMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        segmentImage.GetImageToWorldMatrix(segmentMatrix)
        grid = RCMedSlicer.orientedImageFromArray(np.zeros((1, 1, 1), np.uint8), ijkToSegmentation, start)
        grid.GetImageToWorldMatrix(gridMatrix)
        if not rgeom.same_lattice(segmentMatrix, gridMatrix):
            raise ValueError("the segment's geometry differs from the source volume's; "
                             "set the segmentation geometry from the source volume")
        keep = rgeom.paste_extent(RCMedSlicer.arrayFromOrientedImage(segmentImage), segmentImage.GetExtent(),
                                  gridExtent) > 0
        i0, i1, j0, j1, k0, k1 = (int(v) - int(gridExtent[2 * (n // 2)]) for n, v in enumerate(slabExtent))
        keep[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = False
        if not keep.any():
            return None
        return RCMedSlicer.orientedImageFromArray(keep.astype(np.uint8), ijkToSegmentation, start)

    # -- Learn from this slice (one-shot adaptation)
    def onLearn(self):
        if self._busy():
            return
        node = self.scriptedEffect.parameterSetNode()
        name = rsettings.clean_prompt(self.learnNameLineEdit.text)
        try:
            if not name:
                raise ValueError("type a name for the new class")
            if node is None or not node.GetSelectedSegmentID():
                raise ValueError("select the segment that outlines the structure")
            array, ijkToWorld, ijkToSegmentation, extent = self._sourceGrid()
            pick = self.logic.pickSlice(ijkToWorld, array.shape, self.viewComboBox.currentText)
            segmentImage = self.scriptedEffect.selectedSegmentLabelmap()
            if segmentImage is None:
                raise ValueError("the selected segment is empty")
            segmentMatrix, sourceMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
            segmentImage.GetImageToWorldMatrix(segmentMatrix)
            self._sourceImage().GetImageToWorldMatrix(sourceMatrix)
            if not rgeom.same_lattice(segmentMatrix, sourceMatrix):
                raise ValueError("the segment's geometry differs from the source volume's; "
                                 "set the segmentation geometry from the source volume")
            segmentArray = rgeom.paste_extent(RCMedSlicer.arrayFromOrientedImage(segmentImage),
                                              segmentImage.GetExtent(), extent) > 0
            mask = np.zeros(array.shape, dtype=np.uint8)
            index = [slice(None)] * 3
            index[pick.array_axis] = pick.index
            mask[tuple(index)] = segmentArray[tuple(index)]
            if not mask.any():
                raise ValueError(f"the selected segment is empty on this {pick.plane} slice ({pick.index}); "
                                 "outline the structure on it first")
            volume = Volume(array, rgeom.geometry_from_ijk_to_ras(ijkToWorld), {})
            spec = self._engineSpec()
        except Exception as exc:
            self.statusLabel.text = f"Cannot learn: {exc}"
            return
        logic = self.logic
        modality = self.modalityComboBox.currentText

        def work(progress, cancel):
            return engines.register_class(logic.engine(spec), volume, mask, name, pick.plane, pick.index,
                                          modality=modality)

        self._pending = ("learn", name, pick)
        self.statusLabel.text = f"Learning '{name}' from {pick.plane} slice {pick.index}..."
        self._start(jobs.Job(work, name="RCMed learn"))

    def _learned(self, name, pick):
        self.logic.saveSettings(self.logic.loadSettings().with_learned_class(name))
        self._fillPromptChoices(name)
        self.statusLabel.text = (f"Learned '{name}' from {pick.plane} slice {pick.index}. "
                                 f"It is now in the prompt box: press Apply to segment it.")
