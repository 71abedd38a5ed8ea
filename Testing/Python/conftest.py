"""Suite-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_class_registry(tmp_path_factory, monkeypatch):
    """Engines given no registry use $RCMED_REGISTRY; never let a test write into the user's own."""
    monkeypatch.setenv("RCMED_REGISTRY", str(tmp_path_factory.mktemp("registry")))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the cores are shared, and OpenMP oversubscription is slow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
