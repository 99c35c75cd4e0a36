"""torch.library.opcheck on every op and every .out overload (schema, fake tensors, autograd
registration, AOT dispatch), with small CPU inputs."""

import pytest
import torch

from _util import SMALL_ARGS

import indexcache_ops  # noqa: F401  (registers torch.ops.indexcache)

DEFAULT_TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                      "test_aot_dispatch_dynamic")
OUT_OPS = ["indexer_logits", "indexer_logits_paged", "topk", "indexer_topk", "indexer_topk_paged",
           "sparse_mla_prefill", "sparse_mla_decode"]


def opcheck(op, kwargs):
    """opcheck with the default test_utils. test_schema compares inputs before/after with
    torch.allclose, which has no float8 CPU kernel, so for ops taking e4m3 tensors it is replaced
    by the check it makes for a non-mutating schema: every input's bytes are unchanged."""
    fp8 = any(isinstance(v, torch.Tensor) and v.dtype == torch.float8_e4m3fn for v in kwargs.values())
    if not fp8:
        torch.library.opcheck(op, (), kwargs, test_utils=DEFAULT_TEST_UTILS)
        return
    torch.library.opcheck(op, (), kwargs, test_utils=DEFAULT_TEST_UTILS[1:])
    inputs = {k: _bytes(v) for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in ("out", "lse")}
    op(**kwargs)
    for name, before in inputs.items():
        assert torch.equal(_bytes(kwargs[name]), before), f"{name} was mutated"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).clone()


@pytest.mark.parametrize("name", sorted(SMALL_ARGS))
def test_opcheck_functional(name):
    opcheck(getattr(torch.ops.indexcache, name).default, SMALL_ARGS[name]("cpu"))


@pytest.mark.parametrize("name", OUT_OPS)
def test_opcheck_out(name):
    kwargs = SMALL_ARGS[name]("cpu")
    result = getattr(torch.ops.indexcache, name).default(**kwargs)
    if isinstance(result, tuple):
        kwargs.update(out=torch.empty_like(result[0]), lse=torch.empty_like(result[1]))
    else:
        kwargs.update(out=torch.empty_like(result))
    opcheck(getattr(torch.ops.indexcache, name).out, kwargs)
