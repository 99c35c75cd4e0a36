"""Indexer scoring (ragged and paged) and the fused indexer top-k against the float64 reference."""

import pytest
import torch

from indexcache_ops import ops
from indexcache_ops import reference as ref

from _util import (MAX_TOPK, Indexer, assert_logits_match, assert_padding_untouched,
                   assert_topk_equal, assert_topk_near, gpu, indexer_inputs, move,
                   paged_indexer_inputs, poisoned)

SHAPES = [(37, 129, 64, 128), (37, 129, 32, 64), (64, 1000, 32, 128), (5, 2048, 64, 64)]


def magnitudes(x: Indexer) -> torch.Tensor:
    """s_k * sum_h |w| relu(q.k): the size of the terms a float32 score sums, for the top-k
    tolerance (k scales are positive, so this is the reference score with |weights|)."""
    return ref.indexer_logits(x.q, x.k, x.k_scale, x.weights.abs(), x.ks, x.ke)


def paged_magnitudes(x) -> torch.Tensor:
    return ref.indexer_logits_paged(x.q, x.kv_cache, x.weights.abs(), x.context_lens,
                                    x.block_table, x.max_context_len)


# ---- indexer_logits


@pytest.mark.parametrize("windows", ["random", "causal", "full"])
@pytest.mark.parametrize("S,N,H,D", SHAPES)
def test_indexer_logits(gen, device, S, N, H, D, windows):
    x = indexer_inputs(gen, S, N, H, D, windows)
    want = ref.indexer_logits(*x.args())
    assert_logits_match(ops.indexer_logits(*move(x, device).args()), want)


def test_indexer_logits_out_padded_rows(gen, device):
    S, N = 37, 129
    x = move(indexer_inputs(gen, S, N, 64, 128), device)
    out = poisoned((S, N), torch.float32, device, row_pad=7)
    assert ops.indexer_logits(*x.args(), out=out) is out
    assert_padding_untouched(out)
    assert_logits_match(out, ref.indexer_logits(*x.args()))


def test_indexer_logits_empty_windows(gen, device):
    x = indexer_inputs(gen, 9, 70, 32, 64, "empty")
    got = ops.indexer_logits(*move(x, device).args())
    assert torch.all(got == -torch.inf)


# ---- indexer_logits_paged


@pytest.mark.parametrize("tail", ["poison", "minus1", "huge"])
@pytest.mark.parametrize("next_n", [1, 2, 3, 4])
@pytest.mark.parametrize("H,D", [(64, 128), (32, 64)])
def test_indexer_logits_paged(gen, device, H, D, next_n, tail):
    x = paged_indexer_inputs(gen, [200, 64, 1 + next_n, 129], next_n, H, D, tail=tail, extra_len=37)
    want = ref.indexer_logits_paged(*x.args())
    got = ops.indexer_logits_paged(*move(x, device).args())
    assert got.shape == (4 * next_n, x.max_context_len)
    assert_logits_match(got, want)


def test_indexer_logits_paged_short_contexts(gen, device):
    # Contexts shorter than next_n leave the first MTP rows empty (all -inf); zero length too.
    next_n = 4
    x = paged_indexer_inputs(gen, [0, 1, 3, 4, 65], next_n, 32, 128)
    want = ref.indexer_logits_paged(*x.args())
    got = ops.indexer_logits_paged(*move(x, device).args())
    assert_logits_match(got, want)
    assert torch.all(got[:next_n] == -torch.inf)


def test_indexer_logits_paged_out(gen, device):
    x = move(paged_indexer_inputs(gen, [300, 17], 2, 64, 128, extra_len=5), device)
    out = poisoned((4, x.max_context_len), torch.float32, device, row_pad=5)
    assert ops.indexer_logits_paged(*x.args(), out=out) is out
    assert_padding_untouched(out)
    assert_logits_match(out, ref.indexer_logits_paged(*x.args()))


# ---- indexer_topk


@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("topk", [1, 64, 100, MAX_TOPK])
@pytest.mark.parametrize("S,N,H,D", [(37, 129, 64, 128), (33, 1500, 32, 64)])
def test_indexer_topk(gen, device, S, N, H, D, topk, sorted_):
    x = indexer_inputs(gen, S, N, H, D, "random")
    out = poisoned((S, topk), torch.int32, device, row_pad=3)
    got = ops.indexer_topk(*move(x, device).args(), topk, sorted=sorted_, out=out)
    assert got is out
    assert_padding_untouched(out)
    assert_topk_near(out, ref.indexer_logits(*x.args()), magnitudes(x), x.ks, x.ke, topk)
    if device == "cpu":  # one implementation family: the fused op equals top-k of the scores
        unfused = ops.topk(ops.indexer_logits(*x.args()), topk, x.ks, x.ke, sorted=sorted_)
        assert_topk_equal(out, unfused, sorted_)


