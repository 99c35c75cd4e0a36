"""CUDA indexer scores (issue 4): indexer_logits and indexer_logits_paged on the GPU against an
independent float64 reference written here (e4m3 decoded by torch, einsum), on fresh random
inputs.

Every output buffer is poisoned with NaN (and a padded row stride whose padding must survive), so
an element the kernel forgets to write fails. Scores must match to a relative Frobenius error
< 1e-3 over the visible entries and be exactly -inf everywhere else.
"""

from __future__ import annotations

import math

import pytest
import torch

from indexcache_ops import ops

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

PAGE = 64
E4M3 = torch.float8_e4m3fn
INF = math.inf
TOL = 1e-3


# ----------------------------------------------------------------------------------------------
# inputs


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def rand_e4m3(gen, *shape, scale: float = 8.0) -> torch.Tensor:
    """Random e4m3 values spread over many binades (normal * scale, saturated)."""
    x = torch.randn(*shape, generator=gen, device="cuda") * scale
    return x.clamp(-448, 448).to(E4M3)


def ragged_inputs(gen, S, N, H, D):
    q = rand_e4m3(gen, S, H, D)
    k = rand_e4m3(gen, N, D)
    k_scale = torch.rand(N, generator=gen, device="cuda") * 0.02 + 0.001
    weights = torch.randn(S, H, generator=gen, device="cuda") * (H * D) ** -0.5
    return q, k, k_scale, weights


def windows(gen, S, N, kind):
    t = torch.arange(S, device="cuda")
    if kind == "causal":  # a prefill chunk at the end of the context
        ks = torch.zeros(S, dtype=torch.long, device="cuda")
        ke = (N - S + t + 1).clamp(0, N)
    elif kind == "full":
        ks = torch.zeros(S, dtype=torch.long, device="cuda")
        ke = torch.full((S,), N, device="cuda")
    elif kind == "random":  # arbitrary offsets, about one row in six empty
        a = torch.randint(0, N + 1, (S,), generator=gen, device="cuda")
        b = torch.randint(0, N + 1, (S,), generator=gen, device="cuda")
        ks, ke = torch.minimum(a, b), torch.maximum(a, b)
        empty = torch.randint(0, 6, (S,), generator=gen, device="cuda") == 0
        ke = torch.where(empty, ks, ke)
    elif kind == "unclamped":  # starts below 0, ends past N, ends before starts
        ks = torch.randint(-2 * N - 5, N + 5, (S,), generator=gen, device="cuda")
        ke = torch.randint(-5, 2 * N + 5, (S,), generator=gen, device="cuda")
    elif kind == "empty":
        ks = torch.randint(0, N + 1, (S,), generator=gen, device="cuda")
        ke = ks.clone()
    else:
        raise ValueError(kind)
    return ks.int(), ke.int()


def poisoned(rows, cols, pad=3):
    """[rows, cols] float32 NaN view of a [rows, cols + pad] buffer (padded row stride)."""
    return torch.full((rows, cols + pad), math.nan, device="cuda")[:, :cols]


def assert_padding_untouched(out):
    pad = out._base[:, out.shape[1]:]
    assert torch.isnan(pad).all(), "the op wrote into the row padding of out"


# ----------------------------------------------------------------------------------------------
# float64 references (independent of the package: torch decodes e4m3, einsum multiplies)


def decode(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).to(torch.float64)  # every e4m3 value is exact in float32


def scores64(q, keys, key_scale, weights):
    """[T, H, D] e4m3 queries x [M, D] e4m3 keys -> ([T, M] float64 scores, [T, M] magnitudes
    k_scale * sum_h |w| relu(q . k)), no window."""
    dots = torch.einsum("thd,md->thm", decode(q), decode(keys)).clamp_min_(0)
    w = weights.double()
    ks = key_scale.double()[None, :]
    return torch.einsum("thm,th->tm", dots, w) * ks, torch.einsum("thm,th->tm", dots, w.abs()) * ks


class Ref:
    """Reference scores (-inf outside windows) and their magnitudes (0 outside windows)."""

    def __init__(self, scores, magnitude):
        self.scores, self.magnitude = scores, magnitude

    def __getitem__(self, rows):
        return Ref(self.scores[rows], self.magnitude[rows])


