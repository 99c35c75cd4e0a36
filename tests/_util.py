"""Input builders and comparison rules shared by the op tests.

Inputs are drawn on the CPU from a torch.Generator (so a seed reproduces them on every device) and
moved to the device under test; references always run on CPU copies in float64.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch

from indexcache_ops import quant
from indexcache_ops import reference as ref

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])]
PAGE = ref.PAGE_SIZE
MAX_TOPK = 2048


def gpu(test):
    """Mark a test that only makes sense on a GPU."""
    return pytest.mark.gpu(requires_cuda(test))


def raises_naming(argument: str):
    """The ops' contract: bad input is a RuntimeError whose message quotes the argument's name."""
    return pytest.raises(RuntimeError, match=re.escape(f"'{argument}'"))


# ----------------------------------------------------------------------------------------------
# random inputs


def randn(gen, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def randint(gen, low, high, *shape) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen)


def random_windows(gen, rows: int, cols: int, kind: str):
    """int32 (starts, ends) with 0 <= start <= end <= cols.

    kind: "random" (arbitrary offsets, about one row in eight empty), "causal" (a prefill chunk
    at the end of the context: row t sees [0, cols - rows + t + 1)), "full", "empty".
    """
    t = torch.arange(rows)
    if kind == "random":
        a, b = randint(gen, 0, cols + 1, rows), randint(gen, 0, cols + 1, rows)
        starts, ends = torch.minimum(a, b), torch.maximum(a, b)
        empty = randint(gen, 0, 8, rows) == 0
        ends = torch.where(empty, starts, ends)
    elif kind == "causal":
        starts = torch.zeros(rows, dtype=torch.long)
        ends = (cols - rows + t + 1).clamp(0, cols)
    elif kind == "full":
        starts, ends = torch.zeros(rows, dtype=torch.long), torch.full((rows,), cols)
    elif kind == "empty":
        starts = randint(gen, 0, cols + 1, rows)
        ends = starts
    else:
        raise ValueError(kind)
    return starts.int(), ends.int()


def rotated_fp8(gen, *shape, block: int):
    """A Hadamard-rotated activation [..., D] quantised like DeepSeek-V3.2's indexer (pow2 scales,
    one per `block` values) -> (e4m3, scale [..., D / block])."""
    return quant.quantize_fp8_per_block(quant.hadamard(randn(gen, *shape)), block, pow2_scale=True)


def move(obj, device):
    """The same dataclass with every tensor field on `device`."""
    return type(obj)(**{f.name: _to(getattr(obj, f.name), device) for f in fields(obj)})


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


@dataclass
class Indexer:
    q: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    weights: torch.Tensor
    ks: torch.Tensor
    ke: torch.Tensor

    def args(self):
        return self.q, self.k, self.k_scale, self.weights, self.ks, self.ke


def indexer_inputs(gen, S: int, N: int, H: int, D: int, windows: str = "random") -> Indexer:
    q, q_scale = rotated_fp8(gen, S, H, D, block=D)
    k, k_scale = rotated_fp8(gen, N, D, block=D)
    weights = quant.fold_indexer_weights(randn(gen, S, H), q_scale, H, D)
    ks, ke = random_windows(gen, S, N, windows)
    return Indexer(q, k, k_scale.reshape(N), weights, ks, ke)


@dataclass
class PagedIndexer:
    q: torch.Tensor
    kv_cache: torch.Tensor
    weights: torch.Tensor
    context_lens: torch.Tensor
    block_table: torch.Tensor
    max_context_len: int

    def args(self):
        return (self.q, self.kv_cache, self.weights, self.context_lens, self.block_table,
                self.max_context_len)


def _page_tables(gen, lens, spare_pages: int, spare_cols: int, tail: str):
    """Shuffled page ownership for sequences of `lens` tokens -> (block_table int32 [B, max_pages],
    num_pages, slots int64 [B, max(lens)] of every position, -1 past the end).

    Pages no sequence owns (`spare_pages` of them) are left for poison. Unused block-table
    entries hold `tail`: "poison" (ids of spare pages, or 0 when none), "minus1", or "huge"
    (ids far past the cache): a correct op reads none of them."""
    need = [math.ceil(n / PAGE) for n in lens]
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    owned, spare = perm[: sum(need)], perm[sum(need):]
    max_pages = max(need, default=0) + spare_cols
    if tail == "poison" and spare.numel():
        table = spare[randint(gen, 0, spare.numel(), len(lens), max_pages)]
    elif tail in ("poison", "minus1"):
        table = torch.full((len(lens), max_pages), 0 if tail == "poison" else -1)
    elif tail == "huge":
        table = torch.full((len(lens), max_pages), 1 << 30)
    else:
        raise ValueError(tail)
    width = max(lens, default=0)
    slots = torch.full((len(lens), width), -1, dtype=torch.long)
    offset = 0
    for b, n in enumerate(lens):
        table[b, : need[b]] = owned[offset: offset + need[b]]
        offset += need[b]
        pos = torch.arange(n)
        slots[b, :n] = table[b, pos // PAGE] * PAGE + pos % PAGE
    return table.int(), num_pages, slots


def paged_indexer_inputs(gen, lens, next_n: int, H: int, D: int, tail: str = "poison",
                         spare_pages: int = 2, spare_cols: int = 2, extra_len: int = 0) -> PagedIndexer:
    """Sequences of `lens` keys in a shuffled paged cache whose other slots hold NaN keys with NaN
    scales, so reading anything but a visible position poisons the scores."""
    table, num_pages, slots = _page_tables(gen, lens, spare_pages, spare_cols, tail)
    all_k = torch.full((num_pages * PAGE, D), float("nan")).to(torch.float8_e4m3fn)
    all_scale = torch.full((num_pages * PAGE,), float("nan"))
    used = slots[slots >= 0]
    k, k_scale = rotated_fp8(gen, used.numel(), D, block=D)
    all_k[used], all_scale[used] = k, k_scale.reshape(-1)
    cache = quant.pack_indexer_k_cache(all_k, all_scale, torch.arange(num_pages * PAGE), num_pages)
    B = len(lens)
    q, q_scale = rotated_fp8(gen, B, next_n, H, D, block=D)
    weights = quant.fold_indexer_weights(randn(gen, B * next_n, H), q_scale.reshape(B * next_n, H), H, D)
    return PagedIndexer(q, cache, weights, torch.tensor(lens, dtype=torch.int32), table,
                        max(lens, default=0) + extra_len)


@dataclass
class PagedMla:
    q: torch.Tensor
    kv_cache: torch.Tensor
    indices: torch.Tensor
    block_table: torch.Tensor

    def args(self):
        return self.q, self.kv_cache, self.indices, self.block_table


def random_indices(gen, rows: int, topk: int, limits, pad_frac: float = 0.2) -> torch.Tensor:
    """int32 [rows, topk]: row r draws from [0, limits[r]) with repeats, about `pad_frac` of the
    entries -1; a row with limit 0 is all -1."""
    limits = torch.as_tensor(limits, dtype=torch.long).reshape(rows, 1)
    idx = (torch.rand(rows, topk, generator=gen) * limits).long()
    pad = (torch.rand(rows, topk, generator=gen) < pad_frac) | (limits == 0)
    return torch.where(pad, -1, idx).int()


def mla_rows(gen, n: int) -> torch.Tensor:
    return randn(gen, n, ref.MLA_DIM, dtype=torch.bfloat16)


def paged_mla_inputs(gen, lens, next_n: int, Hq: int, topk: int, fp8: bool, pow2_scale: bool = True,
                     tail: str = "poison") -> PagedMla:
    """Decode inputs over a shuffled paged MLA cache (bf16 or FP8) whose unused rows are NaN."""
    table, num_pages, slots = _page_tables(gen, lens, 2, 1, tail)
    rows = torch.full((num_pages * PAGE, ref.MLA_DIM), float("nan"), dtype=torch.bfloat16)
    used = slots[slots >= 0]
    rows[used] = mla_rows(gen, used.numel())
    cache = quant.pack_mla_kv_cache(rows[:, : ref.MLA_LATENT], rows[:, ref.MLA_LATENT:],
                                    torch.arange(num_pages * PAGE), num_pages, fp8=fp8,
                                    pow2_scale=pow2_scale)
    B = len(lens)
    q = randn(gen, B, next_n, Hq, ref.MLA_DIM, dtype=torch.bfloat16)
    limits = torch.tensor(lens).repeat_interleave(next_n)
    indices = random_indices(gen, B * next_n, topk, limits).reshape(B, next_n, topk)
    return PagedMla(q, cache, indices, table)


# ----------------------------------------------------------------------------------------------
# outputs and comparisons


def poisoned(shape, dtype, device, row_pad: int = 0) -> torch.Tensor:
    """An output buffer full of garbage (NaN for floats, 0x7f bytes otherwise), optionally with
    `row_pad` extra columns per row that the op must leave alone."""
    full = list(shape[:-1]) + [shape[-1] + row_pad]
    buf = torch.empty(full, dtype=dtype, device=device)
    if dtype.is_floating_point:
        buf.fill_(float("nan"))
    else:
        buf.view(torch.uint8).fill_(0x7F)
    return buf[..., : shape[-1]]


def assert_padding_untouched(buf: torch.Tensor) -> None:
    """The columns past a poisoned view's width (its row padding) still hold the poison."""
    base = buf._base if buf._base is not None else buf
    pad = base[..., buf.shape[-1]:]
    if pad.numel() == 0:
        return
    if pad.dtype.is_floating_point:
        assert torch.isnan(pad).all(), "the op wrote into the row padding of out"
    else:
        assert (pad.contiguous().view(torch.uint8) == 0x7F).all(), "the op wrote into the row padding of out"


