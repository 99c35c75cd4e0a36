"""The fused indexer_topk kernel (csrc/indexer/indexer_topk.cu), switched on by
INDEXCACHE_INDEXER_TOPK=fused. Its scores are computed by the same device code as indexer_logits,
bit for bit, so it must return exactly the keys of topk(indexer_logits(...)) on the same GPU, in
(score desc, key asc) order; on top of that, sampled rows are checked against the float64
reference, and score patterns with known answers (ties everywhere, ascending and descending
scores) are checked against index arithmetic alone."""

import pytest
import torch

from indexcache_ops import ops
from indexcache_ops import reference as ref

from _util import (MAX_TOPK, Indexer, assert_padding_untouched, assert_topk_equal,
                   assert_topk_near, gpu, indexer_inputs, move, poisoned, random_windows)

HEADS = 64  # the cases with a single head count; the kernel has H = 32 and 64


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("INDEXCACHE_INDEXER_TOPK", "fused")


def fused_rows(heads: int = HEADS, extra: int = 37) -> int:
    """A query count the kernel takes: >= 8 groups of 128 / H queries per SM (odd, so the last
    group is partly empty)."""
    per_group = 128 // heads
    return 8 * per_group * torch.cuda.get_device_properties(0).multi_processor_count + extra


def two_kernel(x: Indexer, k: int) -> torch.Tensor:
    return ops.topk(ops.indexer_logits(*x.args()), k, x.ks, x.ke, sorted=True)


def check_sampled_rows(got: torch.Tensor, x: Indexer, k: int, rows: int = 24) -> None:
    """float64 reference on a few rows (the whole [S, N] in float64 would take minutes)."""
    pick = torch.linspace(0, x.q.shape[0] - 1, rows).long()
    sub = Indexer(*(t.cpu() for t in (x.q[pick], x.k, x.k_scale, x.weights[pick], x.ks[pick],
                                      x.ke[pick])))
    scores = ref.indexer_logits(*sub.args())
    magnitude = ref.indexer_logits(sub.q, sub.k, sub.k_scale, sub.weights.abs(), sub.ks, sub.ke)
    assert_topk_near(got[pick], scores, magnitude, sub.ks, sub.ke, k)


@gpu
@pytest.mark.parametrize("topk", [1, 100, MAX_TOPK])
@pytest.mark.parametrize("H,D", [(64, 128), (64, 64), (32, 128), (32, 64)])
@pytest.mark.parametrize("windows,N", [("random", 3001), ("causal", 9000), ("full", 4700)])
def test_fused_equals_two_kernel(gen, fused, windows, N, H, D, topk):
    # sorted=False (ascending keys) is covered by test_fused_is_deterministic_either_way.
    S = fused_rows(H)
    x = move(indexer_inputs(gen, S, N, H, D, windows), "cuda")
    out = poisoned((S, topk), torch.int32, "cuda", row_pad=3)
    got = ops.indexer_topk(*x.args(), topk, sorted=True, out=out)
    assert got is out
    assert_padding_untouched(out)
    assert_topk_equal(out, two_kernel(x, topk), sorted_=True)
    check_sampled_rows(out, x, topk)


@gpu
@pytest.mark.parametrize("H", [64, 32])
def test_fused_is_deterministic_either_way(gen, fused, H):
    # sorted=False returns each row's keys in ascending key order (the order the kernel keeps
    # them in), sorted=True in (score desc, key asc) order; both are the same on every run.
    S, N, topk = fused_rows(H), 12000, MAX_TOPK
    x = move(indexer_inputs(gen, S, N, H, 128, "random"), "cuda")
    unsorted = [ops.indexer_topk(*x.args(), topk, sorted=False) for _ in range(3)]
    ordered = [ops.indexer_topk(*x.args(), topk, sorted=True) for _ in range(3)]
    for runs in (unsorted, ordered):
        for r in runs[1:]:
            assert torch.equal(r, runs[0])
    want = two_kernel(x, topk)
    assert_topk_equal(ordered[0], want, sorted_=True)
    assert_topk_equal(unsorted[0], want, sorted_=False)
    keys = unsorted[0].long()
    valid = keys >= 0
    # Ascending within each row; the -1 padding follows the last key.
    assert torch.all(~valid[:, 1:] | (keys[:, 1:] > keys[:, :-1]))
    assert torch.all(valid[:, :-1] | ~valid[:, 1:])


