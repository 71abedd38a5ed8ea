"""STAND-IN for ``slicer.parameterNodeWrapper`` (test use only), after Slicer's
``Base/Python/slicer/parameterNodeWrapper/`` (wrapper.py, serializers.py, validators.py, default.py,
guiConnectors.py):

* ``@parameterNodeWrapper`` turns annotated class members into typed properties stored in a
  vtkMRMLScriptedModuleNode: str/int/float/bool/pathlib.Path/enum.Enum as string parameters, MRML nodes as
  node references. Defaults come from ``= value``, ``Default(value)`` or the type's default.
* Validators ``WithinRange``, ``Minimum``, ``Maximum``, ``Choice``, ``NotNone`` check every write.
* ``connectGui(gui)`` binds widgets whose ``SlicerParameterName`` dynamic property names a parameter, with
  the connector that fits the widget type exactly (``type(widget) == qt.QCheckBox``...): QCheckBox and
  checkable QPushButton <-> bool, QSpinBox/QSlider <-> int, QDoubleSpinBox/ctkSliderWidget <-> float,
  QComboBox <-> Choice-annotated value or Enum (its ``label`` function names the items), QLineEdit <-> str,
  ctkPathLineEdit <-> pathlib.Path, qMRMLNodeComboBox <-> node. ``disconnectGui(tag)`` undoes it.

Parameter packs, lists/dicts/unions and GUI creation are not reproduced (the extension does not use them).
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
import typing

import ctk
import qt
import vtk

import slicer

__all__ = ["parameterNodeWrapper", "Default", "WithinRange", "Minimum", "Maximum", "Choice", "NotNone",
           "Decimals", "SingleStep", "SlicerParameterNamePropertyName", "isParameterNodeWrapper",
           "findChildWidgetForParameter"]

SlicerParameterNamePropertyName = "SlicerParameterName"


# -------------------------------------------------------------------------------------------- annotations
@dataclasses.dataclass
class Default:
    value: typing.Any


class Validator:
    def validate(self, value) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class WithinRange(Validator):
    minimum: typing.Any
    maximum: typing.Any

    def validate(self, value):
        if not (self.minimum <= value <= self.maximum):
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


@dataclasses.dataclass
class Minimum(Validator):
    minimum: typing.Any

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value must be at least {self.minimum}, is {value}")


@dataclasses.dataclass
class Maximum(Validator):
    maximum: typing.Any

    def validate(self, value):
        if value > self.maximum:
            raise ValueError(f"Value must be at most {self.maximum}, is {value}")


@dataclasses.dataclass
class Choice(Validator):
    choices: typing.Sequence

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"Value must be within {self.choices}, is {value}")


class NotNone(Validator):
    def validate(self, value):
        if value is None:
            raise ValueError("Value must not be None")


@dataclasses.dataclass
class Decimals:
    value: int


@dataclasses.dataclass
class SingleStep:
    value: typing.Any


def _split(annotated):
    if typing.get_origin(annotated) is typing.Annotated:
        args = typing.get_args(annotated)
        return args[0], list(args[1:])
    return annotated, []


def _first(annotations, kind):
    return next((a for a in annotations if isinstance(a, kind)), None)


def _isNodeType(t) -> bool:
    return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)


# ------------------------------------------------------------------------------------------- serializers
class _Serializer:
    def __init__(self, datatype, validators):
        self.type = datatype
        self.validators = validators

    def default(self):
        t = self.type
        if _isNodeType(t):
            return None
        if isinstance(t, type) and issubclass(t, enum.Enum):
            return next(iter(t))
        return {str: "", int: 0, float: 0.0, bool: False}.get(t, pathlib.Path() if t is pathlib.Path else None)

    def validate(self, value):
        t = self.type
        if _isNodeType(t):  # IsInstance(type), None allowed
            if value is not None and not isinstance(value, t):
                raise ValueError(f"Expected {t.__name__} or None, got {type(value).__name__}")
        else:  # NotNone() and IsInstance(...), as the serializers add them
            allowed = (int, float) if t is float else t
            if value is None or not isinstance(value, allowed):
                raise ValueError(f"Expected an instance of {t}, got {value!r}")
        for v in self.validators:
            v.validate(value)

    def isIn(self, node, name) -> bool:
        return node.HasParameter(name)

    def write(self, node, name, value):
        self.validate(value)
        t = self.type
        if _isNodeType(t):
            # as Slicer's NodeSerializer: an empty parameter marks presence, the value is a node reference
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif isinstance(t, type) and issubclass(t, enum.Enum):
            node.SetParameter(name, value.name)
        elif t is bool:
            node.SetParameter(name, "True" if value else "False")
        else:
            node.SetParameter(name, str(value))

    def read(self, node, name):
        t = self.type
        if _isNodeType(t):
            return node.GetNodeReference(name)
        text = node.GetParameter(name)
        if isinstance(t, type) and issubclass(t, enum.Enum):
            return t[text]
        if t is bool:
            return text == "True"
        if t is pathlib.Path:
            return pathlib.Path(text)
        return t(text)


# ------------------------------------------------------------------------------------------ GUI connectors
class _Connector:
    def __init__(self, widget, datatype):
        self.widget = widget
        self.datatype = datatype
        self._callback = None

    def onChanged(self, callback):
        if self._callback is not None:
            try:
                self.signal().disconnect(self._changed)
            except (RuntimeError, TypeError):
                pass
        self._callback = callback
        if callback is not None:
            self.signal().connect(self._changed)

    def _changed(self, *args):
        if self._callback:
            self._callback()


class _BoolConnector(_Connector):
    def signal(self):
        return self.widget.toggled

    def read(self):
        return self.widget.checked

    def write(self, value):
        self.widget.checked = bool(value)


class _NumberConnector(_Connector):
    def __init__(self, widget, datatype, annotations):
        super().__init__(widget, datatype)
        decimals = _first(annotations, Decimals)
        if decimals is not None:
            widget.decimals = decimals.value
        step = _first(annotations, SingleStep)
        if step is not None:
            widget.singleStep = step.value
        r = _first(annotations, WithinRange)
        lo, hi = _first(annotations, Minimum), _first(annotations, Maximum)
        big = 2 ** 31 - 1 if datatype is int else float("inf")
        widget.minimum = r.minimum if r else (lo.minimum if lo else (-big - 1 if datatype is int else -big))
        widget.maximum = r.maximum if r else (hi.maximum if hi else big)

    def signal(self):
        return self.widget.valueChanged

    def read(self):
        return self.datatype(self.widget.value)

    def write(self, value):
        self.widget.value = value


class _ComboChoiceConnector(_Connector):
    def __init__(self, widget, datatype, choices):
        super().__init__(widget, datatype)
        self.choices = list(choices)
        widget.clear()
        for c in self.choices:
            widget.addItem(str(c))

    def signal(self):
        return self.widget.currentIndexChanged

    def read(self):
        return self.choices[self.widget.currentIndex]

    def write(self, value):
        self.widget.currentIndex = self.choices.index(value)


class _ComboEnumConnector(_Connector):
    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        label = getattr(datatype, "label", lambda e: e.name)
        self.items = [(label(e), e) for e in datatype]
        widget.clear()
        for text, _ in self.items:
            widget.addItem(text)

    def signal(self):
        return self.widget.currentIndexChanged

    def read(self):
        return self.items[self.widget.currentIndex][1]

    def write(self, value):
        self.widget.currentIndex = [e for _, e in self.items].index(value)


class _LineEditConnector(_Connector):
    def signal(self):
        return self.widget.textChanged

    def read(self):
        return self.widget.text

    def write(self, value):
        if self.widget.text != value:
            self.widget.text = value


class _PathConnector(_Connector):
    def signal(self):
        return self.widget.currentPathChanged

    def read(self):
        return pathlib.Path(self.widget.currentPath)

    def write(self, value):
        self.widget.currentPath = str(value)


class _NodeConnector(_Connector):
    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        widget.nodeTypes = [datatype.__name__]

    def signal(self):
        return self.widget.currentNodeChanged

    def read(self):
        return self.widget.currentNode()

    def write(self, value):
        self.widget.setCurrentNode(value)


def createGuiConnector(widget, annotated):
    t, annotations = _split(annotated)
    wt = type(widget)
    if t is bool and wt is qt.QCheckBox:
        return _BoolConnector(widget, t)
    if t is bool and wt is qt.QPushButton:
        widget.checkable = True
        return _BoolConnector(widget, t)
    if t is int and wt in (qt.QSpinBox, qt.QSlider):
        return _NumberConnector(widget, t, annotations)
    if t is float and wt in (qt.QDoubleSpinBox, ctk.ctkSliderWidget):
        return _NumberConnector(widget, t, annotations)
    if wt is qt.QComboBox and isinstance(t, type) and issubclass(t, enum.Enum):
        return _ComboEnumConnector(widget, t)
    if wt is qt.QComboBox and t in (int, float, str, bool):
        choice = _first(annotations, Choice)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        return _ComboChoiceConnector(widget, t, choice.choices)
    if t is str and wt is qt.QLineEdit:
        return _LineEditConnector(widget, t)
    if t is pathlib.Path and wt is ctk.ctkPathLineEdit:
        return _PathConnector(widget, t)
    if _isNodeType(t) and wt is slicer.qMRMLNodeComboBox:
        return _NodeConnector(widget, t)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{annotated}' to widget type '{wt}'")


# ---------------------------------------------------------------------------------------------- wrapper
@dataclasses.dataclass
class _ParameterInfo:
    name: str
    serializer: _Serializer
    default: typing.Any
    annotated: typing.Any


def _makeProperty(name):
    return property(lambda self: self.getValue(name), lambda self, value: self.setValue(name, value))


def parameterNodeWrapper(classtype=None):
    def wrap(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        params = {}
        for name, annotated in hints.items():
            t, annotations = _split(annotated)
            validators = [a for a in annotations if isinstance(a, Validator)]
            serializer = _Serializer(t, validators)
            if hasattr(cls, name):
                default = getattr(cls, name)
            else:
                d = _first(annotations, Default)
                default = d.value if d is not None else serializer.default()
            params[name] = _ParameterInfo(name, serializer, default, annotated)
            setattr(cls, name, _makeProperty(name))

        def __init__(self, parameterNode, prefix=None):
            self.parameterNode = parameterNode
            self._guis = {}
            self._nextTag = 0
            self._updatingGui = False
            self._observer = None
            for p in params.values():
                if not p.serializer.isIn(parameterNode, p.name):
                    p.serializer.write(parameterNode, p.name, p.default)

        def getValue(self, name):
            p = params[name]
            if not p.serializer.isIn(self.parameterNode, name):
                p.serializer.write(self.parameterNode, name, p.default)
            return p.serializer.read(self.parameterNode, name)

        def setValue(self, name, value):
            params[name].serializer.write(self.parameterNode, name, value)

        def dataType(name):
            return params[name].annotated

        def _updateGui(self, *args):
            if self._updatingGui:
                return
            self._updatingGui = True
            try:
                for mapping in self._guis.values():
                    for name, connector in mapping.items():
                        connector.write(self.getValue(name))
            finally:
                self._updatingGui = False

        def connectParametersToGui(self, mapping):
            connectors = {}
            for name, widget in mapping.items():
                if name not in params:
                    raise ValueError(f"Cannot find a param with the given name: {name}")
                connectors[name] = createGuiConnector(widget, params[name].annotated)
            tag = self._nextTag
            self._nextTag += 1
            self._guis[tag] = connectors
            for name, connector in connectors.items():
                connector.write(self.getValue(name))

                def onGui(name=name, connector=connector):
                    if not self._updatingGui:
                        self.setValue(name, connector.read())
                connector.onChanged(onGui)
            if self._observer is None:
                self._observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, self._updateGui)
            return tag

        def connectGui(self, gui):
            mapping = {}
            widgets = gui.findChildren(qt.QWidget) if hasattr(gui, "findChildren") else list(vars(gui).values())
            for w in widgets:
                name = w.property(SlicerParameterNamePropertyName) if hasattr(w, "property") else None
                if name:
                    mapping[str(name)] = w
            return connectParametersToGui(self, mapping)

        def disconnectGui(self, tag):
            for connector in self._guis.pop(tag, {}).values():
                connector.onChanged(None)
            if not self._guis and self._observer is not None:
                self.parameterNode.RemoveObserver(self._observer)
                self._observer = None

        cls.allParameters = params
        cls._is_parameter_node_wrapper = True
        cls.__init__ = __init__
        cls.getValue = getValue
        cls.setValue = setValue
        cls.dataType = staticmethod(dataType)
        cls.default = lambda self, name: Default(params[name].default)
        cls.connectGui = connectGui
        cls.connectParametersToGui = connectParametersToGui
        cls.disconnectGui = disconnectGui
        cls._updateGui = _updateGui
        cls.StartModify = lambda self: self.parameterNode.StartModify()
        cls.EndModify = lambda self, was: self.parameterNode.EndModify(was)
        cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority)
        cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
        cls.Modified = lambda self: self.parameterNode.Modified()
        return cls

    return wrap if classtype is None else wrap(classtype)


def isParameterNodeWrapper(classOrObj) -> bool:
    return getattr(classOrObj, "_is_parameter_node_wrapper", False)


def findChildWidgetForParameter(widget, parameter):
    for w in widget.findChildren(qt.QWidget):
        if w.property(SlicerParameterNamePropertyName) == parameter:
            return w
    return None
