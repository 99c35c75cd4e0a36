"""Indexer benchmarks: indexer_logits / indexer_topk (prefill) and their paged decode forms.

Counting (DESIGN §5): FLOPs = 2·H·D per visible (query, key) pair, compared with the fp8 matmul
ceiling; the paged forms also count bytes = q + every visible cache byte (D + 4 per token) +
weights + output written, compared with the copy ceiling (they are memory-bound).

Headline: prefill S = 4096, N = 65536, H = 64, D = 128 with causal-tail (ks = 0,
ke = N - S + t + 1) and full windows; decode B = 64, context 65536, next_n = 1. indexer_topk rows
(k = 2048) compare the op as it ships (its route picked by shape: the sampled route at these
sizes), its bounded-chunk route (`indexcache-chunked`, forced by INDEXCACHE_INDEXER_TOPK=chunked)
and the two-kernel path (indexer_logits then topk) they must beat. On CUDA the causal headline
runs a second time for indexer_topk with its last 256 queries zero (padding rows: equal scores).
Sweep: prefill S {2048, 4096, 8192} x N {8K, 32K, 64K, 128K} x {causal, full} x H {32, 64};
decode B {1, 8, 64, 128} x context {8K, 32K, 64K, 128K} x next_n {1, 2}.
"""
from __future__ import annotations

import itertools
import os
import sys
from types import SimpleNamespace

import torch

from bench import harness
from bench.harness import PAGE_SIZE, Case, Context, Impl

FAMILY = "indexer"
K = 2048
D = 128
PREFILL_HEADLINE = [dict(S=4096, N=65536, H=64, D=D, window=w) for w in ("causal", "full")]
# The causal headline with its last 256 queries zero, as padding rows of a served batch: every key
# of such a row scores 0, the equal scores the top-k must order by index alone.
PADDED_HEADLINE = dict(S=4096, N=65536, H=64, D=D, window="causal", zero_rows=256)
DECODE_HEADLINE = [dict(B=64, ctx=65536, next_n=1, H=64, D=D)]
PREFILL_SWEEP = [dict(S=s, N=n, H=h, D=D, window=w) for s, n, w, h in itertools.product(
    (2048, 4096, 8192), (8192, 32768, 65536, 131072), ("causal", "full"), (32, 64))]
DECODE_SWEEP = [dict(B=b, ctx=c, next_n=n, H=64, D=D) for b, c, n in itertools.product(
    (1, 8, 64, 128), (8192, 32768, 65536, 131072), (1, 2))]
CPU_PREFILL = [dict(S=8, N=2048, H=32, D=D, window="causal")]
CPU_DECODE = [dict(B=2, ctx=2048, next_n=1, H=32, D=D)]


# --- torch baselines: dequantise e4m3 to bf16 (exact), matmul, ReLU, weighted head sum --------
# The head sum runs as a bf16 bmm (weights rounded to bf16): what a plain torch port does, and
# accurate to ~1e-2 relative, enough for a timing baseline.

