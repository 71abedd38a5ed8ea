"""STAND-IN for 3D Slicer's PythonQt ``qt`` module, built on PySide6. Test use only; not part of Slicer.

Slicer's ``qt`` module is PythonQt. Its behaviour that Slicer scripts rely on, and that PySide6 lacks, is
reproduced here:

* Qt properties are Python attributes: ``button.enabled = False``, ``lineEdit.text`` (a str, not a method),
  ``checkBox.checked``, ``comboBox.currentIndex``, ``spinBox.value``, ``widget.toolTip``...
  Each wrapped class is a PySide6 subclass with Python properties for the Qt properties in
  ``PROPERTY_NAMES`` (only those the class really has), read and written through ``QObject.property`` /
  ``setProperty``, as PythonQt does.
* String-signature connections: ``obj.connect('clicked(bool)', slot)`` and ``obj.disconnect(...)``.
* Enums through the class (``qt.Qt.WaitCursor``, ``qt.QMessageBox.Ok``), as PySide6 already allows.

Everything else in QtCore, QtGui and QtWidgets is re-exported unchanged. Widgets built from ``.ui`` files
by the stand-in ``slicer.util.loadUI`` are instances of these same classes, so ``type(w) == qt.QCheckBox``
holds as it does in Slicer (the parameter node wrapper's GUI connectors test exactly that).
"""

from __future__ import annotations

import types

from PySide6 import QtCore, QtGui, QtWidgets

# Qt property names exposed as Python attributes (PythonQt exposes all; this list covers what Slicer scripts
# use and excludes names that are also virtual methods, which a Python attribute would shadow for PySide).
PROPERTY_NAMES = (
    "enabled", "visible", "text", "checked", "checkable", "value", "minimum", "maximum", "singleStep",
    "decimals", "toolTip", "statusTip", "whatsThis", "placeholderText", "currentIndex", "currentText",
    "plainText", "readOnly", "objectName", "echoMode", "title", "suffix", "prefix", "editable",
    "textVisible", "format", "wordWrap", "count", "maxCount", "flat", "autoExclusive", "windowTitle",
    "styleSheet", "interval", "active", "textFormat", "openExternalLinks", "alignment", "maxVisibleItems",
    "insertPolicy", "duplicatesEnabled", "frame", "clearButtonEnabled", "keyboardTracking",
    "specialValueText", "tracking", "orientation", "invertedAppearance", "collapsible",
)


def _make_property(name: str) -> property:
    def fget(self):
        return self.property(name)

    def fset(self, value):
        QtCore.QObject.setProperty(self, name, value)

    return property(fget, fset, doc=f"Qt property '{name}' (PythonQt-style attribute)")


def _signal_name(signature: str) -> str:
    name = signature.strip()
    if name[:1] in "12":  # SIGNAL()/SLOT() macro prefixes
        name = name[1:]
    return name.split("(", 1)[0].strip()


class PythonQtMixin:
    """``connect``/``disconnect`` by signal signature, as PythonQt offers on every QObject."""

    def __getattribute__(self, name):
        # PySide resolves ``connect``/``disconnect`` on instances to QObject's own before the class
        # dictionary; route them to the PythonQt-style methods below.
        if name == "connect":
            return types.MethodType(PythonQtMixin._pythonqt_connect, self)
        if name == "disconnect":
            return types.MethodType(PythonQtMixin._pythonqt_disconnect, self)
        return super().__getattribute__(name)

    def _pythonqt_connect(self, signal, slot):
        getattr(self, _signal_name(signal)).connect(slot)
        return True

    def _pythonqt_disconnect(self, signal=None, slot=None):
        if signal is None:
            return QtCore.QObject.disconnect(self)
        sig = getattr(self, _signal_name(signal))
        try:
            if slot is None:
                sig.disconnect()
            else:
                sig.disconnect(slot)
        except (RuntimeError, TypeError):
            return False
        return True


def _qt_property_names(cls) -> set[str]:
    mo = cls.staticMetaObject
    return {mo.property(i).name() for i in range(mo.propertyCount())}


