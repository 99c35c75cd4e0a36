"""CUDA top-k (indexcache::topk on GPU tensors): exact sets, and exact order when sorted, against an
independent brute-force reference built here from two stable float64 sorts; every cluster size of
the launcher (one CTA per row, or a row split over a cluster of CTAs sharing histograms through
distributed shared memory), forced through INDEXCACHE_TOPK_SPLIT where a shape would not pick it; the peers' failure modes (a crowded
coarse bin, ties, NaN and infinities, padding, strides, odd offsets); determinism; CUDA graphs.
Timings live in bench/bench_topk.py.
"""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import pytest
import torch

from indexcache_ops import ops

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, requires_cuda]

MAX_K = 2048
SENTINEL = 0x5A5A5A5A  # poison of every output before a run
SPLIT_ENV = "INDEXCACHE_TOPK_SPLIT"


# ----------------------------------------------------------------------------------------------
# reference and helpers


def reference_topk(x: torch.Tensor, k: int, starts=None, ends=None, batch_elems: int = 1 << 25):
    """int64 [R, k]: per row, the window's columns ordered by value descending (NaN below -inf,
    -0.0 == +0.0), ties by ascending column, the first k kept, -1 padded.

    Two stable sorts on float64 values (least significant key first: column order is the input
    order; then value; then the class {in-window number, in-window NaN, outside}). It shares no
    code or bit trick with the kernels."""
    R, C = x.shape
    out = torch.full((R, k), -1, dtype=torch.int64, device=x.device)
    if R == 0 or C == 0:
        return out
    col = torch.arange(C, device=x.device)
    rows = max(1, batch_elems // C)
    for r0 in range(0, R, rows):
        xs = x[r0: r0 + rows].double()
        nan = torch.isnan(xs)
        if starts is None:
            inside = torch.ones_like(nan)
        else:
            s = starts[r0: r0 + rows].to(x.device).long()[:, None]
            e = ends[r0: r0 + rows].to(x.device).long()[:, None]
            inside = (col >= s) & (col < e)
        cls = torch.where(inside, torch.where(nan, 1, 2), 0).to(torch.int8)
        vals = torch.where(nan | ~inside, 0.0, xs) + 0.0  # + 0.0 turns -0.0 into +0.0
        o1 = torch.sort(vals, dim=1, descending=True, stable=True).indices
        o2 = torch.sort(cls.gather(1, o1), dim=1, descending=True, stable=True).indices
        order = o1.gather(1, o2)[:, :k]
        keep = cls.gather(1, order) > 0
        out[r0: r0 + rows, : order.shape[1]] = torch.where(keep, order, -1)
    return out


def numpy_topk_row(values: np.ndarray, k: int, start: int, end: int) -> list:
    """One row by Python's sort on (is NaN, -value, column): the reference's own check."""
    items = []
    for c in range(start, end):
        v = float(values[c])
        items.append((math.isnan(v), 0.0 if math.isnan(v) else -v, c))
    items.sort()
    best = [c for _, _, c in items[:k]]
    return best + [-1] * (k - len(best))


def poisoned_out(R: int, k: int, pad: int = 3) -> torch.Tensor:
    """[R, k] int32 view with `pad` extra columns per row, all SENTINEL."""
    buf = torch.full((R, k + pad), SENTINEL, dtype=torch.int32, device="cuda")
    return buf[:, :k]


def assert_pad_untouched(out: torch.Tensor) -> None:
    base = out._base if out._base is not None else out
    assert (base[:, out.shape[1]:] == SENTINEL).all(), "the op wrote into the row padding of out"


def assert_topk(got: torch.Tensor, want: torch.Tensor, sorted_: bool, what: str = "") -> None:
    got = got.long()
    assert got.shape == want.shape, (got.shape, want.shape)
    if sorted_:
        bad = (got != want).any(dim=1)
    else:
        bad = (torch.sort(got, dim=1).values != torch.sort(want, dim=1).values).any(dim=1)
    if bad.any():
        r = int(bad.nonzero()[0, 0])
        g, w = got[r].tolist(), want[r].tolist()
        missing = sorted(set(w) - set(g))[:10]
        extra = sorted(set(g) - set(w))[:10]
        raise AssertionError(
            f"{what}: {int(bad.sum())} rows differ, first row {r}: missing {missing}, extra {extra}, "
            f"duplicates {len(g) - len(set(g))}, got[:8] {g[:8]}, want[:8] {w[:8]}")


def run_cuda(x, k, starts=None, ends=None, sorted_=False, check=True, split=None):
    """One call through out= (poisoned, padded rows) and one functional call; both must match the
    reference (and each other bit for bit)."""
    old = os.environ.get(SPLIT_ENV)
    try:
        if split is None:
            os.environ.pop(SPLIT_ENV, None)
        else:
            os.environ[SPLIT_ENV] = str(split)
        s = None if starts is None else starts.cuda()
        e = None if ends is None else ends.cuda()
        out = poisoned_out(x.shape[0], k)
        res = ops.topk(x, k, s, e, sorted=sorted_, out=out)
        assert res is out
        functional = ops.topk(x, k, s, e, sorted=sorted_)
    finally:
        if old is None:
            os.environ.pop(SPLIT_ENV, None)
        else:
            os.environ[SPLIT_ENV] = old
    torch.cuda.synchronize()
    assert_pad_untouched(out)
    assert torch.equal(out, functional), "out= and functional calls differ"
    if check:
        assert_topk(out, reference_topk(x, k, starts, ends), sorted_, f"k={k} split={split}")
    return out


def rng(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_windows(g, R: int, C: int):
    a = torch.randint(0, C + 1, (R,), generator=g)
    b = torch.randint(0, C + 1, (R,), generator=g)
    s, e = torch.minimum(a, b), torch.maximum(a, b)
    empty = torch.randint(0, 8, (R,), generator=g) == 0
    return s.int(), torch.where(empty, s, e).int()


def windows_of(kind: str, g, R: int, C: int):
    if kind == "none":
        return None, None
    if kind == "full":
        return torch.zeros(R, dtype=torch.int32), torch.full((R,), C, dtype=torch.int32)
    if kind == "causal":  # a prefill chunk at the end of the context
        t = torch.arange(R)
        return torch.zeros(R, dtype=torch.int32), (C - R + t + 1).clamp(min=0).int()
    return random_windows(g, R, C)


def randn(g, R: int, C: int) -> torch.Tensor:
    return torch.randn(R, C, generator=g).cuda()


# ----------------------------------------------------------------------------------------------
# the reference itself


def test_reference_matches_python_sort():
    g = rng("ref")
    pool = torch.tensor([math.nan, -math.inf, math.inf, 0.0, -0.0, 1.0, -1.0, 2.5])
    for trial in range(20):
        R, C = 4, int(torch.randint(0, 60, (1,), generator=g))
        k = int(torch.randint(1, 70, (1,), generator=g))
        x = pool[torch.randint(0, len(pool), (R, C), generator=g)]
        x = torch.where(torch.rand(R, C, generator=g) < 0.3, torch.randn(R, C, generator=g), x)
        s, e = random_windows(g, R, C)
        want = reference_topk(x.cuda(), k, s, e).cpu()
        for r in range(R):
            assert want[r].tolist() == numpy_topk_row(x[r].numpy(), k, int(s[r]), int(e[r]))


# ----------------------------------------------------------------------------------------------
# random rows, both regimes


CASES = [  # R, C, k, windows, split (None: the launcher's choice)
    (1, 1, 1, "none", None),
    (5, 2048, 2048, "none", None),
    (5, 2049, 2048, "full", None),
    (37, 4099, 100, "random", None),
    (3, 100003, 1, "random", None),
    (3, 40000, 777, "random", None),
    (1, 131072, 2048, "none", None),
    (1, 131072, 2048, "random", None),
    (64, 131072, 2048, "causal", None),
    (64, 5000, 2048, "random", None),
    (3, 131072, 1500, "random", 1),
    (3, 50000, 2048, "random", 2),
    (7, 30011, 513, "random", 5),
    (2, 77777, 2048, "full", 37),
    (2, 300000, 64, "random", 200),
    (4096, 4096, 2048, "causal", None),
    (4096, 6000, 300, "random", None),
]


@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("R,C,k,windows,split", CASES)
def test_random_rows(R, C, k, windows, split, sorted_):
    g = rng("random", R, C, k, windows, split)
    x = randn(g, R, C)
    s, e = windows_of(windows, g, R, C)
    run_cuda(x, k, s, e, sorted_, split=split)


@pytest.mark.parametrize("sorted_", [False, True])
def test_big_prefill_4096x128k(sorted_):
    R, C, k = 4096, 131072, 2048
    g = rng("big", sorted_)
    x = torch.randn(R, C, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    s, e = windows_of("causal", g, R, C) if sorted_ else (None, None)
    run_cuda(x, k, s, e, sorted_)


@pytest.mark.parametrize("k", [1, 2048])
def test_one_1M_row(k):
    C = 1 << 20
    x = torch.randn(1, C, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    for split in (None, 1):
        run_cuda(x, k, sorted_=True, split=split)
        run_cuda(x, k, sorted_=False, split=split)


# ----------------------------------------------------------------------------------------------
# ties, crowded bins, special values


@pytest.mark.parametrize("split", [None, 1, 6])
@pytest.mark.parametrize("R", [1, 3, 160])
@pytest.mark.parametrize("value", [1.0, -math.inf, math.inf, math.nan, 0.0])
def test_all_equal_rows(R, value, split):
    C, k = 100000, 2048
    g = rng("equal", R, value, split)
    x = torch.full((R, C), value, device="cuda")
    if value == 0.0:  # -0.0 and +0.0 are equal: ties by column, whatever the sign
        x = torch.where(torch.rand(R, C, generator=g).cuda() < 0.5, -x, x)
    s, e = random_windows(g, R, C)
    out = run_cuda(x, k, s, e, sorted_=True, split=split)
    # Explicitly: the first k columns of each window.
    for r in range(min(R, 3)):
        n = min(k, int(e[r] - s[r]))
        want = list(range(int(s[r]), int(s[r]) + n)) + [-1] * (k - n)
        assert out[r].tolist() == want


@pytest.mark.parametrize("split", [None, 1])
@pytest.mark.parametrize("R", [1, 150])
@pytest.mark.parametrize("variant", ["inside", "exact_ties", "below"])
def test_crowded_coarse_bin(R, variant, split):
    """> 16384 near-equal values in one coarse (top 11 bits) bin of a 256K row: the peers'
    candidate buffers overflow silently here."""
    C, k, crowd = 262144, 2048, 20000
    g = rng("crowd", R, variant, split)
    x = torch.rand(R, C, generator=g) * 0.5  # [0, 0.5): below the crowd
    pos = torch.stack([torch.randperm(C, generator=g)[: crowd + 1000] for _ in range(R)])
    near = 1.0 + torch.randint(0, 1 << 16, (R, crowd), generator=g).float() * 2.0 ** -23
    if variant == "exact_ties":
        near = torch.ones(R, crowd)
    x.scatter_(1, pos[:, :crowd], near)
    if variant in ("inside", "exact_ties"):  # 1000 larger values: the k-th is inside the crowd
        x.scatter_(1, pos[:, crowd:], 4.0 + torch.rand(R, 1000, generator=g))
    x = x.cuda()
    for sorted_ in (False, True):
        run_cuda(x, k, sorted_=sorted_, split=split)


@pytest.mark.parametrize("split", [None, 1, 4])
def test_special_values(split):
    R, C = 24, 40000
    g = rng("special", split)
    pool = torch.tensor([math.nan, -math.inf, math.inf, 0.0, -0.0, 3.4028234663852886e38,
                         -3.4028234663852886e38, 1e-45, -1e-45, 1.0, -1.0])
    x = torch.randn(R, C, generator=g)
    frac = torch.rand(R, 1, generator=g)  # from almost no specials to almost all
    special = torch.rand(R, C, generator=g) < frac
    x = torch.where(special, pool[torch.randint(0, len(pool), (R, C), generator=g)], x)
    x[0] = math.nan  # a row of NaN only: k NaN columns, lowest index first
    x[1] = -math.inf
    x[2, :] = math.nan
    x[2, 5:9] = -math.inf  # fewer than k non-NaN values
    s, e = random_windows(g, R, C)
    for k in (1, 100, 2048):
        for sorted_ in (False, True):
            run_cuda(x.cuda(), k, s, e, sorted_, split=split)
            run_cuda(x.cuda(), k, None, None, sorted_, split=split)


# ----------------------------------------------------------------------------------------------
# shapes, windows, strides


@pytest.mark.parametrize("split", [None, 1, 3])
@pytest.mark.parametrize("k", [1, 5, 2048])
def test_short_rows_and_empty_windows(k, split):
    R, C = 50, 5000
    g = rng("short", k, split)
    x = randn(g, R, C)
    lens = torch.randint(0, 2 * k + 4, (R,), generator=g).clamp(max=C)
    lens[:4] = torch.tensor([0, k - 1 if k > 1 else 0, k, k + 1]).clamp(max=C)
    starts = (torch.randint(0, C + 1, (R,), generator=g) % (C - lens + 1)).int()
    ends = (starts + lens).int()
    for sorted_ in (False, True):
        out = run_cuda(x, k, starts, ends, sorted_, split=split)
        assert (out[0] == -1).all()


@pytest.mark.parametrize("shape", [(0, 10), (3, 0), (4, 1)])
def test_degenerate_shapes(shape):
    x = torch.randn(*shape, device="cuda")
    for sorted_ in (False, True):
        run_cuda(x, 7, sorted_=sorted_)


@pytest.mark.parametrize("split", [None, 1, 3])
@pytest.mark.parametrize("R,C", [(5, 70001), (300, 9000)])
def test_strided_rows_odd_offsets(R, C, split):
    """A padded row stride, a storage offset off every 16-byte boundary, windows starting and
    ending at every residue mod 4."""
    g = rng("strided", R, C, split)
    pad = 13
    wide = torch.randn(R, C + pad, generator=g).cuda()
    for off in (0, 1, 2, 3):
        x = wide[:, off: off + C]
        assert x.stride(0) == C + pad and not x.is_contiguous()
        starts = (torch.randint(0, C // 3, (R,), generator=g) // 4 * 4 + torch.arange(R) % 4).int()
        ends = (C - torch.randint(0, C // 3, (R,), generator=g) // 4 * 4 - (torch.arange(R) // 4) % 4).int()
        for k in (3, 2048):
            run_cuda(x, k, starts, ends, sorted_=bool(off % 2), split=split)


def test_unvalidated_device_windows_are_clamped():
    """CUDA windows are not checked on the host (that would synchronise): the kernel clamps them
    to [0, C] with end >= start, as the CPU clamp does."""
    C, k = 9000, 64
    g = rng("clamp")
    x = randn(g, 4, C)
    starts = torch.tensor([-5, 10, 50, C + 7], dtype=torch.int32)
    ends = torch.tensor([3, 5, C + 100, C + 9], dtype=torch.int32)
    want_s = torch.tensor([0, 10, 50, C], dtype=torch.int32)
    want_e = torch.tensor([3, 10, C, C], dtype=torch.int32)
    out = ops.topk(x, k, starts.cuda(), ends.cuda(), sorted=True)
    assert_topk(out, reference_topk(x, k, want_s, want_e), True, "clamped windows")


# ----------------------------------------------------------------------------------------------
# determinism and CUDA graphs


@pytest.mark.parametrize("split", [None, 1, 7])
@pytest.mark.parametrize("R,C", [(2, 131072), (200, 20000)])
def test_bitwise_deterministic_20_runs(R, C, split):
    g = rng("det", R, C, split)
    # Few distinct values: every selection is decided by ties.
    x = (torch.randint(0, 40, (R, C), generator=g).float() / 8).cuda()
    s, e = random_windows(g, R, C)
    for sorted_ in (False, True):
        first = run_cuda(x, 2048, s, e, sorted_, split=split).clone()
        for _ in range(19):
            again = run_cuda(x, 2048, s, e, sorted_, check=False, split=split)
            assert torch.equal(again, first)


@pytest.mark.parametrize("R,C", [(2, 131072), (300, 20000)])
def test_cuda_graph_capture_and_replay(R, C):
    k = 2048
    g = rng("graph", R, C)
    x = randn(g, R, C)
    s, e = (t.cuda() for t in random_windows(g, R, C))
    out = poisoned_out(R, k)
    ops.topk(x, k, s, e, sorted=True, out=out)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.topk(x, k, s, e, sorted=True, out=out)
    for trial in range(3):
        x.copy_(randn(g, R, C))
        out.fill_(SENTINEL)
        graph.replay()
        torch.cuda.synchronize()
        assert_pad_untouched(out)
        assert_topk(out, reference_topk(x, k, s.cpu(), e.cpu()), True, f"replay {trial}")


# ----------------------------------------------------------------------------------------------
# property test


@st.composite
def topk_problems(draw):
    R = draw(st.integers(1, 6))
    C = draw(st.one_of(st.integers(0, 64), st.integers(0, 3000), st.integers(2000, 20000)))
    k = draw(st.one_of(st.integers(1, 8), st.integers(1, MAX_K), st.sampled_from([MAX_K, max(1, min(C, MAX_K))])))
    levels = draw(st.sampled_from([2, 5, 50, 0]))  # 0: continuous values
    specials = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    windows = draw(st.sampled_from(["none", "random", "full"]))
    sorted_ = draw(st.booleans())
    split = draw(st.sampled_from([None, 1, 2, 3, 9]))
    offset = draw(st.integers(0, 3))
    return R, C, k, levels, specials, seed, windows, sorted_, split, offset

@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(topk_problems())
def test_property_against_reference(problem):
    R, C, k, levels, specials, seed, windows, sorted_, split, offset = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C + offset, generator=g)
    if levels:
        x = torch.randint(-levels, levels, (R, C + offset), generator=g).float() / 4
    pool = torch.tensor([math.nan, -math.inf, math.inf, 0.0, -0.0])
    x = torch.where(torch.rand(R, C + offset, generator=g) < specials * 0.3,
                    pool[torch.randint(0, 5, (R, C + offset), generator=g)], x)
    x = x.cuda()[:, offset:]
    s, e = windows_of(windows, g, R, C)
    run_cuda(x, k, s, e, sorted_, split=split)


# ----------------------------------------------------------------------------------------------
# clusters of CTAs per row, skewed rows


@pytest.mark.parametrize("split", [2, 4, 8, 16])
def test_cluster_sizes_random_windows(split):
    """Rows spread over clusters of every size: windows shorter than the cluster's CTAs (some CTAs
    get nothing), windows at every residue mod 4, k from 1 to the maximum."""
    R, C = 9, 200003
    g = rng("cluster", split)
    x = randn(g, R, C)
    s, e = random_windows(g, R, C)
    s[:3] = torch.tensor([0, 5, 1000], dtype=torch.int32)
    e[:3] = torch.tensor([C, 17, 1000 + 4 * 2048 + 3], dtype=torch.int32)
    for k in (1, 777, 2048):
        for sorted_ in (False, True):
            run_cuda(x, k, s, e, sorted_, split=split)


@pytest.mark.parametrize("split", [None, 1, 2, 16])
@pytest.mark.parametrize("shape", ["ascending", "descending", "tail_block", "nan_head"])
def test_skewed_rows(shape, split):
    """The best items crowd one end of the row, so one warp's (or one CTA's) share holds all the
    candidates, more than its share of the candidate pool; or the row opens with NaN, so the first
    counts give no bound."""
    R, C, k = 3, 262144, 2048
    g = rng("skew", shape, split)
    if shape == "ascending":
        x = torch.arange(C, dtype=torch.float32).repeat(R, 1)
    elif shape == "descending":
        x = -torch.arange(C, dtype=torch.float32).repeat(R, 1)
    elif shape == "tail_block":
        x = torch.rand(R, C, generator=g)
        x[:, C - 20000:] += 2.0
    else:
        x = torch.randn(R, C, generator=g)
        x[:, : C // 4] = math.nan
    for sorted_ in (False, True):
        run_cuda(x.cuda(), k, sorted_=sorted_, split=split)


@pytest.mark.parametrize("split", [1, 8, 16])
def test_one_batch_boundary_windows(split):
    """Windows at the edge of one 1024-item batch per warp (8192 items per CTA of the cluster), at
    every residue mod 4 of the start and of the row's address: on one side every warp's first
    batch is its whole slice and the stream's starting search is reused as the digit-0 search;
    one item longer, or the same length starting mid-slot, and some warp has a second batch, so
    the search runs again after the stream. Four rows per call keep R x Q within one CTA per SM
    (the build that takes the reuse)."""
    n = split * 8 * 1024
    C = n + 17  # odd row length: consecutive rows start at every address residue mod 16 bytes
    g = rng("one_batch", split)
    x = randn(g, 4, C)
    for start in range(4):
        s = torch.full((4,), start, dtype=torch.int32)
        e = torch.tensor([start + n - 1, start + n, start + n + 1, start + n + 4],
                         dtype=torch.int32)
        for k in (1, 2048):
            for sorted_ in (False, True):
                run_cuda(x, k, s, e, sorted_, split=split)


@pytest.mark.parametrize("split", [None, 1, 2, 4])
@pytest.mark.parametrize("R", [2, 300])
def test_sample_overestimates_the_bound(R, split):
    """The stream starts from a bound estimated on each warp's first 1024 items. Here those
    items (blocks of 1024 at every multiple of 8192 columns, where the slices of 1, 2 and 4 CTAs
    per row begin) are the row's only large values, spread over ~160 coarse bins, so the
    estimate lies above the k-th largest value: the kernel must notice and start over with
    proven bounds, or it returns too few of the large items."""
    C, k = 131072, 2048
    g = rng("overestimate", R, split)
    x = torch.randn(R, C, generator=g)
    hot = (torch.arange(C) % 8192) < 1024
    x[:, hot] = torch.exp2(torch.rand(R, int(hot.sum()), generator=g) * 40.0)
    for sorted_ in (False, True):
        run_cuda(x.cuda(), k, sorted_=sorted_, split=split)