def test_indexer_topk_duplicate_keys_tie_to_smaller_index(gen, device):
    # Keys 2j and 2j + 1 are identical, so their scores tie exactly in any arithmetic: whenever
    # the odd twin is selected the even one must be too.
    S, N, topk = 24, 400, 50
    x = indexer_inputs(gen, S, N, 64, 128, "random")
    x.k[1::2] = x.k[0::2]
    x.k_scale[1::2] = x.k_scale[0::2]
    got = ops.indexer_topk(*move(x, device).args(), topk).cpu()
    assert_topk_near(got, ref.indexer_logits(*x.args()), magnitudes(x), x.ks, x.ke, topk)
    for r, row in enumerate(got.tolist()):
        chosen = set(row)
        window = range(x.ks[r].item(), x.ke[r].item())
        assert all(i - 1 in chosen for i in chosen if i % 2 == 1 and i - 1 in window), f"row {r}"


def test_indexer_topk_rows_shorter_than_k(gen, device):
    S, N, topk = 20, 90, 128  # every window (<= 90 keys) is shorter than k: all keys, -1 padded
    x = indexer_inputs(gen, S, N, 32, 128, "random")
    got = ops.indexer_topk(*move(x, device).args(), topk, sorted=True)
    assert_topk_equal(got, ref.indexer_topk(*x.args(), topk), sorted_=False)
    assert torch.all(got[:, -1] == -1)


@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("topk", [16, 150])
@pytest.mark.parametrize("next_n", [1, 2, 4])
def test_indexer_topk_paged(gen, device, next_n, topk, sorted_):
    x = paged_indexer_inputs(gen, [333, 40, next_n, 191], next_n, 64, 128, extra_len=11)
    rows = 4 * next_n
    out = poisoned((rows, topk), torch.int32, device, row_pad=1)
    got = ops.indexer_topk_paged(*move(x, device).args(), topk, sorted=sorted_, out=out)
    assert got is out
    assert_padding_untouched(out)
    ends = torch.from_numpy(ref.paged_visible_ends(x.context_lens, next_n, x.max_context_len))
    scores = ref.indexer_logits_paged(*x.args())
    assert_topk_near(out, scores, paged_magnitudes(x), torch.zeros_like(ends), ends, topk)
    if device == "cpu":
        unfused = ops.topk(ops.indexer_logits_paged(*x.args()), topk, torch.zeros_like(ends).int(),
                           ends.int(), sorted=sorted_)
        assert_topk_equal(out, unfused, sorted_)


# ---- GPU scale


@gpu
def test_indexer_topk_does_not_materialise_scores(gen):
    # The [S, N] float32 scores would be 1 GiB here; the fused op may use a small workspace only.
    S, N, H, D, topk = 4096, 65536, 64, 128, MAX_TOPK
    x = move(indexer_inputs(gen, S, N, H, D, "causal"), "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = ops.indexer_topk(*x.args(), topk)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - got.numel() * 4
    assert extra < 256 << 20, f"indexer_topk allocated {extra >> 20} MiB beyond its output"
    rows = torch.tensor([0, 1000, 2047, 4095])
    sub = Indexer(x.q[rows], x.k, x.k_scale, x.weights[rows], x.ks[rows], x.ke[rows])
    assert_topk_near(got[rows], ref.indexer_logits(*sub.args()), magnitudes(sub), sub.ks.cpu(),
                     sub.ke.cpu(), topk)


@gpu
def test_indexer_topk_paged_long_context(gen):
    next_n, topk = 2, MAX_TOPK
    x = paged_indexer_inputs(gen, [20000, 6000, 2100], next_n, 64, 128, extra_len=64)
    got = ops.indexer_topk_paged(*move(x, "cuda").args(), topk)
    ends = torch.from_numpy(ref.paged_visible_ends(x.context_lens, next_n, x.max_context_len))
    assert_topk_near(got, ref.indexer_logits_paged(*x.args()), paged_magnitudes(x),
                     torch.zeros_like(ends), ends, topk)