def ref_logits(q, k, k_scale, weights, ks, ke, rows=None, chunk=16) -> Ref:
    """Reference [len(rows), N] (all rows by default), windows clamped as on CUDA."""
    S, N = q.shape[0], k.shape[0]
    rows = torch.arange(S, device=q.device) if rows is None else torch.as_tensor(rows).to(q.device)
    begin = ks.long().clamp(0, N)
    end = torch.minimum(torch.maximum(ke.long(), begin), torch.tensor(N, device=q.device))
    cols = torch.arange(N, device=q.device)
    out = torch.empty(len(rows), N, dtype=torch.float64, device=q.device)
    mag = torch.zeros(len(rows), N, dtype=torch.float64, device=q.device)
    for r0 in range(0, len(rows), chunk):
        r = rows[r0: r0 + chunk]
        sc, m = scores64(q[r], k, k_scale, weights[r])
        vis = (cols[None, :] >= begin[r, None]) & (cols[None, :] < end[r, None])
        out[r0: r0 + chunk] = torch.where(vis, sc, -INF)
        mag[r0: r0 + chunk] = torch.where(vis, m, 0.0)
    return Ref(out, mag)


# ----------------------------------------------------------------------------------------------
# comparison


def describe(got: torch.Tensor, want: torch.Tensor) -> str:
    """Where the scores differ: counts and the column / row residues of the bad entries (a
    layout bug shows up as a pattern there)."""
    got, want = got.double(), want.double()
    nan = torch.isnan(got)
    vis = torch.isfinite(want)
    bad_inf = ~vis & (got != -INF) & ~nan
    scale = want[vis].abs().max().item() if vis.any() else 1.0
    bad_val = vis & ~nan & ((got - want).abs() > 1e-3 * scale)
    lines = [f"shape {tuple(got.shape)}: NaN {nan.sum().item()}, non -inf outside windows "
             f"{bad_inf.sum().item()}, wrong visible values {bad_val.sum().item()} "
             f"of {vis.sum().item()}"]
    for name, mask in (("NaN", nan), ("outside", bad_inf), ("wrong", bad_val)):
        idx = mask.nonzero()
        if idx.numel() == 0:
            continue
        rows, cols = idx[:, 0], idx[:, 1]
        col64 = torch.bincount(cols % 64, minlength=64).nonzero().flatten()[:16].tolist()
        lines.append(f"  {name}: first at {idx[:4].tolist()}, rows {rows.unique()[:8].tolist()}, "
                     f"col%64 {col64}, "
                     f"col%256//64 {torch.bincount((cols % 256) // 64, minlength=4).tolist()}")
        if name == "wrong":
            g, w = got[mask][:6].tolist(), want[mask][:6].tolist()
            lines.append(f"  got {g}\n  want {w}")
    return "\n".join(lines)


# Frobenius criterion only where it is a statistic: FP8 wgmma sums the 32 products of each k-step
# with ~14 significant bits (the accumulation precision DeepSeek-V3 reports for H800), so one
# score whose head sum cancels can be off by a few 1e-3 of itself (seen: 3.4e-3 at S = N = 1)
# while the matrix-wide error stays well below 1e-3.
MIN_FROBENIUS_ENTRIES = 100
# Per element, relative to the cancellation-free magnitude k_scale * sum_h |w| relu(q . k).
ELEMENT_TOL = 1e-2


def assert_logits_match(got: torch.Tensor, ref: Ref, tol: float = TOL) -> None:
    """NaN nowhere, exactly -inf outside the windows, every visible score within ELEMENT_TOL of
    its magnitude, and a relative Frobenius error < tol over the visible entries."""
    got = got.double()
    want, mag = ref.scores.to(got.device), ref.magnitude.to(got.device)
    visible = torch.isfinite(want)
    ok = (not torch.isnan(got).any().item()
          and bool((got[~visible] == -INF).all().item())
          and bool(torch.isfinite(got[visible]).all().item()))
    err, worst = 0.0, 0.0
    if ok and visible.any():
        diff = (got[visible] - want[visible]).abs()
        slack = 1e-5 * mag[visible].max()
        worst = (diff / (mag[visible] + slack)).max().item()
        ok = worst < ELEMENT_TOL
        err = (torch.linalg.vector_norm(diff)
               / torch.linalg.vector_norm(want[visible]).clamp_min(1e-300)).item()
        if visible.sum().item() >= MIN_FROBENIUS_ENTRIES:
            ok = ok and err < tol
    assert ok, f"relative error {err}, worst element / magnitude {worst}\n" + describe(got, want)


