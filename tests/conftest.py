"""Shared fixtures: an offline environment, a temporary store. Area-specific fixtures live in their tests.

Everything here is offline and CPU-only: HF_HUB_OFFLINE is forced, models are built in the tests.
"""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/measured-facts.md: avoids llama.cpp's first-call stall
os.environ.setdefault("INSTAR_CACHE", tempfile.mkdtemp(prefix="instar-cache-"))  # the Q8_0 teacher, once per session


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "instar.db"


@pytest.fixture
def store(db_path):
    from instar.datasets.store import Store

    return Store.open(db_path)