def rel_err(got, want) -> float:
    """Relative Frobenius error ||got - want|| / ||want|| in float64."""
    got = torch.as_tensor(got).detach().cpu().double()
    want = torch.as_tensor(want).detach().cpu().double()
    return (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-300)).item()


def assert_logits_match(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-3) -> None:
    """Scores: relative Frobenius error < tol over the visible entries, exactly -inf elsewhere."""
    got = got.detach().cpu().double()
    visible = torch.isfinite(want)
    assert not torch.isnan(got).any(), "NaN in logits"
    assert torch.all(got[~visible] == -math.inf), "entries outside the window must be -inf"
    assert torch.isfinite(got[visible]).all(), "non-finite score inside a window"
    if visible.any():
        assert rel_err(got[visible], want[visible]) < tol


def _rows_as_sorted_lists(t: torch.Tensor):
    return [sorted(r) for r in t.detach().cpu().tolist()]


def assert_topk_equal(got: torch.Tensor, want: torch.Tensor, sorted_: bool) -> None:
    """Exact top-k: same order when sorted_, else the same multiset per row (including -1s)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == torch.int32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    if sorted_:
        bad = (got != want).any(dim=1).nonzero().flatten().tolist()
        assert not bad, f"rows {bad[:5]} differ, first: got {got[bad[0]].tolist()} want {want[bad[0]].tolist()}"
    else:
        g, w = _rows_as_sorted_lists(got), _rows_as_sorted_lists(want)
        bad = [r for r in range(len(g)) if g[r] != w[r]]
        assert not bad, f"rows {bad[:5]} differ, first: got {g[bad[0]]} want {w[bad[0]]}"


# Relative error of one indexer score against its cancellation-free magnitude: float32 sums on the
# CPU err by a few ulps; the FP8 tensor cores accumulate e4m3 products with fewer bits (the H100
# measured up to 3.3e-4 of the magnitude, bit-identical to cuBLAS's FP8 GEMM on the same inputs),
# and a selected score and the k-th one can err in opposite directions.
TOPK_SCORE_REL_TOL = {"cpu": 1e-5, "cuda": 1e-3}


def assert_topk_near(got: torch.Tensor, scores: torch.Tensor, magnitude: torch.Tensor, starts, ends,
                     k: int, min_recall: float = 0.999) -> None:
    """Top-k of scores computed on ``got``'s device against float64 reference scores.

    Rows with at most k visible keys must select exactly all of them. Otherwise every selected key
    must be visible, unique, and score at least the reference k-th score minus
    ``TOPK_SCORE_REL_TOL[device] * max |term sum|`` of the row, where ``magnitude`` holds
    ``s_k * sum_h |w| relu(q.k)``: near-ties may flip but nothing clearly below the k-th may enter,
    and nothing clearly above it (by the same tolerance) may be missed. Over all rows, at least
    ``min_recall`` of the reference set must be found once the rows hold enough selections for
    that fraction to allow one near-tie flip (k = 1 over 24 rows: a single flip is 4 %).
    """
    rel_tol = TOPK_SCORE_REL_TOL[got.device.type]
    got = got.detach().cpu().tolist()
    scores, magnitude = scores.double(), magnitude.double()
    starts, ends = torch.as_tensor(starts).tolist(), torch.as_tensor(ends).tolist()
    found = total = 0
    for r, row in enumerate(got):
        s, e = starts[r], ends[r]
        sel = [i for i in row if i >= 0]
        assert row.count(-1) == k - len(sel), f"row {r}: -1 mixed into indices"
        assert len(sel) == min(k, e - s), f"row {r}: {len(sel)} indices for a window of {e - s}"
        assert len(set(sel)) == len(sel), f"row {r}: duplicate indices"
        assert all(s <= i < e for i in sel), f"row {r}: index outside [{s}, {e})"
        if e - s <= k:
            continue
        window = scores[r, s:e]
        want = set((ref.topk_order(window.numpy())[:k] + s).tolist())
        kth = window.sort(descending=True).values[k - 1]
        tol = rel_tol * magnitude[r, s:e].max()
        worst = scores[r, sel].min()
        assert worst >= kth - tol, f"row {r}: selected score {worst} < k-th {kth} - {tol}"
        missed = sorted(want - set(sel))
        if missed:
            best_missed = scores[r, missed].max()
            assert best_missed <= kth + tol, \
                f"row {r}: missed score {best_missed} > k-th {kth} + {tol}"
        found += len(want & set(sel))
        total += k
    if total * (1.0 - min_recall) >= 1.0:
        assert found >= min_recall * total, f"recall {found / total}"


def check_attention(out, lse, want_out, want_lse, out_tol: float = 2e-2, lse_tol: float = 1e-3):
    """Attention output: relative error < out_tol; lse within lse_tol (rows without any index:
    out exactly 0, lse exactly -inf); never NaN."""
    out, lse = out.detach().cpu().double(), lse.detach().cpu().double()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in attention output"
    empty = torch.isinf(want_lse)
    assert torch.all(lse[empty] == -math.inf), "lse of a row with no index must be -inf"
    assert torch.all(out[empty] == 0), "out of a row with no index must be 0"
    if (~empty).any():
        assert rel_err(out[~empty], want_out[~empty]) < out_tol
        assert (lse[~empty] - want_lse[~empty]).abs().max() < lse_tol


def e4m3_codes_close(got: torch.Tensor, want: torch.Tensor, max_frac: float = 0.01) -> None:
    """e4m3 codes from two quantisers that may round the quotient x / scale differently (one float32
    division vs float64): each code equal to the reference or its neighbour of the same sign,
    and at most `max_frac` of them different."""
    g = np.asarray(got, dtype=np.int16)
    w = np.asarray(want, dtype=np.int16)
    g_mag, w_mag = g & 0x7F, w & 0x7F
    neighbours = ((g & 0x80) == (w & 0x80)) & (np.abs(g_mag - w_mag) <= 1)
    across_zero = g_mag + w_mag <= 1  # a signed zero next to the smallest subnormal of either sign
    assert np.all(neighbours | across_zero), "e4m3 codes differ by more than one step"
    assert np.mean(g != w) <= max_frac, f"{np.mean(g != w):.4f} of the e4m3 codes differ"


# ----------------------------------------------------------------------------------------------
# small valid arguments of every op, as keyword dicts (the ops' argument names) on a device

BF16 = torch.bfloat16


def _small_gen():
    return torch.Generator().manual_seed(1234)


def _small_ragged(device, **extra):
    x = move(indexer_inputs(_small_gen(), 4, 70, 32, 64, "random"), device)
    return dict(q=x.q, k=x.k, k_scale=x.k_scale, weights=x.weights, ks=x.ks, ke=x.ke, **extra)


def _small_paged(device, **extra):
    # Batch 0 holds 100 tokens in 2 pages, batch 1 holds 10 in 1; 2 columns per block-table row.
    x = move(paged_indexer_inputs(_small_gen(), [100, 10], 2, 32, 64, spare_cols=0), device)
    return dict(q=x.q, kv_cache=x.kv_cache, weights=x.weights, context_lens=x.context_lens,
                block_table=x.block_table, max_context_len=x.max_context_len, **extra)


def _small_topk(device):
    return dict(logits=randn(_small_gen(), 5, 50).to(device), k=8,
                row_starts=torch.tensor([0, 3, 10, 50, 0], dtype=torch.int32, device=device),
                row_ends=torch.tensor([50, 20, 10, 50, 1], dtype=torch.int32, device=device))


def _small_prefill(device):
    g = _small_gen()
    return dict(q=randn(g, 3, 16, 576, dtype=BF16).to(device),
                kv=randn(g, 20, 1, 576, dtype=BF16).to(device),
                indices=torch.tensor([[0, 19, -1, 5]] * 3, dtype=torch.int32, device=device),
                sm_scale=0.05)


def _small_decode(device):
    # Sequences of 100 and 10 tokens; block_table has 3 columns, the cache 5 pages.
    x = move(paged_mla_inputs(_small_gen(), [100, 10], 2, 16, 8, fp8=True), device)
    return dict(q=x.q, kv_cache=x.kv_cache, indices=x.indices, block_table=x.block_table,
                sm_scale=0.05)


def _small_slots(device):
    return torch.tensor([0, 3, -1, 127, 64], device=device)


def _small_k_cache(device):
    return dict(k=randn(_small_gen(), 5, 128, dtype=BF16).to(device),
                kv_cache=torch.zeros(2, PAGE, 1, 132, dtype=torch.uint8, device=device),
                slot_mapping=_small_slots(device))


def _small_mla_cache(device):
    g = _small_gen()
    return dict(kv_c=randn(g, 5, 512, dtype=BF16).to(device), k_pe=randn(g, 5, 64, dtype=BF16).to(device),
                kv_cache=torch.zeros(2, PAGE, 1, 656, dtype=torch.uint8, device=device),
                slot_mapping=_small_slots(device))


SMALL_ARGS = {
    "indexer_logits": _small_ragged,
    "indexer_topk": lambda device: _small_ragged(device, topk=16),
    "indexer_logits_paged": _small_paged,
    "indexer_topk_paged": lambda device: _small_paged(device, topk=16),
    "topk": _small_topk,
    "sparse_mla_prefill": _small_prefill,
    "sparse_mla_decode": _small_decode,
    "indexer_k_quant_and_cache": _small_k_cache,
    "mla_kv_cache_insert": _small_mla_cache,
}
