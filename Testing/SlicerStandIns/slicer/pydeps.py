"""STAND-IN for ``slicer.pydeps`` (test use only), after Slicer's ``Base/Python/slicer/pydeps.py``:
``load_requirements``, ``pip_check`` and ``pip_ensure`` with Slicer's signatures. ``pip_ensure`` records
what it was asked to install in ``ensureCalls`` instead of installing.
"""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement

ensureCalls: list[dict] = []


def load_requirements(path) -> list[Requirement]:
    reqs = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("-"):
            reqs.append(Requirement(line))
    return reqs


def pip_check(req) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    if isinstance(req, list):
        return all(pip_check(r) for r in req)
    try:
        return req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        return False


def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
               requester=None, skip_in_testing=True, show_progress=True):
    ensureCalls.append({"requirements": [str(r) for r in requirements], "prompt_install": prompt_install,
                        "requester": requester, "skip_in_testing": skip_in_testing})
    return None
