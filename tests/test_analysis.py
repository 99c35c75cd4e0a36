"""topk_overlap / overlap_matrix against brute-force Python sets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from indexcache_ops.analysis import overlap_matrix, topk_overlap

def brute_overlap(a_row, b_row):
    """|A ∩ B| / |A| over the non-negative entries, 1.0 when A is empty."""
    a = {int(x) for x in a_row if x >= 0}
    b = {int(x) for x in b_row if x >= 0}
    return len(a & b) / len(a) if a else 1.0


def random_indices(generator, rows, k, num_keys, dtype):
    # Small key range so rows share indices and contain repeats; about a quarter is -1 padding.
    x = torch.randint(0, num_keys, (rows, k), generator=generator)
    x[torch.rand(rows, k, generator=generator) < 0.25] = -1
    return x.to(dtype)


@pytest.mark.parametrize("dtypes", [(torch.int32, torch.int32), (torch.int64, torch.int32)])
@pytest.mark.parametrize("ka,kb", [(8, 8), (5, 11), (16, 3)])
def test_topk_overlap_matches_sets(device, dtypes, ka, kb):
    g = torch.Generator().manual_seed(ka * 100 + kb)
    a = random_indices(g, 64, ka, 20, dtypes[0])
    b = random_indices(g, 64, kb, 20, dtypes[1])
    a[0] = -1  # a row with no valid index
    b[1] = -1  # a row where b selects nothing
    got = topk_overlap(a.to(device), b.to(device))
    assert got.dtype == torch.float32 and got.device.type == device and got.shape == (64,)
    want = torch.tensor([brute_overlap(x.tolist(), y.tolist()) for x, y in zip(a, b)])
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-6)
    assert got[0] == 1.0 and got[1] == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(-3, 12), min_size=1, max_size=9),
                          st.lists(st.integers(-3, 12), min_size=1, max_size=9)),
                min_size=1, max_size=6))
def test_topk_overlap_property(rows):
    # Pad every row to a common width with -1, which must not change any answer.
    ka = max(len(a) for a, _ in rows)
    kb = max(len(b) for _, b in rows)
    a = torch.tensor([x + [-1] * (ka - len(x)) for x, _ in rows])
    b = torch.tensor([y + [-1] * (kb - len(y)) for _, y in rows])
    got = topk_overlap(a, b).tolist()
    want = [brute_overlap(x, y) for x, y in rows]
    assert got == pytest.approx(want, abs=1e-6)


def test_topk_overlap_order_and_duplicates():
    a = torch.tensor([[5, 3, 3, 9, -1], [1, 2, 3, 4, 5]])
    b = torch.tensor([[9, 5, -1], [5, 4, 3]])
    assert topk_overlap(a, b).tolist() == pytest.approx([2 / 3, 3 / 5])
    assert topk_overlap(b, a).tolist() == pytest.approx([1.0, 1.0])


def test_overlap_matrix_matches_sets(device):
    g = torch.Generator().manual_seed(0)
    layers = [random_indices(g, 32, 6, 15, torch.int32) for _ in range(5)]
    got = overlap_matrix([x.to(device) for x in layers])
    assert got.shape == (5, 5) and got.dtype == torch.float32 and got.device.type == device
    want = torch.tensor([[sum(brute_overlap(x.tolist(), y.tolist()) for x, y in zip(li, lj)) / 32
                          for lj in layers] for li in layers])
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.diagonal().cpu(), torch.ones(5))
    # A stacked [L, R, k] tensor is the same as the list of its layers.
    torch.testing.assert_close(overlap_matrix(torch.stack(layers).to(device)), got)


def test_overlap_matrix_layers_of_different_k():
    a = torch.tensor([[0, 1, 2, 3]])
    b = torch.tensor([[0, 1]])
    torch.testing.assert_close(overlap_matrix([a, b]), torch.tensor([[1.0, 0.5], [1.0, 1.0]]))


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long)), "integer index tensor"),
    ((torch.zeros(3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)), "2-D"),
    ((torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.long)), "integer"),
    ((torch.zeros(3, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long)),
     "same number of rows"),
    ((torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long)),
     "at least one column"),
    (([[1, 2]], torch.zeros(1, 2, dtype=torch.long)), "got list"),
])
def test_topk_overlap_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        topk_overlap(*args)


def test_overlap_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one layer"):
        overlap_matrix([])
    with pytest.raises(ValueError, match="at least one row"):
        overlap_matrix([torch.zeros(0, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="layer 1"):
        overlap_matrix([torch.zeros(3, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)])
