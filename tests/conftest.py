"""Shared fixtures: tiny seeded random models built offline from a config."""

from __future__ import annotations

import os

import pytest
import torch

from sequoia.files import CACHE_ENV, cache_dir
from sequoia.models import tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_profile_cache(tmp_path_factory):
    """Profiles measured by tests go to a private cache (this device's real profiles stay
    untouched); converted models are shared with the real cache, so none is converted twice."""
    real, root = cache_dir(), tmp_path_factory.mktemp("sequoia-cache")
    (real / "models").mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(real / "models", target_is_directory=True)
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(root)
    yield root
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(scope="session")
def tiny_target():
    """A 2-layer random Llama (vocab 64) used as the target in unit tests."""
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_draft():
    """A different random Llama with the same vocabulary: an imperfect draft."""
    return tiny_llama(seed=1)
