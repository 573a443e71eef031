"""Fixtures shared by the whole suite.

Every test runs with $MAPCLIP_CACHE in a temporary folder, so no test reads or
writes a user's model cache, and none can reach a network download by accident.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "mapclip-cache"
    monkeypatch.setenv("MAPCLIP_CACHE", str(cache))
    yield cache
    store = sys.modules.get("mapclip.engine.cache.store")
    if store is not None:   # each test starts without another test's embeddings
        store.CACHE.clear()
    accel = sys.modules.get("mapclip.engine.model.accel")
    if accel is not None:   # nor another test's text embeddings (some tests stub the encoder)
        accel.TEXT_CACHE.clear()


@pytest.fixture(scope="session")
def tiny_model():
    """The seeded random tiny model (test-tiny) on the CPU, fp32."""
    from mapclip.engine.model.models import load_model
    return load_model("test-tiny", device="cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny batches run faster on one torch thread (and do not fight other work)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def rig_folder(tmp_path_factory):
    """The rigged test model (tests/rigged.py) saved as a model folder: its path, for the CLI."""
    from tests.rigged import save_rigged_folder
    return str(save_rigged_folder(tmp_path_factory.mktemp("models") / "rigged"))
