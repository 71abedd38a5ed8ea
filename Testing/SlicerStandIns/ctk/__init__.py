"""STAND-IN for the CTK widgets that Slicer exposes as the ``ctk`` module. Test use only.

Only the widgets the RCMed extension uses, with the properties and signals CTK defines for them:

* ``ctkCollapsibleButton``: a container with ``text`` and ``collapsed`` (children hidden when collapsed);
  signal ``contentsCollapsed(bool)``.
* ``ctkPathLineEdit``: ``currentPath`` (str), ``filters`` (``Files``/``Dirs``...), ``settingKey``;
  signal ``currentPathChanged(QString)``.
* ``ctkSliderWidget``: ``value``, ``minimum``, ``maximum``, ``singleStep``, ``decimals``; signal
  ``valueChanged(double)``.

They are PySide6 widgets with real Qt properties (so ``.ui`` files can set them) and PythonQt-style
attribute access through the stand-in ``qt`` module.
"""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

import qt
from qt import PythonQtMixin, lay_out_in_row


class ctkCollapsibleButton(PythonQtMixin, QtWidgets.QGroupBox):
    contentsCollapsed = QtCore.Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def _get_text(self):
        return QtWidgets.QGroupBox.title(self)

    def _set_text(self, value):
        QtWidgets.QGroupBox.setTitle(self, str(value))

    def _get_collapsed(self):
        return self._collapsed

    def _set_collapsed(self, value):
        value = bool(value)
        if value == self._collapsed:
            return
        self._collapsed = value
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not value)
        self.contentsCollapsed.emit(value)

    text = QtCore.Property(str, _get_text, _set_text)
    collapsed = QtCore.Property(bool, _get_collapsed, _set_collapsed)


class ctkPathLineEdit(PythonQtMixin, QtWidgets.QWidget):
    # ctkPathLineEdit::Filter flags (a subset of QDir::Filter)
    Dirs = 0x001
    Files = 0x002
    Drives = 0x004
    Executable = 0x080
    Readable = 0x010
    Writable = 0x020

    currentPathChanged = QtCore.Signal(str)
    validInputChanged = QtCore.Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._edit = QtWidgets.QLineEdit(self)
        self._browse = QtWidgets.QToolButton(self)
        self._browse.setText("...")
        lay_out_in_row(self, self._edit, self._browse)
        self._filters = self.Files
        self._settingKey = ""
        self._edit.textChanged.connect(self.currentPathChanged.emit)

    def _get_path(self):
        return QtWidgets.QLineEdit.text(self._edit)

    def _set_path(self, value):
        QtWidgets.QLineEdit.setText(self._edit, str(value))

    def setCurrentPath(self, value):
        self._set_path(value)

    def _get_filters(self):
        return int(self._filters)

    def _set_filters(self, value):
        self._filters = int(value)

    def _get_key(self):
        return self._settingKey

    def _set_key(self, value):
        self._settingKey = str(value)

    currentPath = QtCore.Property(str, _get_path, _set_path)
    filters = QtCore.Property(int, _get_filters, _set_filters)
    settingKey = QtCore.Property(str, _get_key, _set_key)


class ctkSliderWidget(PythonQtMixin, QtWidgets.QWidget):
    valueChanged = QtCore.Signal(float)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._spin = QtWidgets.QDoubleSpinBox(self)
        lay_out_in_row(self, self._spin)
        self._spin.valueChanged.connect(self.valueChanged.emit)

    def _get(self, name):
        return getattr(QtWidgets.QDoubleSpinBox, name)(self._spin)

    value = QtCore.Property(float, lambda s: s._get("value"), lambda s, v: s._spin.setValue(float(v)))
    minimum = QtCore.Property(float, lambda s: s._get("minimum"), lambda s, v: s._spin.setMinimum(float(v)))
    maximum = QtCore.Property(float, lambda s: s._get("maximum"), lambda s, v: s._spin.setMaximum(float(v)))
    singleStep = QtCore.Property(float, lambda s: s._get("singleStep"),
                                 lambda s, v: s._spin.setSingleStep(float(v)))
    decimals = QtCore.Property(int, lambda s: s._get("decimals"), lambda s, v: s._spin.setDecimals(int(v)))


for _cls in (ctkCollapsibleButton, ctkPathLineEdit, ctkSliderWidget):
    qt.add_pythonqt_properties(_cls)


def wrapped_classes() -> dict[str, type]:
    return {"ctkCollapsibleButton": ctkCollapsibleButton, "ctkPathLineEdit": ctkPathLineEdit,
            "ctkSliderWidget": ctkSliderWidget}


__all__ = ["ctkCollapsibleButton", "ctkPathLineEdit", "ctkSliderWidget", "qt"]