def _score(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q [b, M, H, D] e4m3, k [b, L, D] bf16, weights [b, M, H] f32 -> [b, M, L] f32 before k_scale."""
    b, m, h, d = q.shape
    s = torch.bmm(q.to(torch.bfloat16).view(b, m * h, d), k.transpose(1, 2)).relu_()
    w = weights.to(torch.bfloat16).reshape(b * m, 1, h)
    return torch.bmm(w, s.view(b * m, h, -1)).view(b, m, -1).float()


def torch_indexer_logits(x, ks_host: torch.Tensor, ke_host: torch.Tensor,
                         out: torch.Tensor) -> torch.Tensor:
    """[S, N] logits in query chunks, each over the union of its windows (host copies of ks/ke
    give the bounds without a device sync), -inf outside every window."""
    S, H, Dh = x.q.shape
    N = x.k.shape[0]
    k_bf16 = x.k.to(torch.bfloat16)
    cols = torch.arange(N, device=out.device)
    for t0, t1 in harness.chunk_ranges(S, H * N * 2 + N * 16):
        lo, hi = int(ks_host[t0:t1].min()), int(ke_host[t0:t1].max())
        r = _score(x.q[t0:t1].unsqueeze(0), k_bf16[lo:hi].unsqueeze(0),
                   x.weights[t0:t1].unsqueeze(0))[0].mul_(x.k_scale[lo:hi])
        c = cols[lo:hi]
        visible = (c >= x.ks[t0:t1, None]) & (c < x.ke[t0:t1, None])
        out[t0:t1, lo:hi] = torch.where(visible, r, float("-inf"))
        out[t0:t1, :lo] = float("-inf")
        out[t0:t1, hi:] = float("-inf")
    return out


def torch_indexer_logits_paged(x, out: torch.Tensor) -> torch.Tensor:
    """[B*n, L] logits in batch chunks: gather each sequence's pages through the block table,
    split values and scales (DeepGEMM layout: 64 rows of D e4m3 bytes, then 64 f32 scales)."""
    B, n, H, Dh = x.q.shape
    L = out.shape[1]
    per_seq = -(-L // PAGE_SIZE)
    cache = x.kv_cache.view(x.kv_cache.shape[0], -1)
    pos = torch.arange(L, device=out.device)
    ends = x.context_lens[:, None] - n + torch.arange(1, n + 1, device=out.device)   # [B, n]
    per_batch = per_seq * PAGE_SIZE * (Dh + 4) * 3 + n * H * L * 2 + n * L * 16
    for b0, b1 in harness.chunk_ranges(B, per_batch):
        raw = cache[x.block_table[b0:b1, :per_seq].long()]               # [b, P, 64 (D + 4)] u8
        k = raw[..., :PAGE_SIZE * Dh].view(torch.float8_e4m3fn).to(torch.bfloat16)
        k_scale = raw[..., PAGE_SIZE * Dh:].view(torch.float32).reshape(b1 - b0, -1)[:, :L]
        r = _score(x.q[b0:b1], k.view(b1 - b0, -1, Dh)[:, :L],
                   x.weights.view(B, n, H)[b0:b1]).mul_(k_scale[:, None, :])
        out.view(B, n, L)[b0:b1] = torch.where(pos < ends[b0:b1, :, None], r, float("-inf"))
    return out


def _torch_topk_into(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """torch.topk over the masked logits, written into the int32 output like the op's."""
    return out.copy_(torch.topk(logits, out.shape[1], dim=1, sorted=False).indices)


# --- cases ------------------------------------------------------------------------------------

def _route(name: str, fn):
    """fn with INDEXCACHE_INDEXER_TOPK=name (the op's route forced: "chunked" or "sampled")."""
    def run(x):
        old = os.environ.get("INDEXCACHE_INDEXER_TOPK")
        os.environ["INDEXCACHE_INDEXER_TOPK"] = name
        try:
            return fn(x)
        finally:
            if old is None:
                del os.environ["INDEXCACHE_INDEXER_TOPK"]
            else:
                os.environ["INDEXCACHE_INDEXER_TOPK"] = old
    return run


def _prefill_cases(ctx: Context, shape: dict) -> list[Case]:
    S, N, H, Dh = shape["S"], shape["N"], shape["H"], shape["D"]
    ks = torch.zeros(S, dtype=torch.int32)
    ke = harness.causal_tail_ends(S, N) if shape["window"] == "causal" else torch.full(
        (S,), N, dtype=torch.int32)
    flops = harness.indexer_flops(H, Dh, harness.window_pairs(ks, ke, N))
    dev, ops = ctx.device, ctx.ops

    def inputs(out_cols: int, out_dtype: torch.dtype):
        def make() -> SimpleNamespace:
            q = harness.random_e4m3((S, H, Dh), dev)
            q[S - shape.get("zero_rows", 0):] = 0
            return SimpleNamespace(
                q=q, k=harness.random_e4m3((N, Dh), dev),
                k_scale=torch.rand(N, device=dev) + 0.5,
                weights=torch.randn(S, H, device=dev) * (H * Dh) ** -0.5,
                ks=ks.to(dev), ke=ke.to(dev),
                out=torch.empty(S, out_cols, dtype=out_dtype, device=dev))
        return make

    def logits(x, out=None):
        return ops.indexer_logits(x.q, x.k, x.k_scale, x.weights, x.ks, x.ke, out=out)

    headline = shape in PREFILL_HEADLINE or shape == PADDED_HEADLINE
    return [
        Case("indexer_logits", shape, inputs(N, torch.float32), [
            Impl("indexcache", lambda x: logits(x, x.out)),
            Impl("torch", lambda x: torch_indexer_logits(x, ks, ke, x.out))],
            flops=flops, peak="fp8", headline=headline),
        Case("indexer_topk", {**shape, "k": K}, inputs(K, torch.int32), [
            Impl("indexcache", lambda x: ops.indexer_topk(
                x.q, x.k, x.k_scale, x.weights, x.ks, x.ke, K, out=x.out)),
            Impl("indexcache-chunked", _route("chunked", lambda x: ops.indexer_topk(
                x.q, x.k, x.k_scale, x.weights, x.ks, x.ke, K, out=x.out))),
            Impl("indexcache-two-kernel", lambda x: ops.topk(logits(x), K, x.ks, x.ke, out=x.out)),
            Impl("torch", lambda x: _torch_topk_into(x.out, torch_indexer_logits(
                x, ks, ke, torch.empty(S, N, device=dev))))],
            flops=flops, peak="fp8", headline=headline, reference="indexcache-two-kernel"),
    ]


def _decode_cases(ctx: Context, shape: dict) -> list[Case]:
    B, L, n, H, Dh = shape["B"], shape["ctx"], shape["next_n"], shape["H"], shape["D"]
    lens = [L] * B
    flops = harness.indexer_flops(H, Dh, harness.paged_pairs(lens, n))
    dev, ops = ctx.device, ctx.ops

    def inputs(out_cols: int, out_dtype: torch.dtype):
        def make() -> SimpleNamespace:
            pages = B * -(-L // PAGE_SIZE)
            cache = torch.empty(pages, PAGE_SIZE * (Dh + 4), dtype=torch.uint8, device=dev)
            harness.fill_e4m3_(cache[:, :PAGE_SIZE * Dh].view(torch.float8_e4m3fn))
            cache[:, PAGE_SIZE * Dh:].view(torch.float32).uniform_(0.5, 1.5)
            context_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            return SimpleNamespace(
                q=harness.random_e4m3((B, n, H, Dh), dev),
                kv_cache=cache.view(pages, PAGE_SIZE, 1, Dh + 4),
                weights=torch.randn(B * n, H, device=dev) * (H * Dh) ** -0.5,
                context_lens=context_lens, block_table=harness.paged_block_table(B, L, dev),
                # window [0, len_b - n + j + 1) of row (b, j), for the two-kernel path's topk
                row_starts=torch.zeros(B * n, dtype=torch.int32, device=dev),
                row_ends=(context_lens[:, None] - n + torch.arange(1, n + 1, device=dev))
                .reshape(-1).to(torch.int32),
                out=torch.empty(B * n, out_cols, dtype=out_dtype, device=dev))
        return make

    def logits(x, out=None):
        return ops.indexer_logits_paged(x.q, x.kv_cache, x.weights, x.context_lens,
                                        x.block_table, L, out=out)

    headline = shape in DECODE_HEADLINE
    logits_bytes = harness.indexer_paged_bytes(lens, n, H, Dh, B * n * L * 4)
    topk_bytes = harness.indexer_paged_bytes(lens, n, H, Dh, B * n * K * 4)
    return [
        Case("indexer_logits_paged", shape, inputs(L, torch.float32), [
            Impl("indexcache", lambda x: logits(x, x.out)),
            Impl("torch", lambda x: torch_indexer_logits_paged(x, x.out))],
            flops=flops, nbytes=logits_bytes, peak="fp8", touched_bytes=logits_bytes,
            headline=headline),
        Case("indexer_topk_paged", {**shape, "k": K}, inputs(K, torch.int32), [
            Impl("indexcache", lambda x: ops.indexer_topk_paged(
                x.q, x.kv_cache, x.weights, x.context_lens, x.block_table, L, K, out=x.out)),
            Impl("indexcache-two-kernel", lambda x: ops.topk(
                logits(x), K, x.row_starts, x.row_ends, out=x.out)),
            Impl("torch", lambda x: _torch_topk_into(x.out, torch_indexer_logits_paged(
                x, torch.empty(B * n, L, device=dev))))],
            flops=flops, nbytes=topk_bytes, peak="fp8", touched_bytes=topk_bytes,
            headline=headline, reference="indexcache-two-kernel"),
    ]


def cases(ctx: Context) -> list[Case]:
    if not ctx.machine.cuda:
        prefill, decode = CPU_PREFILL, CPU_DECODE
    elif ctx.sweep:
        prefill, decode = PREFILL_SWEEP, DECODE_SWEEP
    else:
        prefill, decode = PREFILL_HEADLINE, DECODE_HEADLINE
    padded = [c for c in _prefill_cases(ctx, PADDED_HEADLINE) if c.op == "indexer_topk"]
    return ([c for s in prefill for c in _prefill_cases(ctx, s)]
            + (padded if ctx.machine.cuda else [])
            + [c for s in decode for c in _decode_cases(ctx, s)])


if __name__ == "__main__":
    sys.exit(harness.main([sys.modules[__name__]]))
