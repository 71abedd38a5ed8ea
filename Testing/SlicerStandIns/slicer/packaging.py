"""STAND-IN for ``slicer.packaging`` (test use only), after Slicer's ``Base/Python/slicer/packaging.py`` (main; the
module appeared in Slicer 5.12): ``load_requirements``, ``pip_check``, ``pip_ensure`` and ``pip_install`` with
Slicer's signatures (held by Testing/Python/test_slicer_api_signatures.py) and its behaviour where RCMed relies
on it: ``pip_ensure`` installs only what ``pip_check`` finds missing, skips everything in testing mode
(``skip_in_testing``), and raises RuntimeError when the user declines its prompt. Installing is recorded in
``ensureCalls`` / ``slicer.util.pipInstallCalls`` instead of done.
"""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement

ensureCalls: list[dict] = []


def _to_requirements(reqs) -> list[Requirement]:
    if isinstance(reqs, str):
        return [Requirement(reqs)]
    if isinstance(reqs, Requirement):
        return [reqs]
    return [Requirement(r) if isinstance(r, str) else r for r in reqs]


def load_requirements(path) -> list[Requirement]:
    reqs = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("-"):
            reqs.append(Requirement(line))
    return reqs


def pip_check(req, _seen=None) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    reqs = _to_requirements(req)
    try:
        return all(version(r.name) in r.specifier for r in reqs)
    except PackageNotFoundError:
        return False


def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
               requester=None, skip_in_testing=True, show_progress=True):
    import slicer

    missing = [r for r in _to_requirements(requirements) if not pip_check(r)]
    if not missing:
        return None
    if skip_in_testing and slicer.app.testingEnabled():
        return None  # Slicer logs "Testing mode is enabled: skipping pip_ensure" and installs nothing
    if prompt_install and not slicer.util.confirmOkCancelDisplay(
            "\n".join(f"- {r}" for r in missing), requester or "Install Python Packages"):
        raise RuntimeError("User declined package installation")
    ensureCalls.append({"requirements": [str(r) for r in missing], "prompt_install": prompt_install,
                        "requester": requester, "skip_in_testing": skip_in_testing})
    return None


def pip_install(requirements, constraints=None, no_deps_requirements=None, skip_packages=None, blocking=True,
                show_progress=True, requester=None, logCallback=None, completedCallback=None):
    import slicer

    if no_deps_requirements is not None:
        slicer.util.pip_install(["--no-deps", *([no_deps_requirements] if isinstance(no_deps_requirements, str)
                                                 else no_deps_requirements)])
    slicer.util.pip_install(requirements)
    return None
