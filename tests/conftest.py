"""Shared pytest set-up: deterministic, single-threaded-friendly defaults for CPU tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
