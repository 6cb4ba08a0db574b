"""Shared fixtures: tiny seeded random models built offline from a config."""

from __future__ import annotations

import pytest
import torch

from sequoia.models import tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_target():
    """A 2-layer random Llama (vocab 64) used as the target in unit tests."""
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_draft():
    """A different random Llama with the same vocabulary: an imperfect draft."""
    return tiny_llama(seed=1)
