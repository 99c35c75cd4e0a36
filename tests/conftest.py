"""Fixtures of the op tests: a per-test seeded generator and the device parametrisation."""

import os
import zlib

import pytest
import torch

from _util import DEVICES


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id, so every test draws its own inputs and a failure
    reproduces; set INDEXCACHE_TEST_SEED to draw a different set (soak runs)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("INDEXCACHE_TEST_SEED", "0"))
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param

