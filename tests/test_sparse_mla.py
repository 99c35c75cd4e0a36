"""Sparse MLA attention, prefill over a flat KV and decode over paged bf16/FP8 caches, against the
float64 reference: -1 padding, duplicate indices, rows without any index, every head count."""

import math

import pytest
import torch

from indexcache_ops import ops
from indexcache_ops import reference as ref

from _util import (PagedMla, check_attention, mla_rows, move, paged_mla_inputs, poisoned, randn,
                   random_indices)

SM_SCALE = ref.MLA_DIM ** -0.5


def prefill_inputs(gen, S, N, Hq, topk, pad_frac=0.2):
    q = randn(gen, S, Hq, ref.MLA_DIM, dtype=torch.bfloat16)
    kv = mla_rows(gen, N).reshape(N, 1, ref.MLA_DIM)
    return q, kv, random_indices(gen, S, topk, [N] * S, pad_frac)


def run_prefill(q, kv, indices, sm_scale, device):
    """The op through out=/lse= (poisoned) and functionally, both checked against the reference."""
    want = ref.sparse_mla_prefill(q, kv, indices, sm_scale)
    args = [t.to(device) for t in (q, kv, indices)]
    out = poisoned((*q.shape[:2], ref.MLA_LATENT), torch.bfloat16, device)
    lse = poisoned(q.shape[:2], torch.float32, device)
    got = ops.sparse_mla_prefill(*args, sm_scale, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    check_attention(out, lse, *want)
    o, l = ops.sparse_mla_prefill(*args, sm_scale)
    assert o.dtype == torch.bfloat16 and l.dtype == torch.float32
    check_attention(o, l, *want)
    return o, l


@pytest.mark.parametrize("Hq,S", [(16, 9), (32, 7), (64, 5), (128, 3)])
@pytest.mark.parametrize("topk", [37, 128])
def test_sparse_mla_prefill(gen, device, Hq, S, topk):
    run_prefill(*prefill_inputs(gen, S, 301, Hq, topk), SM_SCALE, device)


def test_sparse_mla_prefill_topk_2048(gen, device):
    run_prefill(*prefill_inputs(gen, 2, 3000, 16, 2048, pad_frac=0.05), SM_SCALE, device)


@pytest.mark.parametrize("sm_scale", [0.01, 0.2])
def test_sparse_mla_prefill_sm_scale(gen, device, sm_scale):
    run_prefill(*prefill_inputs(gen, 6, 500, 16, 64), sm_scale, device)


def test_sparse_mla_prefill_no_valid_index(gen, device):
    q, kv, indices = prefill_inputs(gen, 6, 100, 32, 64)
    indices[1] = -1
    indices[4] = -1
    o, l = run_prefill(q, kv, indices, SM_SCALE, device)
    assert torch.all(o[[1, 4]] == 0) and torch.all(l[[1, 4]] == -math.inf)


def test_sparse_mla_prefill_duplicates_count_twice(gen, device):
    # Independent of the reference: one key repeated m times gives softmax weight 1 on that
    # row (out = its V) and lse = score + log(m).
    Hq, m = 16, 5
    q, kv, _ = prefill_inputs(gen, 2, 10, Hq, 1)
    indices = torch.tensor([[3] * m + [-1] * 3, [3, 7, 7, -1, -1, -1, -1, -1]], dtype=torch.int32)
    o, l = run_prefill(q, kv, indices, SM_SCALE, device)
    v = kv[3, 0].double()
    score = SM_SCALE * (q[0].double() @ v)
    torch.testing.assert_close(l[0].cpu().double(), score + math.log(m), rtol=0, atol=1e-3)
    torch.testing.assert_close(o[0].cpu().double(), v[: ref.MLA_LATENT].expand(Hq, -1), rtol=1e-2, atol=1e-2)


def test_sparse_mla_prefill_large_logits(gen, device):
    # Scores in the hundreds: the softmax must subtract its running max, not overflow to NaN.
    q, kv, indices = prefill_inputs(gen, 4, 200, 16, 64)
    run_prefill(q * 8, kv, indices, 0.5, device)


def test_sparse_mla_prefill_scores_rising_across_tiles(gen, device):
    # The GPU kernel keeps its softmax reference until a tile's row max exceeds it by 2^8 (in
    # exp2 units) and only then rescales O. Here a head's scores climb by ~18 (q . w) such units
    # per 64-key tile: heads with |q . w| < 0.44 stay on their reference for several tiles (P up
    # to 2^8), the others move it every tile (or never, where q . w < 0); over the 8 tiles the
    # rows with q . w > 1 climb past 2^128, so a reference that never moved overflows to NaN.
    # 264 query rows: enough CTAs that the top-k is not split (a split CTA sees 2 tiles).
    S, N, Hq = 264, 512, 16
    q = randn(gen, S, Hq, ref.MLA_DIM, dtype=torch.bfloat16)
    w = randn(gen, ref.MLA_DIM)
    w /= w.norm()
    ramp = 300.0 * (torch.arange(N) // 64).float() + 2.0 * randn(gen, N)
    kv = (ramp[:, None] * w + 0.05 * randn(gen, N, ref.MLA_DIM)).to(torch.bfloat16)
    indices = torch.arange(N, dtype=torch.int32).expand(S, N).contiguous()  # row i in tile i // 64
    run_prefill(q, kv.reshape(N, 1, ref.MLA_DIM), indices, SM_SCALE, device)


# ---- decode


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("next_n", [1, 2, 3, 4])
@pytest.mark.parametrize("Hq", [16, 64, 128])
def test_sparse_mla_decode(gen, device, Hq, next_n, fp8):
    x = paged_mla_inputs(gen, [150, 64, 1, 70], next_n, Hq, 40 if Hq < 128 else 16, fp8)
    run_decode(x, device)


def run_decode(x: PagedMla, device, lse_tol=1e-3):
    want = ref.sparse_mla_decode(*x.args(), SM_SCALE)
    lead = x.q.shape[:3]
    out = poisoned((*lead, ref.MLA_LATENT), torch.bfloat16, device)
    lse = poisoned(lead, torch.float32, device)
    dev = move(x, device)
    got = ops.sparse_mla_decode(*dev.args(), SM_SCALE, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    check_attention(out, lse, *want, lse_tol=lse_tol)
    check_attention(*ops.sparse_mla_decode(*dev.args(), SM_SCALE), *want, lse_tol=lse_tol)


def test_sparse_mla_decode_topk_2048(gen, device):
    run_decode(paged_mla_inputs(gen, [3000], 1, 16, 2048, fp8=True), device)


@pytest.mark.parametrize("tail", ["minus1", "huge"])
def test_sparse_mla_decode_block_table_tail(gen, device, tail):
    run_decode(paged_mla_inputs(gen, [100, 250], 2, 32, 64, fp8=True, tail=tail), device)


def test_sparse_mla_decode_fp8_arbitrary_scales(gen, device):
    # Non-power-of-two scales make e4m3 * scale inexact in bf16: a kernel that dequantises to
    # bf16 before its matmul moves lse by up to ~2^-9 * |score| terms, hence the looser bound.
    x = paged_mla_inputs(gen, [120, 77, 64], 3, 32, 48, fp8=True, pow2_scale=False)
    run_decode(x, device, lse_tol=5e-3)


def test_sparse_mla_decode_no_valid_index(gen, device):
    x = paged_mla_inputs(gen, [80, 0], 2, 16, 32, fp8=False)
    x.indices[0, 1] = -1
    assert torch.all(x.indices[1] == -1)  # a zero-length sequence
    run_decode(x, device)
