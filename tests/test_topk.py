"""topk over row windows of a logits matrix: exact sets (and order when sorted) against the float64
reference, on random, tied, special-valued and strided inputs; a hypothesis property test; and
GPU-scale checks against CuPy."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from indexcache_ops import ops
from indexcache_ops import reference as ref

from _util import (DEVICES, MAX_TOPK, assert_padding_untouched, assert_topk_equal, gpu, poisoned,
                   randint, randn, random_windows)

NAN, INF = math.nan, math.inf


def strided(values: torch.Tensor, gen, pad: int = 13) -> torch.Tensor:
    """The same [R, C] values as a view with a padded row stride and a storage offset."""
    r, c = values.shape
    wide = randn(gen, r, c + pad)
    off = pad // 2
    wide[:, off: off + c] = values
    return wide[:, off: off + c]


def run_topk(logits, k, windows, device, sorted_):
    """Call the op on `device` through out= (poisoned, padded rows) and check it against the
    reference."""
    starts, ends = windows if windows is not None else (None, None)
    args = [None if t is None else t.to(device) for t in (starts, ends)]
    out = poisoned((logits.shape[0], k), torch.int32, device, row_pad=3)
    res = ops.topk(logits.to(device), k, *args, sorted=sorted_, out=out)
    assert res is out
    assert_padding_untouched(out)
    assert_topk_equal(out, ref.topk(logits, k, starts, ends), sorted_)
    functional = ops.topk(logits.to(device), k, *args, sorted=sorted_)
    assert_topk_equal(functional, ref.topk(logits, k, starts, ends), sorted_)


@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("C,k", [(1, 1), (129, 7), (129, 129), (129, 300), (1000, 64), (2047, 256)])
@pytest.mark.parametrize("windows", ["random", "full", "none"])
def test_topk_random(gen, device, C, k, windows, sorted_):
    R = 37
    logits = strided(randn(gen, R, C), gen).to(device)
    w = None if windows == "none" else random_windows(gen, R, C, windows)
    run_topk(logits, k, w, device, sorted_)


def test_topk_k_max(gen, device):
    R, C = 5, 4100
    logits = randn(gen, R, C)
    run_topk(logits, MAX_TOPK, random_windows(gen, R, C, "random"), device, sorted_=True)
    run_topk(logits, MAX_TOPK, None, device, sorted_=False)


@pytest.mark.parametrize("sorted_", [False, True])
def test_topk_windows_at_offsets_and_empty(gen, device, sorted_):
    R, C, k = 40, 500, 16
    logits = randn(gen, R, C)
    starts = randint(gen, 0, C + 1, R)
    lens = torch.tensor([0, 1, 15, 16, 17] * 8)  # around k, plus empty windows
    ends = (starts + lens).clamp(max=C)
    run_topk(logits, k, (starts.int(), ends.int()), device, sorted_)


@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("levels", [1, 2, 5])
def test_topk_ties_go_to_smaller_index(gen, device, levels, sorted_):
    R, C, k = 16, 777, 100
    logits = randint(gen, 0, levels, R, C).float()
    logits[0] = 3.0  # all equal: the first k columns
    w = random_windows(gen, R, C, "random")
    run_topk(strided(logits, gen), k, w, device, sorted_)
    got = ops.topk(logits.to(device), k, sorted=sorted_)
    assert sorted(got[0].tolist()) == list(range(k))


def test_topk_signed_zeros_are_equal(device):
    # -0.0 == +0.0, so the tie rule (smaller index) decides, not the sign bit.
    logits = torch.tensor([[-0.0, 0.0, -0.0, 0.0, -1.0]])
    got = ops.topk(logits.to(device), 2, sorted=True)
    assert got.tolist() == [[0, 1]]


@pytest.mark.parametrize("sorted_", [False, True])
def test_topk_nan_and_inf(gen, device, sorted_):
    R, C, k = 12, 300, 40
    logits = randn(gen, R, C)
    special = torch.tensor([NAN, -NAN, INF, -INF, 3.4e38, -3.4e38, 1e-45, -1e-45])
    where = torch.rand(R, C, generator=gen) < 0.3
    logits[where] = special[randint(gen, 0, len(special), int(where.sum()))]
    logits[0] = NAN  # all NaN: NaNs are still values, picked by index
    logits[1] = -INF
    logits[2, :] = NAN
    logits[2, 100:110] = -INF  # -inf beats NaN
    logits[3] = torch.where(torch.arange(C) % 2 == 0, torch.tensor(-NAN), torch.tensor(NAN))
    logits[4] = INF
    run_topk(strided(logits, gen), k, random_windows(gen, R, C, "random"), device, sorted_)
    run_topk(logits, k, None, device, sorted_)
    got = ops.topk(logits.to(device), k, sorted=True).cpu()
    assert got[0].tolist() == list(range(k)) and got[1].tolist() == list(range(k))
    assert got[2, :10].tolist() == list(range(100, 110)) and got[2, 10:].tolist() == list(range(30))


def test_topk_many_values_in_one_bin(device):
    # A peer failure: threshold-bin candidate buffers that overflow silently when many keys share
    # a coarse radix bin. 20000 distinct values one ulp apart all share their top 16 bits.
    C, k = 20000, MAX_TOPK
    base = torch.tensor(1.0).view(torch.int32)
    logits = (base + torch.randperm(C, generator=torch.Generator().manual_seed(0))).int()
    logits = logits.view(torch.float32).reshape(1, C).repeat(3, 1)
    logits[1, ::3] = 1.0  # and a third of them exactly tied
    run_topk(logits, k, None, device, sorted_=True)


def test_topk_repeatable(gen, device):
    logits = randint(gen, 0, 3, 8, 3000).float().to(device)
    first = ops.topk(logits, 500)
    for _ in range(3):
        assert torch.equal(ops.topk(logits, 500), first)


# ---- hypothesis: shapes, k, windows and value distributions, including many duplicates

_SPECIAL = [0.0, -0.0, 1.0, -1.0, INF, -INF, NAN, 3.4e38, 1e-45]
_VALUES = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from(_SPECIAL),
    st.integers(-2, 2).map(float),
)


@st.composite
def topk_cases(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(0, 300))
    dist = draw(st.sampled_from(["floats", "special", "levels", "mixed"]))
    elements = {"floats": st.floats(width=32), "special": st.sampled_from(_SPECIAL),
                "levels": st.integers(0, 3).map(float), "mixed": _VALUES}[dist]
    values = draw(hnp.arrays(np.float32, (rows, cols), elements=elements))
    k = draw(st.integers(1, 320))
    windows = None
    if draw(st.booleans()):
        pairs = [sorted(draw(st.lists(st.integers(0, cols), min_size=2, max_size=2))) for _ in range(rows)]
        windows = tuple(torch.tensor(c, dtype=torch.int32) for c in zip(*pairs))
    return torch.from_numpy(values), k, windows, draw(st.booleans())


@pytest.mark.parametrize("device_", DEVICES)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=topk_cases())
def test_topk_property(device_, case):
    logits, k, windows, sorted_ = case
    run_topk(logits, k, windows, device_, sorted_)


# ---- GPU scale: CuPy as an independent reference


def _cupy_topk(cp, logits, k: int, starts, ends):
    """Sorted top-k per row by one sort of 64-bit keys (1 + value key) << 32 | (2^32 - 1 - column).

    The value key increases with the value: float bits with the sign flipped for positives and all
    bits flipped for negatives, -0.0 folded into +0.0 and every NaN mapped to 0, below -inf.
    Columns outside the window get composite key 0 and only fill the -1 padding."""
    cols = logits.shape[1]
    v = cp.where(logits == 0, cp.float32(0), logits)
    bits = v.view(cp.uint32)
    key = cp.where(bits >> 31 != 0, ~bits, bits | cp.uint32(0x80000000)).astype(cp.uint64)
    key = cp.where(cp.isnan(v), cp.uint64(0), key)
    col = cp.arange(cols, dtype=cp.int64)[None, :]
    inside = (col >= starts[:, None]) & (col < ends[:, None])
    low = cp.uint64(0xFFFFFFFF)
    composite = ((key + cp.uint64(1)) << cp.uint64(32)) | (low - col.astype(cp.uint64))
    composite = cp.where(inside, composite, cp.uint64(0))
    best = cp.sort(composite, axis=1)[:, ::-1][:, :k]
    idx = (low - (best & low)).astype(cp.int64)
    lens = (ends - starts).astype(cp.int64)
    return cp.where(cp.arange(k)[None, :] < lens[:, None], idx, -1).astype(cp.int32)


@gpu
@pytest.mark.parametrize("sorted_", [False, True])
def test_topk_large_vs_cupy(sorted_):
    cp = pytest.importorskip("cupy")
    rows, cols, k = 512, 131072, MAX_TOPK
    rs = cp.random.RandomState(1234)
    x = rs.standard_normal((rows, cols), dtype=cp.float32)
    x[::4] = cp.floor(x[::4] * 2)  # many exact ties
    x[1::4] = 1 + rs.standard_normal((rows // 4, cols), dtype=cp.float32) * 1e-6  # one coarse bin
    x[2::8, ::97] = cp.nan
    x[3::8, ::89] = -cp.inf
    starts = rs.randint(0, cols // 2, rows).astype(cp.int32)
    ends = (starts + rs.randint(0, cols // 2 + 1, rows)).astype(cp.int32)
    ends[::16] = starts[::16] + 100  # rows shorter than k
    want = torch.from_dlpack(_cupy_topk(cp, x, k, starts, ends)).cpu()
    got = ops.topk(torch.from_dlpack(x), k, torch.from_dlpack(starts), torch.from_dlpack(ends),
                   sorted=sorted_)
    assert_topk_equal(got, want, sorted_)


@gpu
def test_topk_dlpack_interop():
    cp = pytest.importorskip("cupy")
    x = cp.random.RandomState(7).standard_normal((64, 4096), dtype=cp.float32)
    logits = torch.from_dlpack(x)
    assert logits.data_ptr() == x.data.ptr  # zero copy
    got = cp.from_dlpack(ops.topk(logits, 32, sorted=True))
    want = ref.topk(torch.from_dlpack(x).cpu(), 32)
    assert got.dtype == cp.int32
    np.testing.assert_array_equal(cp.asnumpy(got), want.numpy())


@gpu
def test_topk_cuda_graph_replay(gen):
    # Persistent output buffers under a captured graph: the peers that reallocate per call break.
    R, C, k = 32, 5000, 256
    static = torch.empty(R, C, device="cuda")
    out = torch.empty(R, k, dtype=torch.int32, device="cuda")
    static.copy_(randn(gen, R, C))
    ops.topk(static, k, out=out)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.topk(static, k, out=out, sorted=True)
    for _ in range(3):
        fresh = randn(gen, R, C)
        static.copy_(fresh)
        graph.replay()
        assert_topk_equal(out, ref.topk(fresh, k), sorted_=True)