def monotone_inputs(gen, S: int, N: int, H: int, ascending: bool | None, windows: str) -> Indexer:
    """Every key the same positive e4m3 row and every query positive, so each query's score is
    k_scale[s] times a positive constant: strictly monotone in s (or constant: `ascending=None`)."""
    x = indexer_inputs(gen, S, N, H, 128, windows)
    q = x.q.float().abs().clamp_min(0.25).to(x.q.dtype)
    k = x.k[:1].float().abs().clamp_min(0.25).to(x.k.dtype).expand(N, -1).contiguous()
    if ascending is None:
        scale = torch.ones(N)
    else:
        ramp = 1.0 + torch.arange(N, dtype=torch.float32) * 1e-3
        scale = ramp if ascending else ramp.flip(0)
    return Indexer(q, k, scale, x.weights.abs() + 1e-3, x.ks, x.ke)


def expected_by_position(ks, ke, k: int, from_end: bool) -> torch.Tensor:
    """The k last (from_end) or first keys of each window, in the order of their scores."""
    rows = []
    for s, e in zip(ks.tolist(), ke.tolist()):
        keys = list(range(e - 1, s - 1, -1)) if from_end else list(range(s, e))
        keys = keys[:k]
        rows.append(keys + [-1] * (k - len(keys)))
    return torch.tensor(rows, dtype=torch.int32)


@gpu
@pytest.mark.parametrize("order", ["ascending", "descending", "all-equal"])
@pytest.mark.parametrize("windows", ["causal", "random"])
@pytest.mark.parametrize("H", [64, 32])
def test_fused_known_answers(gen, fused, H, order, windows):
    # Ascending scores make every key enter its query's pool (the most cuts); all-equal scores
    # make every candidate differ in its key bits alone (the longest radix select).
    S, N, topk = fused_rows(H), 7000, MAX_TOPK
    x = monotone_inputs(gen, S, N, H, {"ascending": True, "descending": False}.get(order), windows)
    got = ops.indexer_topk(*move(x, "cuda").args(), topk, sorted=True).cpu()
    want = expected_by_position(x.ks, x.ke, topk, from_end=order == "ascending")
    assert_topk_equal(got, want, sorted_=True)


@gpu
def test_fused_empty_groups_and_rows(gen, fused):
    S, N, topk = fused_rows(), 2500, 300
    x = indexer_inputs(gen, S, N, HEADS, 128, "random")
    starts, _ = random_windows(gen, S, N, "empty")
    x.ks[100:400], x.ke[100:400] = starts[100:400], starts[100:400]  # whole groups without keys
    x.ke[S - 1] = x.ks[S - 1]                                          # the last, half group
    got = ops.indexer_topk(*move(x, "cuda").args(), topk)
    assert torch.all(got[100:400] == -1) and torch.all(got[S - 1] == -1)
    assert_topk_equal(got, two_kernel(move(x, "cuda"), topk), sorted_=False)


@gpu
def test_fused_no_keys(gen, fused):
    S = fused_rows()
    x = indexer_inputs(gen, S, 1, HEADS, 128, "full")
    x = Indexer(x.q, x.k[:0], x.k_scale[:0], x.weights, torch.zeros_like(x.ks),
                torch.zeros_like(x.ke))
    out = poisoned((S, 64), torch.int32, "cuda", row_pad=2)
    ops.indexer_topk(*move(x, "cuda").args(), 64, out=out)
    assert_padding_untouched(out)
    assert torch.all(out == -1)


@gpu
def test_fused_uses_no_workspace(gen, fused):
    S, N, topk = 4096, 65536, MAX_TOPK
    x = move(indexer_inputs(gen, S, N, HEADS, 128, "causal"), "cuda")
    out = torch.empty(S, topk, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ops.indexer_topk(*x.args(), topk, out=out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == before, "the fused kernel allocated memory"
    check_sampled_rows(out, x, topk, rows=8)


@gpu
def test_fused_cuda_graph_replays_new_inputs_and_windows(gen, fused):
    # A serving engine captures the op once and replays it after writing the next step's queries,
    # weights and windows in place: no host metadata, no allocation, nothing baked in.
    S, N, topk = fused_rows(), 6000, 512
    x = move(indexer_inputs(gen, S, N, HEADS, 128, "random"), "cuda")
    out = torch.full((S, topk), -7, dtype=torch.int32, device="cuda")
    ops.indexer_topk(*x.args(), topk, out=out)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.indexer_topk(*x.args(), topk, out=out)
    for windows in ("causal", "random", "full"):
        fresh = indexer_inputs(gen, S, N, HEADS, 128, windows)
        for name in ("q", "k", "k_scale", "weights", "ks", "ke"):
            getattr(x, name).copy_(getattr(fresh, name))
        out.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert_topk_equal(out, two_kernel(x, topk), sorted_=False)
