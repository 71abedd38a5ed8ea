"""The "RCMed" Segment Editor effect: type a prompt, press Apply, and the selected segment gets the mask.

It edits through ``modifySelectedSegmentByLabelmap``, so the editor's editable area (masking, editable
intensity range) and "modify other segments" settings apply, and it saves one undo state per Apply.
"Learn from this slice" registers the selected segment, as outlined on the current slice, as a new class
(one-shot adaptation) under the name typed next to it; the name is then offered in the prompt box.

After a prompt, a left click in a slice view adds an include point and a Shift+left click an exclude point to
the segment's click node (a markups fiducial node, "RCMed clicks: <segment>"); each change of its points
(added, moved, deleted) re-runs the correction (Engine.refine) from the segment as it was before the first
click, writes it through ``modifySelectedSegmentByLabelmap`` as one undo step, and a newer change cancels a
correction still running (RCMedSlicerLib.refining keeps the logic).

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
from RCMedSlicerLib import engines, jobs, refining, segmenting
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
        self.corrections = refining.Corrections()
        self._clickObservations = {}  # click node ID -> (node, observer tags)
        self._editorObservation = None  # (segment editor node, tag)
        self._dirtyClickNodes = set()  # IDs of click nodes whose points changed since the last correction
        self._draggedClickNodes = set()  # IDs of click nodes with a point being dragged
        self._submitted = {}  # (segmentation ID, segment ID) -> clicks of the correction asked for last
        self._prompts = {}  # (segmentation ID, segment ID) -> prompt of the last Apply
        self._quiet = 0  # > 0 while the effect itself edits click nodes or the selection
        self.clickTimer = None

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
<b>Correct with clicks</b>: after Apply, left-click in a slice view where the segment should grow (include) and
Shift+left-click where it leaks (exclude). The points are markups you can drag or delete; every change re-runs
the correction through the volume, and Undo reverts each correction. "Clear clicks" removes the points and
keeps the segment as it is.<p>
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

        self.clicksLabel = qt.QLabel("Clicks (left: include, Shift+left: exclude):")
        self.clicksLabel.toolTip = ("After Apply, click in a slice view to correct the selected segment; drag or "
                                    "delete a point to re-run the correction")
        self.scriptedEffect.addOptionsWidget(self.clicksLabel)
        self.clicksListWidget = qt.QListWidget()
        self.clicksListWidget.objectName = "RCMedClicksList"
        self.clicksListWidget.toolTip = "The include (+) and exclude (-) points of the selected segment"
        self.clicksListWidget.setMaximumHeight(90)
        self.scriptedEffect.addOptionsWidget(self.clicksListWidget)
        self.clearClicksButton = qt.QPushButton("Clear clicks")
        self.clearClicksButton.objectName = "RCMedClearClicksButton"
        self.clearClicksButton.toolTip = "Remove the selected segment's points; the segment stays as it is"
        self.scriptedEffect.addOptionsWidget(self.clearClicksButton)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.statusLabel.objectName = "RCMedStatusLabel"
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        # points change in bursts (a drag, a label edit): correct once they settle
        self.clickTimer = qt.QTimer()
        self.clickTimer.setSingleShot(True)
        self.clickTimer.setInterval(300)
        self.clickTimer.connect("timeout()", self._onClickTimer)
        self.clearClicksButton.connect("clicked()", self.onClearClicks)

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
        self._unobserveClicks()
        if self.clickTimer is not None:
            self.clickTimer.stop()
        if self.poller is not None:
            self.poller.cancel()
            self.poller.timer.stop()

    def activate(self):
        self._observeEditorNode()
        self._syncClickObservations()
        self._updateClicksList()

    def deactivate(self):
        """Clicks change nothing while another effect is active (their points stay in the views)."""
        self._unobserveClicks()
        if self.clickTimer is not None:
            self.clickTimer.stop()
        self._dirtyClickNodes.clear()

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
        if hasattr(self, "clearClicksButton"):
            self.clearClicksButton.enabled = self.clicksListWidget.count > 0

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
            if kind == "refine":
                self._refined(job, status, *pending[1:])
            elif status.state == jobs.CANCELLED:
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
            self._startQueuedCorrection()

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
        items = segmenting.targets(result, request)
        mask = np.zeros(result.labels.shape, dtype=np.uint8)
        for item in items:
            mask[item.mask] = 1
        slab = None if request.slices is None else (request.slice_axis, *request.slices)
        if not self._writeMask(mask, slab, ijkToSegmentation, segmentationNode, segmentId, sourceExtent):
            return
        self._prompts[(segmentationNode.GetID(), segmentId)] = request.prompt
        clickNode = self._clickNode(segmentationNode, segmentId)
        if clickNode is not None:  # the next correction corrects this prompt's mask
            clickNode.SetAttribute(refining.PROMPT_ATTRIBUTE, request.prompt)
        self.statusLabel.text = f"{segmenting.readable_answer(result.answer)}\n{segmenting.presence_text(items)}"

    def _writeMask(self, mask, slab, ijkToSegmentation, segmentationNode, segmentId, sourceExtent=None):
        """Set ``segmentId`` to ``mask`` (0/1 on the aligned source grid) through the Segment Editor; one undo step.

        ``slab``: (numpy axis, lo, hi) to change only those slices, None for the whole grid. Returns False (with
        the reason in the status line) when nothing was written. See _writeResult for how a slab is kept."""
        node = self.scriptedEffect.parameterSetNode()
        if node.GetSegmentationNode() is not segmentationNode:
            self.statusLabel.text = "The segmentation changed while RCMed worked; nothing was written."
            return False
        if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            self.statusLabel.text = "The segment was deleted while RCMed worked; nothing was written."
            return False
        shape = mask.shape
        start = (0, 0, 0) if sourceExtent is None else tuple(int(v) for v in sourceExtent[0::2])
        gridExtent = rgeom.shift_extent(rgeom.slab_extent(shape), start)
        if slab is None:
            extent = gridExtent
        else:
            extent = rgeom.shift_extent(rgeom.slab_extent(shape, *slab), start)
        modifier = RCMedSlicer.orientedImageFromArray(np.asarray(mask, np.uint8), ijkToSegmentation, start)
        previous = node.GetSelectedSegmentID()
        if previous != segmentId:
            self._quiet += 1
            node.SetSelectedSegmentID(segmentId)
        try:
            keep = None
            if slab is not None:
                try:
                    keep = self._segmentOutside(extent, gridExtent, ijkToSegmentation, start)
                except ValueError as exc:
                    self.statusLabel.text = f"Nothing was written: {exc}"
                    return False
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
                self._quiet -= 1
        return True

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

    # -- Correct with clicks
    def _segmentKey(self, segmentationNode, segmentId):
        return (segmentationNode.GetID(), segmentId)

    def _clickNodes(self, segmentationNode):
        """The click nodes (markups fiducials) of every segment of ``segmentationNode``."""
        out = []
        if segmentationNode is None or slicer.mrmlScene is None:
            return out
        nodes = slicer.mrmlScene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
        for n in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(n)
            if node.GetAttribute(refining.SEGMENTATION_ATTRIBUTE) == segmentationNode.GetID():
                out.append(node)
        return out

    def _clickNode(self, segmentationNode, segmentId, create=False):
        """The click node of a segment; with ``create`` a new one (named after the segment, in its colour)."""
        for node in self._clickNodes(segmentationNode):
            if node.GetAttribute(refining.SEGMENT_ATTRIBUTE) == segmentId:
                return node
        if not create:
            return None
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", refining.node_name(segment.GetName()))
        node.SetAttribute(refining.SEGMENTATION_ATTRIBUTE, segmentationNode.GetID())
        node.SetAttribute(refining.SEGMENT_ATTRIBUTE, segmentId)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*segment.GetColor())
        self._syncClickObservations()
        return node

    def _currentSegment(self):
        """(segmentation node, selected segment ID) of the editor, or (None, "")."""
        node = self.scriptedEffect.parameterSetNode()
        segmentationNode = node.GetSegmentationNode() if node is not None else None
        segmentId = node.GetSelectedSegmentID() if node is not None else ""
        return segmentationNode, (segmentId or "")

    _CLICK_EVENTS = ("PointAddedEvent", "PointModifiedEvent", "PointRemovedEvent", "PointStartInteractionEvent",
                     "PointEndInteractionEvent", "TransformModifiedEvent")

    def _syncClickObservations(self):
        """Observe the click nodes of the edited segmentation (and only those)."""
        segmentationNode, _ = self._currentSegment()
        wanted = {node.GetID(): node for node in self._clickNodes(segmentationNode)}
        for nodeId in list(self._clickObservations):
            if nodeId not in wanted or wanted[nodeId] is not self._clickObservations[nodeId][0]:
                node, tags = self._clickObservations.pop(nodeId)
                for tag in tags:
                    node.RemoveObserver(tag)
        for nodeId, node in wanted.items():
            if nodeId in self._clickObservations:
                continue
            tags = []
            for name in self._CLICK_EVENTS:
                event = getattr(node, name)
                tags.append(node.AddObserver(event, lambda caller, eventName, name=name: self._onClickNodeEvent(caller, name)))
            self._clickObservations[nodeId] = (node, tags)

    def _unobserveClicks(self):
        for node, tags in self._clickObservations.values():
            for tag in tags:
                node.RemoveObserver(tag)
        self._clickObservations = {}
        if self._editorObservation is not None:
            node, tag = self._editorObservation
            node.RemoveObserver(tag)
            self._editorObservation = None

    def _observeEditorNode(self):
        """Follow the selected segment (the clicks list shows its points)."""
        node = self.scriptedEffect.parameterSetNode()
        if self._editorObservation is not None:
            if self._editorObservation[0] is node:
                return
            old, tag = self._editorObservation
            old.RemoveObserver(tag)
            self._editorObservation = None
        if node is not None:
            self._editorObservation = (node, node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._onEditorNodeModified))

    def _onEditorNodeModified(self, caller=None, event=None):
        if self._quiet:
            return
        self._syncClickObservations()
        self._updateClicksList()

    def _onClickNodeEvent(self, node, eventName):
        if self._quiet:
            return
        self._updateClicksList()
        nodeId = node.GetID()
        if eventName == "PointStartInteractionEvent":
            self._draggedClickNodes.add(nodeId)
            return
        self._dirtyClickNodes.add(nodeId)
        if eventName == "PointEndInteractionEvent":
            self._draggedClickNodes.discard(nodeId)
        if not self._draggedClickNodes and self.clickTimer is not None:
            self.clickTimer.start()  # restarts: one correction once the points settle

    def _onClickTimer(self):
        dirty, self._dirtyClickNodes = self._dirtyClickNodes, set()
        for nodeId in sorted(dirty):
            node = slicer.mrmlScene.GetNodeByID(nodeId)
            if node is not None:
                self._correct(node)

    def _updateClicksList(self):
        if not hasattr(self, "clicksListWidget"):
            return
        segmentationNode, segmentId = self._currentSegment()
        node = self._clickNode(segmentationNode, segmentId) if segmentId else None
        points = refining.points_from_markups(node)
        self.clicksListWidget.clear()
        for point in points:
            self.clicksListWidget.addItem(point.describe())
        self.clicksLabel.text = (f"Clicks ({refining.click_summary(points)}; left: include, Shift+left: exclude):"
                                 if points else "Clicks (left: include, Shift+left: exclude):")
        self.clearClicksButton.enabled = bool(points)

    def _promptFor(self, segmentationNode, segmentId, clickNode=None):
        """The prompt a segment's corrections use: its click node's, else its last Apply's, else the prompt box's."""
        prompt = clickNode.GetAttribute(refining.PROMPT_ATTRIBUTE) if clickNode is not None else None
        return (prompt or self._prompts.get(self._segmentKey(segmentationNode, segmentId))
                or rsettings.clean_prompt(self.promptComboBox.currentText))

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """A left click in a slice view adds an include point, Shift+left click an exclude point (True: handled).

        A press on one of the segment's points is left to the markups widget, which drags it."""
        if eventId != vtk.vtkCommand.LeftButtonPressEvent or viewWidget.className() != "qMRMLSliceWidget":
            return False
        if callerInteractor.GetControlKey() or callerInteractor.GetAltKey():
            return False
        segmentationNode, segmentId = self._currentSegment()
        if segmentationNode is None or not segmentId:
            return False
        sliceNode = self.scriptedEffect.viewNode(viewWidget)
        xy = callerInteractor.GetEventPosition()
        clickNode = self._clickNode(segmentationNode, segmentId)
        if refining.near_point(xy, sliceNode.GetXYToRAS(), refining.points_from_markups(clickNode)) is not None:
            return False
        prompt = self._promptFor(segmentationNode, segmentId, clickNode)
        if not prompt:
            self.statusLabel.text = "Type a prompt and press Apply first; then click to correct the segment."
            return False
        include = not callerInteractor.GetShiftKey()
        ras = self.xyToRas(xy, viewWidget)  # world RAS of the click on the view's slice
        clickNode = self._clickNode(segmentationNode, segmentId, create=True)
        try:
            plane = rgeom.plane_for_slice_view(sliceNode.GetOrientation(), rgeom.as_matrix(sliceNode.GetSliceToRAS()))
        except rgeom.GeometryError:
            plane = "axial"
        clickNode.SetAttribute(refining.AXIS_ATTRIBUTE, plane)  # the correction is carried along this view's normal
        clickNode.SetAttribute(refining.PROMPT_ATTRIBUTE, prompt)
        label, description = refining.point_text(include, refining.next_number(clickNode))
        self._quiet += 1
        try:
            index = clickNode.AddControlPointWorld(float(ras[0]), float(ras[1]), float(ras[2]), label)
            clickNode.SetNthControlPointDescription(index, description)
        finally:
            self._quiet -= 1
        self._updateClicksList()
        self._dirtyClickNodes.add(clickNode.GetID())
        self._onClickTimer()  # a click corrects at once; moves and deletions wait for the points to settle
        return True

    def _segmentOnSource(self, segmentId, ijkToSegmentation, sourceExtent):
        """The segment (bool, z, y, x) on the aligned source grid, read through the editor's selected labelmap."""
        node = self.scriptedEffect.parameterSetNode()
        previous = node.GetSelectedSegmentID()
        if previous != segmentId:
            self._quiet += 1
            node.SetSelectedSegmentID(segmentId)
        try:
            image = self.scriptedEffect.selectedSegmentLabelmap()
            start = tuple(int(v) for v in sourceExtent[0::2])
            grid = RCMedSlicer.orientedImageFromArray(np.zeros((1, 1, 1), np.uint8), ijkToSegmentation, start)
            gridMatrix, segmentMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
            grid.GetImageToWorldMatrix(gridMatrix)
            if image is None or image.GetPointData().GetScalars() is None:
                return refining.segment_on_grid(None, None, None, sourceExtent, gridMatrix)
            image.GetImageToWorldMatrix(segmentMatrix)
            return refining.segment_on_grid(RCMedSlicer.arrayFromOrientedImage(image), image.GetExtent(),
                                            segmentMatrix, sourceExtent, gridMatrix)
        finally:
            if previous != segmentId:
                node.SetSelectedSegmentID(previous)
                self._quiet -= 1

    def _correct(self, clickNode):
        """Correct the segment of ``clickNode`` with its points (none left: back to the mask before the clicks)."""
        if clickNode.GetScene() is None:
            return
        editorNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = slicer.mrmlScene.GetNodeByID(clickNode.GetAttribute(refining.SEGMENTATION_ATTRIBUTE) or "")
        segmentId = clickNode.GetAttribute(refining.SEGMENT_ATTRIBUTE) or ""
        if segmentationNode is None or editorNode is None or editorNode.GetSegmentationNode() is not segmentationNode:
            return
        if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            self.statusLabel.text = f"The segment of '{clickNode.GetName()}' was deleted; its clicks correct nothing."
            return
        key = self._segmentKey(segmentationNode, segmentId)
        clicks = refining.clicks_from_markups(clickNode)
        if self._submitted.get(key) == clicks:
            return  # nothing that matters changed (a label, a selection state)
        self._submitted[key] = clicks
        try:
            array, ijkToWorld, ijkToSegmentation, sourceExtent = self._sourceGrid()
            current = self._segmentOnSource(segmentId, ijkToSegmentation, sourceExtent)
            previous = self.corrections.previous(key, current, ijkToSegmentation)
            generation = self.corrections.next_generation(key)  # anything still running for it is stale now
            self.corrections.queued.pop(key, None)
            if not clicks:
                self._cancelRunningCorrection(key)
                if not np.array_equal(previous, current):
                    if self._writeMask(previous.astype(np.uint8), None, ijkToSegmentation, segmentationNode,
                                       segmentId, sourceExtent):
                        self.corrections.written(key, self._segmentOnSource(segmentId, ijkToSegmentation, sourceExtent))
                        self.statusLabel.text = "No clicks left: the segment is back to its mask before the clicks."
                return
            request = refining.make_request(
                array, rgeom.geometry_from_ijk_to_ras(ijkToWorld), self._promptFor(segmentationNode, segmentId, clickNode),
                clicks, previous, self.modalityComboBox.currentText,
                clickNode.GetAttribute(refining.AXIS_ATTRIBUTE) or "axial", key, generation)
            spec = self._engineSpec()
        except Exception as exc:
            self._submitted.pop(key, None)
            self.statusLabel.text = f"Cannot correct: {exc}"
            return
        pending = ("refine", request, ijkToSegmentation, segmentationNode, segmentId, sourceExtent)
        if self.poller.running:
            self._cancelRunningCorrection(key)
            self.corrections.queued[key] = (pending, spec)
            self.statusLabel.text = f"Waiting to correct {request.describe()}..."
            return
        self._startCorrection(pending, spec)

    def _cancelRunningCorrection(self, key):
        """Cancel the correction running for ``key`` (a newer one replaces it); other work goes on."""
        if self._pending and self._pending[0] == "refine" and self._pending[1].key == key:
            self.poller.cancel()

    def _startCorrection(self, pending, spec):
        request = pending[1]
        logic = self.logic
        self._pending = pending
        self.statusLabel.text = f"Correcting {request.describe()}..."
        self._start(jobs.Job(lambda progress, cancel: refining.run(logic.engine(spec), request, progress, cancel),
                             name="RCMed correct"))

    def _startQueuedCorrection(self):
        if self.poller is None or self.poller.running:
            return
        queued = self.corrections.take_queued()
        if queued is not None:
            self._startCorrection(*queued)

    def _refined(self, job, status, request, ijkToSegmentation, segmentationNode, segmentId, sourceExtent):
        key = request.key
        if not self.corrections.is_current(key, request.generation):
            return  # a newer click replaced it: its result is not written
        if status.state == jobs.CANCELLED:
            self._submitted.pop(key, None)  # the same clicks may be asked for again
            self.statusLabel.text = "Correction cancelled; the segment was not changed."
            return
        if status.state != jobs.DONE:
            self._submitted.pop(key, None)
            logging.error("RCMed correction failed:\n%s", job.error_traceback)
            self.statusLabel.text = f"Correction failed: {RCMedSlicer.oneLine(job.error)}"
            return
        mask = refining.corrected_mask(job.result).astype(np.uint8)
        if self._writeMask(mask, None, ijkToSegmentation, segmentationNode, segmentId, sourceExtent):
            self.corrections.written(key, self._segmentOnSource(segmentId, ijkToSegmentation, sourceExtent))
            self.statusLabel.text = f"Corrected {request.describe()} ({jobs.progress_text(status)})."

    def onClearClicks(self):
        """Remove the selected segment's points; the segment stays as it is (it is what the next click corrects)."""
        segmentationNode, segmentId = self._currentSegment()
        node = self._clickNode(segmentationNode, segmentId) if segmentId else None
        if node is None:
            return
        key = self._segmentKey(segmentationNode, segmentId)
        self._cancelRunningCorrection(key)
        self.corrections.forget(key)
        self._submitted.pop(key, None)
        self._quiet += 1
        try:
            node.RemoveAllControlPoints()
        finally:
            self._quiet -= 1
        self._dirtyClickNodes.discard(node.GetID())
        self._updateClicksList()
        self.statusLabel.text = "Clicks cleared; the segment was kept as it is."

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
