"""Sparse MLA on CUDA at serving shapes, against a float64 reference written here (gather + softmax
in float64 on the GPU; it shares nothing with indexcache_ops.reference): head counts 16/64/128,
top-k with and without a tail tile, duplicates, all -1 rows, out-of-range indices and block-table
entries (masked on the GPU, never read: the unused cache rows hold NaN), bf16 and FP8 caches,
next_n 1..4, split-k batches, bitwise reproducibility over poisoned outputs, and CUDA-graph replay
after the indices and the block table change in place.

Tests whose id contains "large" are the slow ones (left out of sanitizer runs)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from indexcache_ops import ops

from _util import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

DIM, LATENT, ROPE, PAGE = 576, 512, 64, 64
FP8_ROW = 656
SM_SCALE = DIM ** -0.5
DEV = "cuda"
NEG_INF = -math.inf
# Values an index or a block-table entry may hold that name nothing: all must be masked.
BAD_INDEX = [-2, -7, -2**31, 2**31 - 1]


def cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(gen, *shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen, device=DEV).to(dtype)


def randint(gen, low, high, *shape):
    return torch.randint(low, high, shape, generator=gen, device=DEV)


def pick(gen, values, *shape):
    v = torch.tensor(values, dtype=torch.long, device=DEV)
    return v[randint(gen, 0, len(values), *shape)]


# ---- reference -----------------------------------------------------------------------------------


def reference(q, rows_of, valid, sm_scale, chunk=8):
    """q [T, H, 576] bf16; rows_of(t0, t1) -> [t1 - t0, k, 576] float64 KV rows of those queries
    (anything where invalid); valid [T, k] bool -> out [T, H, 512] f64, lse [T, H] f64."""
    T, H, _ = q.shape
    out = torch.zeros(T, H, LATENT, dtype=torch.float64, device=DEV)
    lse = torch.full((T, H), NEG_INF, dtype=torch.float64, device=DEV)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        v = valid[t0:t1]
        rows = torch.where(v[..., None], rows_of(t0, t1), 0.0)
        s = torch.einsum("thd,tkd->thk", q[t0:t1].double(), rows) * sm_scale
        s = s.masked_fill(~v[:, None, :], NEG_INF)
        l = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - l[..., None]).nan_to_num(0.0)  # a row without keys: all weights 0
        out[t0:t1] = torch.einsum("thk,tkd->thd", p, rows[..., :LATENT])
        lse[t0:t1] = l
    return out, lse


def prefill_reference(q, kv, indices, sm_scale):
    N = kv.shape[0]
    flat = kv.reshape(N, DIM)
    idx = indices.long()
    valid = (idx >= 0) & (idx < N)
    safe = idx.clamp(0, max(N - 1, 0))
    return reference(q, lambda a, b: flat[safe[a:b]].double(), valid, sm_scale)


def cache_rows_f64(kv_cache):
    """Every cache row as float64 [pages * 64, 576] (FP8: e4m3 * scale, exactly)."""
    if kv_cache.dtype == torch.bfloat16:
        return kv_cache.reshape(-1, DIM).double()
    raw = kv_cache.reshape(-1, FP8_ROW)
    lat = raw[:, :LATENT].contiguous().view(torch.float8_e4m3fn).double().reshape(-1, 4, 128)
    scale = raw[:, LATENT:LATENT + 16].contiguous().view(torch.float32).double()
    rope = raw[:, LATENT + 16:].contiguous().view(torch.bfloat16).double()
    return torch.cat([(lat * scale[..., None]).reshape(-1, LATENT), rope], dim=1)


def decode_reference(q, kv_cache, indices, block_table, sm_scale):
    B, n, H, _ = q.shape
    k = indices.shape[-1]
    rows = cache_rows_f64(kv_cache)
    pages, max_pages = kv_cache.shape[0], block_table.shape[1]
    pos = indices.long().reshape(B, n * k)
    in_table = (pos >= 0) & (pos < max_pages * PAGE)
    slot = torch.where(in_table, pos // PAGE, 0)
    page = torch.gather(block_table.long(), 1, slot)
    valid = in_table & (page >= 0) & (page < pages)
    flat = torch.where(valid, page * PAGE + pos % PAGE, 0).reshape(B * n, k)
    out, lse = reference(q.reshape(B * n, H, DIM), lambda a, b: rows[flat[a:b]],
                         valid.reshape(B * n, k), sm_scale)
    return out.reshape(B, n, H, LATENT), lse.reshape(B, n, H)


# ---- comparison ----------------------------------------------------------------------------------


def _where_wrong(got, want, lead: int) -> str:
    """Which query rows / head groups carry the error (for a failure message)."""
    g = got.reshape(-1, got.shape[-2], got.shape[-1]) if lead else got
    w = want.reshape(g.shape)
    per_row = ((g - w).norm(dim=(1, 2)) / w.norm(dim=(1, 2)).clamp_min(1e-30)).cpu()
    per_head = ((g - w).norm(dim=(0, 2)) / w.norm(dim=(0, 2)).clamp_min(1e-30)).cpu()
    bad_rows = (per_row > 2e-2).nonzero().flatten().tolist()
    bad_heads = (per_head > 2e-2).nonzero().flatten().tolist()
    return (f"rows with error > 2e-2: {len(bad_rows)}/{per_row.numel()} {bad_rows[:8]}; "
            f"heads: {bad_heads[:16]}; worst row err {per_row.max():.3g}")


def check(out, lse, want_out, want_lse, lse_tol=1e-3, out_tol=2e-2):
    out, lse = out.double(), lse.double()
    assert not torch.isnan(out).any(), f"NaN in out ({int(torch.isnan(out).sum())} values)"
    assert not torch.isnan(lse).any(), f"NaN in lse ({int(torch.isnan(lse).sum())} values)"
    empty = torch.isinf(want_lse)
    assert torch.all(lse[empty] == NEG_INF), "lse of a query/head without keys must be -inf"
    assert torch.all(out[empty] == 0), "out of a query/head without keys must be 0"
    full = ~empty
    if not full.any():
        return
    # Rows are per (query, head): compare the non-empty ones.
    o, w = out[full], want_out[full]
    err = ((o - w).norm() / w.norm()).item()
    if err >= out_tol:
        gz = torch.where(full[..., None], out, 0).reshape(-1, *out.shape[-2:])
        wz = torch.where(full[..., None], want_out, 0).reshape(-1, *out.shape[-2:])
        pytest.fail(f"out rel err {err:.3g} >= {out_tol}: {_where_wrong(gz, wz, 0)}")
    lse_err = (lse[full] - want_lse[full]).abs().max().item()
    assert lse_err < lse_tol, f"lse max abs err {lse_err:.3g} >= {lse_tol}"


def poisoned_outputs(lead):
    out = torch.full((*lead, LATENT), float("nan"), dtype=torch.bfloat16, device=DEV)
    lse = torch.full(tuple(lead), float("nan"), dtype=torch.float32, device=DEV)
    return out, lse


# ---- inputs --------------------------------------------------------------------------------------


def prefill_inputs(gen, S, N, Hq, k, pad=0.1, bad=0.05):
    """-1 padding, out-of-range indices, and duplicates (k draws from N with repeats, plus
    column 1 copying column 0)."""
    q = randn(gen, S, Hq, DIM)
    kv = randn(gen, N, 1, DIM)
    idx = randint(gen, 0, N, S, k)
    if k > 1:
        idx[:, 1] = idx[:, 0]
    r = torch.rand(S, k, generator=gen, device=DEV)
    idx = torch.where(r < pad, -1, idx)
    wild = pick(gen, BAD_INDEX + [N, N + 1, N + 4096], S, k)
    idx = torch.where((r >= pad) & (r < pad + bad), wild, idx)
    return q, kv, idx.int()


def fp8_rows(gen, x, pow2):
    """bf16 rows [R, 576] -> FP8 cache rows [R, 656] uint8 (per-128 scales amax / 448, optionally
    rounded up to a power of two)."""
    R = x.shape[0]
    lat = x[:, :LATENT].float().reshape(R, 4, 128)
    scale = lat.abs().amax(dim=-1).clamp_min(1e-4) / 448.0
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    codes = (lat / scale[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    out = torch.empty(R, FP8_ROW, dtype=torch.uint8, device=DEV)
    out[:, :LATENT] = codes.reshape(R, LATENT).view(torch.uint8)
    out[:, LATENT:LATENT + 16] = scale.contiguous().view(torch.uint8).reshape(R, 16)
    out[:, LATENT + 16:] = x[:, LATENT:].contiguous().view(torch.uint8).reshape(R, 2 * ROPE)
    return out


def decode_inputs(gen, lens, next_n, Hq, k, fp8, pow2=True, pad=0.1, bad=0.05):
    """A shuffled paged cache whose unused rows (spare pages, the end of each last page) are NaN,
    block tables whose unused columns hold garbage page ids, and positions drawn from each
    sequence with repeats, -1 padding, positions past the table and positions whose table entry is
    garbage."""
    B = len(lens)
    need = [math.ceil(n / PAGE) for n in lens]
    max_pages = max(need) + 2
    pages = sum(need) + 3
    perm = torch.randperm(pages, generator=gen, device=DEV)
    table = pick(gen, BAD_INDEX + [-1, pages, pages + 5, 2**30], B, max_pages)
    rows = torch.full((pages * PAGE, DIM), float("nan"), dtype=torch.bfloat16, device=DEV)
    used = 0
    for b, n in enumerate(lens):
        table[b, : need[b]] = perm[used: used + need[b]]
        used += need[b]
        if n:
            pos = torch.arange(n, device=DEV)
            rows[table[b, pos // PAGE] * PAGE + pos % PAGE] = randn(gen, n, DIM)
    if fp8:
        raw = fp8_rows(gen, rows.nan_to_num(0.0), pow2)
        nan_rows = torch.isnan(rows).any(dim=1)
        raw[nan_rows, :LATENT] = 0x7F                                   # e4m3 NaN
        raw[nan_rows, LATENT:] = torch.tensor([0x00, 0x00, 0xC0, 0x7F] * 4 + [0xC0, 0x7F] * ROPE,
                                              dtype=torch.uint8, device=DEV)  # NaN scales, rope
        cache = raw.reshape(pages, PAGE, 1, FP8_ROW)
    else:
        cache = rows.reshape(pages, PAGE, 1, DIM)
    q = randn(gen, B, next_n, Hq, DIM)
    lim = torch.tensor(lens, device=DEV).repeat_interleave(next_n).reshape(B, next_n, 1)
    idx = (torch.rand(B, next_n, k, generator=gen, device=DEV) * lim).long()
    r = torch.rand(B, next_n, k, generator=gen, device=DEV)
    idx = torch.where((r < pad) | (lim == 0), -1, idx)
    # Masked on the GPU: past the table, below -1, or in a column whose entry is garbage.
    first_unused = torch.tensor(need, device=DEV).reshape(B, 1, 1) * PAGE
    garbage_col = first_unused + randint(gen, 0, 2 * PAGE, B, next_n, k)
    past_table = pick(gen, BAD_INDEX + [max_pages * PAGE, max_pages * PAGE + 63], B, next_n, k)
    wild = torch.where(r < pad + bad / 2, garbage_col, past_table)
    idx = torch.where((r >= pad) & (r < pad + bad) & (lim > 0), wild, idx)
    return q, cache, idx.int(), table.int()


# ---- prefill -------------------------------------------------------------------------------------


def _prefill_params():
    out = []
    for Hq in (16, 64, 128):
        for k in (64, 100, 320, 512, 2048):
            S = 256 if k <= 512 else 96
            tag = "large" if k == 2048 or (Hq == 128 and k == 512) else "small"
            out.append(pytest.param(Hq, k, S, id=f"{tag}-Hq{Hq}-k{k}-S{S}"))
    return out


@pytest.mark.parametrize("Hq,k,S", _prefill_params())
def test_prefill_matches_reference(Hq, k, S):
    gen = cuda_gen(1000 * Hq + k)
    q, kv, idx = prefill_inputs(gen, S, 4096, Hq, k)
    want = prefill_reference(q, kv, idx, SM_SCALE)
    out, lse = poisoned_outputs((S, Hq))
    got = ops.sparse_mla_prefill(q, kv, idx, SM_SCALE, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    check(out, lse, *want)


@pytest.mark.parametrize("Hq", [16, 64, 128])
@pytest.mark.parametrize("S", [1, 3, 40])  # few queries: the split-k path
def test_prefill_split_k(Hq, S):
    gen = cuda_gen(77 + Hq + S)
    q, kv, idx = prefill_inputs(gen, S, 3000, Hq, 2048 - 37)
    check(*ops.sparse_mla_prefill(q, kv, idx, SM_SCALE), *prefill_reference(q, kv, idx, SM_SCALE))


@pytest.mark.parametrize("Hq", [64, 128])  # 128: two head-group CTAs per query
def test_prefill_masked_rows(Hq):
    """All -1, all out of range, a single valid key at the tail, and one row mixing everything."""
    gen = cuda_gen(5 + Hq)
    S, N, k = 6, 500, 130
    q, kv, idx = prefill_inputs(gen, S, N, Hq, k)
    idx[0] = -1
    idx[1] = pick(gen, BAD_INDEX + [N, N + 1], k).int()
    idx[2] = -1
    idx[2, k - 1] = 17
    idx[3, :64] = -1  # a whole tile masked, then valid keys
    want = prefill_reference(q, kv, idx, SM_SCALE)
    out, lse = ops.sparse_mla_prefill(q, kv, idx, SM_SCALE)
    check(out, lse, *want)
    assert torch.all(out[:2] == 0) and torch.all(lse[:2] == NEG_INF)
    # one key: softmax weight 1 on its row
    torch.testing.assert_close(out[2].double(), kv[17, 0, :LATENT].double().expand(Hq, -1),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("Hq", [64, 128])
def test_prefill_empty_kv(Hq):
    """N = 0: every index is masked, and no KV row may be read."""
    gen = cuda_gen(8)
    q = randn(gen, 5, Hq, DIM)
    kv = torch.empty(0, 1, DIM, dtype=torch.bfloat16, device=DEV)
    idx = torch.full((5, 256), -1, dtype=torch.int32, device=DEV)
    out, lse = poisoned_outputs((5, Hq))
    ops.sparse_mla_prefill(q, kv, idx, SM_SCALE, out=out, lse=lse)
    assert torch.all(out == 0) and torch.all(lse == NEG_INF)


def test_prefill_duplicates_count_twice():
    gen = cuda_gen(6)
    Hq, m = 128, 7
    q = randn(gen, 2, Hq, DIM)
    kv = randn(gen, 50, 1, DIM)
    idx = torch.full((2, 200), -1, dtype=torch.int32, device=DEV)
    idx[0, 100:100 + m] = 9
    idx[1, :3] = torch.tensor([9, 11, 11], dtype=torch.int32)
    out, lse = ops.sparse_mla_prefill(q, kv, idx, SM_SCALE)
    score = SM_SCALE * (q[0].double() @ kv[9, 0].double())
    torch.testing.assert_close(lse[0].double(), score + math.log(m), rtol=0, atol=1e-3)
    check(out, lse, *prefill_reference(q, kv, idx, SM_SCALE))


def test_prefill_large_logits():
    gen = cuda_gen(7)
    q, kv, idx = prefill_inputs(gen, 16, 1000, 64, 300)
    q = (q.float() * 8).bfloat16()
    check(*ops.sparse_mla_prefill(q, kv, idx, 0.5), *prefill_reference(q, kv, idx, 0.5))


# ---- decode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("next_n", [1, 2, 3, 4])
@pytest.mark.parametrize("Hq", [16, 64, 128])
def test_decode_matches_reference(Hq, next_n, fp8):
    gen = cuda_gen(10 * Hq + next_n + 5 * fp8)
    x = decode_inputs(gen, [300, 0, 1000, 77, 64], next_n, Hq, 100, fp8)
    out, lse = poisoned_outputs(x[0].shape[:3])
    ops.sparse_mla_decode(*x, SM_SCALE, out=out, lse=lse)
    check(out, lse, *decode_reference(*x, SM_SCALE))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("B,next_n,Hq,k", [
    pytest.param(1, 1, 128, 2048, id="large-B1-n1-Hq128"),
    pytest.param(2, 4, 64, 2048, id="large-B2-n4-Hq64"),
    pytest.param(16, 2, 128, 2048, id="large-B16-n2-Hq128"),
    pytest.param(48, 1, 128, 512, id="large-B48-n1-Hq128"),
    pytest.param(256, 1, 16, 64, id="small-B256-n1-Hq16"),
    pytest.param(130, 3, 64, 100, id="large-B130-n3-Hq64"),
])
def test_decode_shapes(B, next_n, Hq, k, fp8):
    gen = cuda_gen(B * 31 + k + fp8)
    lens = randint(gen, 0, 2 * k + 200, B).tolist()
    lens[0] = max(lens[0], k + 5)
    x = decode_inputs(gen, lens, next_n, Hq, k, fp8)
    check(*ops.sparse_mla_decode(*x, SM_SCALE), *decode_reference(*x, SM_SCALE))


@pytest.mark.parametrize("next_n", [1, 3])
def test_decode_fp8_arbitrary_scales(next_n):
    # e4m3 * scale is inexact in bf16 for non-power-of-two scales: lse moves by ~2^-9 |score|.
    gen = cuda_gen(40 + next_n)
    x = decode_inputs(gen, [500, 130, 64, 2000], next_n, 128, 300, fp8=True, pow2=False)
    check(*ops.sparse_mla_decode(*x, SM_SCALE), *decode_reference(*x, SM_SCALE), lse_tol=5e-3)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_garbage_block_table(fp8):
    """Every index points into a garbage column or past the table: all masked, out 0, lse -inf."""
    gen = cuda_gen(50 + fp8)
    q, cache, idx, table = decode_inputs(gen, [200, 100], 2, 64, 90, fp8)
    need = torch.tensor([4, 2], device=DEV).reshape(2, 1, 1)
    idx = (need * PAGE + randint(gen, 0, 2 * PAGE, 2, 2, 90)).int()  # columns need, need + 1
    idx[0, 0, :10] = table.shape[1] * PAGE
    out, lse = ops.sparse_mla_decode(q, cache, idx, table, SM_SCALE)
    assert torch.all(out == 0) and torch.all(lse == NEG_INF)


# ---- reproducibility and CUDA graphs ------------------------------------------------------------


@pytest.mark.parametrize("case", ["prefill-split", "prefill", "decode-fp8-split", "decode-bf16"])
def test_bitwise_reproducible(case):
    gen = cuda_gen(60)
    if case.startswith("prefill"):
        S = 2 if case == "prefill-split" else 300
        x = prefill_inputs(gen, S, 2000, 128, 1000)
        call, lead = (lambda o, l: ops.sparse_mla_prefill(*x, SM_SCALE, out=o, lse=l)), (S, 128)
    else:
        B = 2 if "split" in case else 150
        x = decode_inputs(gen, [1500] * B, 2, 64, 1200, fp8="fp8" in case)
        call, lead = (lambda o, l: ops.sparse_mla_decode(*x, SM_SCALE, out=o, lse=l)), (B, 2, 64)
    first = None
    for _ in range(20):
        out, lse = poisoned_outputs(lead)
        call(out, lse)
        if first is None:
            first = (out.clone(), lse.clone())
            assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        else:
            assert torch.equal(out.view(torch.int16), first[0].view(torch.int16))
            assert torch.equal(lse.view(torch.int32), first[1].view(torch.int32))


# Capture allocates the split-k workspace from the graph's pool: without the caching allocator
# (compute-sanitizer runs set PYTORCH_NO_CUDA_MEMORY_CACHING=1) that is a cudaMalloc inside the
# capture, which CUDA forbids for any op.
needs_caching_allocator = pytest.mark.skipif(
    os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1",
    reason="CUDA-graph capture needs the caching allocator")


def _capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@needs_caching_allocator
@pytest.mark.parametrize("Hq", [64, 128])  # 128: two head-group CTAs per query
@pytest.mark.parametrize("S", [2, 200])  # split-k (workspace inside the graph) and not
def test_prefill_cuda_graph(S, Hq):
    gen = cuda_gen(70 + S + Hq)
    q, kv, idx = prefill_inputs(gen, S, 3000, Hq, 700)
    out, lse = poisoned_outputs((S, Hq))
    graph = _capture(lambda: ops.sparse_mla_prefill(q, kv, idx, SM_SCALE, out=out, lse=lse))
    for step in range(2):
        idx.copy_(prefill_inputs(gen, S, 3000, Hq, 700)[2])  # in place: the graph reads it
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, lse, *prefill_reference(q, kv, idx, SM_SCALE))
        eager = ops.sparse_mla_prefill(q, kv, idx, SM_SCALE)
        assert torch.equal(out.view(torch.int16), eager[0].view(torch.int16))


@needs_caching_allocator
@pytest.mark.parametrize("B", [1, 140])
def test_decode_cuda_graph(B):
    gen = cuda_gen(80 + B)
    lens = [700] * B
    q, cache, idx, table = decode_inputs(gen, lens, 2, 128, 600, fp8=True)
    out, lse = poisoned_outputs((B, 2, 128))
    graph = _capture(
        lambda: ops.sparse_mla_decode(q, cache, idx, table, SM_SCALE, out=out, lse=lse))
    for step in range(2):
        # New positions, and the pages of every sequence shuffled among themselves (the cache
        # rows move with them), all in place.
        _, cache2, idx2, table2 = decode_inputs(gen, lens, 2, 128, 600, fp8=True)
        cache.copy_(cache2)
        idx.copy_(idx2)
        table.copy_(table2)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, lse, *decode_reference(q, cache, idx, table, SM_SCALE))