# ----------------------------------------------------------------------------------------------
# ragged prefill form

SIZES = [(1, 1), (37, 129), (300, 1000), (37, 5000), (300, 257)]


@pytest.mark.parametrize("kind", ["causal", "random", "full"])
@pytest.mark.parametrize("S,N", SIZES, ids=[f"S{s}-N{n}" for s, n in SIZES])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H", [32, 64])
def test_ragged_matches_reference(H, D, S, N, kind):
    gen = make_gen(1000 * S + N + 7 * H + D)
    q, k, k_scale, weights = ragged_inputs(gen, S, N, H, D)
    ks, ke = windows(gen, S, N, kind)
    out = poisoned(S, N)
    res = ops.indexer_logits(q, k, k_scale, weights, ks, ke, out=out)
    assert res is out
    assert_padding_untouched(out)
    assert_logits_match(out, ref_logits(q, k, k_scale, weights, ks, ke))


@pytest.mark.parametrize("kind", ["unclamped", "empty"])
@pytest.mark.parametrize("H,D", [(64, 128), (32, 64)])
def test_ragged_clamps_and_empty_windows(H, D, kind):
    S, N = 45, 700
    gen = make_gen(11 + H + D + len(kind))
    q, k, k_scale, weights = ragged_inputs(gen, S, N, H, D)
    ks, ke = windows(gen, S, N, kind)
    out = poisoned(S, N)
    ops.indexer_logits(q, k, k_scale, weights, ks, ke, out=out)
    assert_padding_untouched(out)
    want = ref_logits(q, k, k_scale, weights, ks, ke)
    if kind == "empty":
        assert torch.all(out == -INF)
    assert_logits_match(out, want)


def test_ragged_allocating_form_and_degenerate_sizes():
    gen = make_gen(3)
    q, k, k_scale, weights = ragged_inputs(gen, 9, 300, 64, 128)
    ks, ke = windows(gen, 9, 300, "random")
    out = ops.indexer_logits(q, k, k_scale, weights, ks, ke)
    assert out.shape == (9, 300) and out.is_contiguous() and out.device.type == "cuda"
    assert_logits_match(out, ref_logits(q, k, k_scale, weights, ks, ke))
    # N = 0 and S = 0: nothing to write, no launch error.
    assert ops.indexer_logits(q, k[:0], k_scale[:0], weights, ks * 0, ke * 0).shape == (9, 0)
    assert ops.indexer_logits(q[:0], k, k_scale, weights[:0], ks[:0], ke[:0]).shape == (0, 300)
    torch.cuda.synchronize()


