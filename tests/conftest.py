"""Shared test setup: deterministic, single-threaded, uncompiled optimizer steps, and a
throwaway NANOCHAT_BASE_DIR so no test touches ~/.cache/nanochat."""

import os

import pytest
import torch

os.environ.setdefault("NANOCHAT_COMPILE_OPTIM", "0")
# engines decode eagerly: an ahead-of-time build per tiny test model would cost ~20 s each;
# tests/test_aot.py builds one and turns it on where it is under test
os.environ.setdefault("NANOCHAT_ENGINE_AOT", "0")
torch.set_num_threads(1)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path_factory, monkeypatch):
    if "NANOCHAT_BASE_DIR_KEEP" not in os.environ:
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("nanochat_base")))