def add_pythonqt_properties(cls):
    """Give a Python-defined widget class the PythonQt attributes of its Qt properties (``enabled``...),
    except those the class (or a Python base) already defines."""
    names = _qt_property_names(cls)
    defined = set()
    for klass in cls.__mro__:
        if klass is not object and not klass.__module__.startswith(("PySide6", "shiboken6")):
            defined |= set(vars(klass))
    for name in PROPERTY_NAMES:
        if name in names and name not in defined:
            setattr(cls, name, _make_property(name))
    return cls


def lay_out_in_row(parent, *children) -> None:
    """The stand-ins' composite widgets (a path line edit and its button, a spin box...): ``children`` side by
    side in ``parent``, with no margins."""
    layout = QtWidgets.QHBoxLayout(parent)
    layout.setContentsMargins(0, 0, 0, 0)
    for child in children:
        layout.addWidget(child)


def wrap_class(base, module_name: str = __name__):
    """A PythonQt-behaving subclass of a PySide6 QObject class."""
    names = _qt_property_names(base)
    attrs = {name: _make_property(name) for name in PROPERTY_NAMES if name in names}
    attrs["__module__"] = module_name
    attrs["__doc__"] = f"Stand-in for PythonQt's qt.{base.__name__} (PySide6 subclass)."
    return type(base.__name__, (PythonQtMixin, base), attrs)


_WRAPPED_NAMES = (
    "QWidget", "QFrame", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton", "QLineEdit",
    "QComboBox", "QSpinBox", "QDoubleSpinBox", "QSlider", "QProgressBar", "QGroupBox", "QTextEdit",
    "QPlainTextEdit", "QTextBrowser", "QTabWidget", "QStackedWidget", "QScrollArea", "QDialog",
    "QMessageBox", "QInputDialog", "QListWidget", "QButtonGroup", "QTimer", "QAction", "QMenu",
    "QSplitter", "QDialogButtonBox", "QMainWindow",
)

_wrapped: dict[str, type] = {}
for _name in _WRAPPED_NAMES:
    _base = getattr(QtWidgets, _name, None) or getattr(QtGui, _name, None) or getattr(QtCore, _name)
    _wrapped[_name] = wrap_class(_base)
globals().update(_wrapped)


class QFileDialog(wrap_class(QtWidgets.QFileDialog)):
    """Qt's QFileDialog whose static choosers open no dialog (a modal one would block the tests): each answers
    the next path a test queued in ``answers``, or "" (what Qt returns when the user cancels), and appends its
    arguments to ``calls``. Signatures as qtbase src/widgets/dialogs/qfiledialog.h declares them."""

    answers: list[str] = []
    calls: list[dict] = []

    @staticmethod
    def getExistingDirectory(parent=None, caption="", dir="", options=QtWidgets.QFileDialog.ShowDirsOnly):
        QFileDialog.calls.append(dict(parent=parent, caption=caption, dir=dir, options=options))
        return QFileDialog.answers.pop(0) if QFileDialog.answers else ""


_wrapped["QFileDialog"] = QFileDialog

QObject = QtCore.QObject
Qt = QtCore.Qt
QSettings = QtCore.QSettings
QApplication = QtWidgets.QApplication
QIcon = QtGui.QIcon
QPixmap = QtGui.QPixmap
QColor = QtGui.QColor
QCursor = QtGui.QCursor
QVector3D = QtGui.QVector3D
QPoint = QtCore.QPoint
QSize = QtCore.QSize
QUrl = QtCore.QUrl
QVBoxLayout = QtWidgets.QVBoxLayout
QHBoxLayout = QtWidgets.QHBoxLayout
QFormLayout = QtWidgets.QFormLayout
QGridLayout = QtWidgets.QGridLayout
QSizePolicy = QtWidgets.QSizePolicy
QSpacerItem = QtWidgets.QSpacerItem


def wrapped_classes() -> dict[str, type]:
    """Class name -> stand-in class, for the .ui loader."""
    return dict(_wrapped)


def __getattr__(name: str):
    for mod in (QtWidgets, QtGui, QtCore):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"stand-in qt has no attribute {name!r}")