def test_ragged_many_groups_per_cta():
    """Enough query groups and tiles that every CTA walks several groups and splits some."""
    S, N, H, D = 1500, 9000, 64, 128
    gen = make_gen(5)
    q, k, k_scale, weights = ragged_inputs(gen, S, N, H, D)
    ks, ke = windows(gen, S, N, "causal")
    ks = torch.where(torch.arange(S, device="cuda") % 5 == 0, ke // 3, ks).int()  # ragged starts
    out = poisoned(S, N)
    ops.indexer_logits(q, k, k_scale, weights, ks, ke, out=out)
    assert_padding_untouched(out)
    assert_logits_match(out, ref_logits(q, k, k_scale, weights, ks, ke))


def test_ragged_bitwise_deterministic():
    S, N, H, D = 300, 5000, 64, 128
    gen = make_gen(17)
    q, k, k_scale, weights = ragged_inputs(gen, S, N, H, D)
    ks, ke = windows(gen, S, N, "random")
    first = ops.indexer_logits(q, k, k_scale, weights, ks, ke)
    for _ in range(20):
        again = ops.indexer_logits(q, k, k_scale, weights, ks, ke)
        assert torch.equal(again.view(torch.int32), first.view(torch.int32))


def test_ragged_cuda_graph_replay():
    S, N, H, D = 64, 3000, 32, 128
    gen = make_gen(23)
    q, k, k_scale, weights = ragged_inputs(gen, S, N, H, D)
    ks, ke = windows(gen, S, N, "causal")
    out = poisoned(S, N)
    ops.indexer_logits(q, k, k_scale, weights, ks, ke, out=out)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.indexer_logits(q, k, k_scale, weights, ks, ke, out=out)
    new_ks, new_ke = windows(gen, S, N, "random")
    ks.copy_(new_ks)
    ke.copy_(new_ke)
    q.view(torch.uint8).copy_(rand_e4m3(gen, S, H, D).view(torch.uint8))
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    assert_logits_match(out, ref_logits(q, k, k_scale, weights, ks, ke))


def test_ragged_64bit_offsets():
    """S * N > 2^31 elements of out (8.6 GB): rows near the end must land where they belong."""
    S, N, H, D = 16400, 131072, 64, 128
    need = S * N * 4 + S * H * D + (2 << 30)
    if torch.cuda.get_device_properties(0).total_memory < need + (8 << 30):
        pytest.skip("needs ~20 GB of GPU memory")
    gen = make_gen(29)
    q, k, k_scale, weights = ragged_inputs(gen, S, N, H, D)
    ks, ke = windows(gen, S, N, "causal")
    out = torch.full((S, N), math.nan, device="cuda")
    ops.indexer_logits(q, k, k_scale, weights, ks, ke, out=out)
    assert not torch.isnan(out).any().item(), "unwritten elements"
    rows = [0, 1, S // 2, S - 300, S - 3, S - 2, S - 1]
    want = ref_logits(q, k, k_scale, weights, ks, ke, rows=rows, chunk=1)
    assert_logits_match(out[rows], want)
    del out
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# paged decode form


class Paged:
    """Inputs of indexer_logits_paged plus the per-sequence keys the reference uses directly."""

    def __init__(self, gen, lens, next_n, H, D, tail="minus1", spare_pages=3, spare_cols=2,
                 extra_len=5):
        B = len(lens)
        need = [math.ceil(n / PAGE) for n in lens]
        self.num_pages = sum(need) + spare_pages
        perm = torch.randperm(self.num_pages, generator=gen, device="cuda")
        max_pages = max(need, default=0) + spare_cols
        fill = -1 if tail == "minus1" else (1 << 30)
        table = torch.full((B, max_pages), fill, dtype=torch.int32, device="cuda")
        row_bytes = PAGE * (D + 4)
        cache = torch.full((self.num_pages, row_bytes), 0x7F, dtype=torch.uint8, device="cuda")
        # Poison: e4m3 NaN keys (0x7F) and NaN scales everywhere; visible slots get data below.
        nan_scales = torch.full((self.num_pages, PAGE), math.nan, device="cuda")
        cache[:, PAGE * D:] = nan_scales.view(torch.uint8)
        self.keys, self.scales = [], []
        offset = 0
        for b, n in enumerate(lens):
            table[b, : need[b]] = perm[offset: offset + need[b]].int()
            offset += need[b]
            kb = rand_e4m3(gen, n, D)
            sb = torch.rand(n, generator=gen, device="cuda") * 0.02 + 0.001
            self.keys.append(kb)
            self.scales.append(sb)
            if n:
                pos = torch.arange(n, device="cuda")
                page = table[b, pos // PAGE].long()
                row = pos % PAGE
                key_cols = row[:, None] * D + torch.arange(D, device="cuda")
                cache[page[:, None], key_cols] = kb.view(torch.uint8)
                scale_cols = PAGE * D + row[:, None] * 4 + torch.arange(4, device="cuda")
                cache[page[:, None], scale_cols] = sb.view(torch.uint8).view(n, 4)
        self.kv_cache = cache.view(self.num_pages, PAGE, 1, D + 4)
        self.block_table = table
        self.context_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        self.q = rand_e4m3(gen, B, next_n, H, D)
        self.weights = torch.randn(B * next_n, H, generator=gen, device="cuda") * (H * D) ** -0.5
        self.max_context_len = max(lens, default=0) + extra_len
        self.next_n = next_n

    def args(self):
        return (self.q, self.kv_cache, self.weights, self.context_lens, self.block_table,
                self.max_context_len)

    def reference(self, invalid_positions=None) -> Ref:
        """[B * next_n, max_context_len] float64; `invalid_positions[b]`: positions whose page id
        is invalid (scored -inf)."""
        B, n = self.q.shape[0], self.next_n
        L = self.max_context_len
        out = torch.full((B * n, L), -INF, dtype=torch.float64, device="cuda")
        mag = torch.zeros(B * n, L, dtype=torch.float64, device="cuda")
        lens = self.context_lens.tolist()
        max_pages = self.block_table.shape[1]
        for b in range(B):
            kb, sb = self.keys[b], self.scales[b]
            avail = min(kb.shape[0], max_pages * PAGE)
            if avail == 0:
                continue
            sc, m = scores64(self.q[b], kb[:avail], sb[:avail], self.weights[b * n: (b + 1) * n])
            for j in range(n):
                end = min(max(lens[b] - n + j + 1, 0), L, avail)
                out[b * n + j, :end] = sc[j, :end]
                mag[b * n + j, :end] = m[j, :end]
            if invalid_positions is not None and b in invalid_positions:
                out[b * n: (b + 1) * n, invalid_positions[b]] = -INF
                mag[b * n: (b + 1) * n, invalid_positions[b]] = 0.0
        return Ref(out, mag)


def run_paged(inp: Paged, pad=3):
    rows = inp.q.shape[0] * inp.next_n
    out = poisoned(rows, inp.max_context_len, pad)
    res = ops.indexer_logits_paged(*inp.args(), out=out)
    assert res is out
    assert_padding_untouched(out)
    return out


PAGED_CASES = [(B, n) for B in (1, 3, 8) for n in (1, 2, 3, 4)]


@pytest.mark.parametrize("B,next_n", PAGED_CASES, ids=[f"B{b}-n{n}" for b, n in PAGED_CASES])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H", [32, 64])
def test_paged_matches_reference(H, D, B, next_n):
    gen = make_gen(100 * B + 10 * next_n + H + D)
    # Lengths: a long one (many tiles), page-aligned ones, short ones, and one below next_n.
    lens = torch.randint(1, 700, (B,), generator=gen, device="cuda").tolist()
    lens[0] = 1100 + B
    if B > 1:
        lens[1] = 256
    if B > 2:
        lens[2] = max(next_n - 1, 0)
    tail = "minus1" if (B + next_n) % 2 else "huge"
    inp = Paged(gen, lens, next_n, H, D, tail=tail)
    out = run_paged(inp)
    assert_logits_match(out, inp.reference())


def test_paged_empty_sequences_and_no_pages():
    gen = make_gen(41)
    inp = Paged(gen, [0, 0, 5], 2, 64, 128, spare_pages=0)
    out = run_paged(inp)
    assert_logits_match(out, inp.reference())
    # A cache with no pages at all: every position -inf.
    inp = Paged(gen, [0, 0], 1, 32, 64, spare_pages=0, extra_len=70)
    out = run_paged(inp)
    assert torch.all(out == -INF)


@pytest.mark.parametrize("bad", [-1, 1 << 30, -(1 << 30)])
def test_paged_masks_invalid_page_ids(bad):
    """On CUDA a used block-table entry that names no page of the cache scores -inf (the CPU path
    raises instead): never an out-of-bounds read."""
    gen = make_gen(43)
    inp = Paged(gen, [300, 520, 130], 2, 64, 128)
    inp.block_table[0, 1] = bad
    inp.block_table[1, 8] = bad  # the last, partial page of sequence 1
    inp.block_table[2, 0] = inp.num_pages  # one past the end
    out = run_paged(inp)
    invalid = {0: list(range(64, 128)), 1: list(range(512, 520)), 2: list(range(0, 64))}
    assert_logits_match(out, inp.reference(invalid))


def test_paged_clamps_lengths():
    """Lengths past max_context_len or past the block table are clamped (no host check on CUDA)."""
    gen = make_gen(47)
    inp = Paged(gen, [400, 200, 64], 3, 32, 128, spare_cols=0, extra_len=0)
    inp.max_context_len = 300  # sequence 0 is longer than the output
    inp.context_lens[2] = 200  # sequence 2 claims more than its one-page table row holds ...
    inp.block_table = inp.block_table[:, :1].clone()  # ... and every row is one page wide now
    out = run_paged(inp)
    want = inp.reference()
    # Reference semantics: positions past the table (page >= 1) are -inf for every sequence.
    want.scores[:, 64:] = -INF
    want.magnitude[:, 64:] = 0.0
    assert_logits_match(out, want)


def test_paged_topk_pads_past_the_table():
    """indexer_topk_paged on lengths past the block table (CUDA does not check them): a position
    the table cannot hold is never selected (it scores -inf); its row is -1 padded instead."""
    gen = make_gen(48)
    inp = Paged(gen, [400, 200, 64], 3, 32, 128, spare_cols=0, extra_len=0)
    inp.max_context_len = 300
    inp.context_lens[2] = 200
    inp.block_table = inp.block_table[:, :1].clone()  # one page: positions 0-63
    k = 100
    got = ops.indexer_topk_paged(*inp.args(), k, sorted=False).cpu()
    for b, length in enumerate(inp.context_lens.tolist()):
        for j in range(inp.next_n):
            end = min(max(length - inp.next_n + j + 1, 0), inp.max_context_len, PAGE)
            want = torch.cat([torch.arange(end), torch.full((k - end,), -1)]).int()
            assert torch.equal(got[b * inp.next_n + j], want), (b, j)


def test_paged_topk_over_several_chunks():
    """More score rows than one 128 MiB workspace holds (33 rows of ~1 M positions): the batches
    run in chunks (6 + 5 here), each answered like the two-kernel path over the whole output.
    The sequences share 64 pages (block-table entries may repeat), so the cache stays small;
    two short sequences in the second chunk (-1 padded rows) check its row mapping."""
    gen = make_gen(67)
    B, n, H, D, P, k = 11, 3, 64, 128, 64, 2048
    length = (1 << 20) + 77
    codes = rand_e4m3(gen, P * PAGE, D).view(torch.uint8).view(P, PAGE * D)
    scales = torch.rand(P, PAGE, generator=gen, device="cuda") * 0.02 + 0.001
    kv_cache = torch.cat([codes, scales.view(torch.uint8).view(P, PAGE * 4)], dim=1)
    pages = torch.arange(-(-length // PAGE), device="cuda")
    table = ((torch.arange(B, device="cuda")[:, None] * 7 + pages) % P).int()
    lens = (length - 1000 * torch.arange(B, device="cuda")).int()
    lens[8], lens[9] = 1500, 2
    q = rand_e4m3(gen, B, n, H, D)
    weights = torch.randn(B * n, H, generator=gen, device="cuda") * (H * D) ** -0.5
    args = (q, kv_cache.view(P, PAGE, 1, D + 4), weights, lens, table, length)
    assert B * n * length * 4 > 128 << 20
    got = ops.indexer_topk_paged(*args, k, sorted=True)
    ends = (lens[:, None] - n + 1 + torch.arange(n, device="cuda")).clamp(0, length).flatten()
    want = ops.topk(ops.indexer_logits_paged(*args), k, torch.zeros_like(ends).int(), ends.int(),
                    sorted=True)
    assert torch.equal(got, want)


def test_paged_long_context():
    gen = make_gen(53)
    inp = Paged(gen, [20000, 13000, 70, 33333], 1, 64, 128)
    out = run_paged(inp)
    assert_logits_match(out, inp.reference())


def test_paged_bitwise_deterministic():
    gen = make_gen(59)
    inp = Paged(gen, [3000, 1500, 700], 4, 64, 128)
    first = ops.indexer_logits_paged(*inp.args())
    for _ in range(20):
        again = ops.indexer_logits_paged(*inp.args())
        assert torch.equal(again.view(torch.int32), first.view(torch.int32))


def test_paged_cuda_graph_replay_after_in_place_update():
    """Capture once, then change context_lens and block_table in place (decode steps): the graph
    reads the new values, with no host-side metadata baked into it."""
    gen = make_gen(61)
    inp = Paged(gen, [700, 1000, 300], 2, 64, 128, spare_pages=12, spare_cols=4, extra_len=200)
    out = poisoned(6, inp.max_context_len)
    ops.indexer_logits_paged(*inp.args(), out=out)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.indexer_logits_paged(*inp.args(), out=out)
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    assert_logits_match(out, inp.reference())

    # Next decode step: same buffers, longer and shorter sequences, pages reshuffled.
    new = Paged(gen, [760, 980, 420], 2, 64, 128, spare_pages=0, spare_cols=0, extra_len=0)
    assert new.num_pages <= inp.num_pages and new.block_table.shape[1] <= inp.block_table.shape[1]
    inp.kv_cache.view(torch.uint8)[: new.num_pages].copy_(new.kv_cache.view(torch.uint8))
    inp.block_table.fill_(-1)
    inp.block_table[:, : new.block_table.shape[1]].copy_(new.block_table)
    inp.context_lens.copy_(new.context_lens)
    inp.keys, inp.scales = new.keys, new.scales
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    assert_logits_match(out, inp.reference())
