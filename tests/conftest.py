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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a GPU, a test that reaches an op whose CUDA kernel has not landed yet is reported as
    xfail naming the op, not as a pass and not as a bug: the ops raise NotImplementedError
    for exactly that case (csrc/ops/dispatch.h)."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(NotImplementedError):
        message = str(call.excinfo.value)
        if "is not implemented on CUDA yet" in message:
            report.outcome = "skipped"
            report.wasxfail = "CUDA kernel not landed: " + message.splitlines()[0][:160]
