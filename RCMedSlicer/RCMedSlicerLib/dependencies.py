"""Which Python packages the extension needs in Slicer's Python, per install profile.

* ``local``: everything a local engine needs, except PyTorch (installed through the PyTorch extension's
  ``PyTorchUtils``, which picks the build matching the GPU driver) and the packages Slicer itself ships and
  must not be replaced (numpy, SimpleITK). Server-only packages are left out.
* ``remote``: only what ``rcmed_engine.client.RemoteEngine`` needs; no PyTorch at all.

The lists live in ``Resources/requirements-<profile>.txt`` (shipped with the module); a test keeps them in
step with the project's ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Callable

PROFILES = ("local", "remote")
# Shipped by Slicer and relied on by Slicer itself: never reinstall them into Slicer's Python.
SLICER_PROVIDED = ("numpy", "simpleitk")
# Installed through PyTorchUtils (SlicerPyTorch) rather than pip.
TORCH = "torch"
MIN_TORCH = ">=2.1"
# Only the HTTP server needs these; Slicer is a client.
SERVER_ONLY = ("fastapi", "uvicorn")

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
    """The project's dependencies minus what Slicer provides, PyTorch and server-only packages."""
    skip = set(SLICER_PROVIDED) | {TORCH} | set(SERVER_ONLY)
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
