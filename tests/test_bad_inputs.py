"""Every op rejects bad input with a RuntimeError that names the offending argument, and accepts
empty inputs. Structural checks (dtype, rank, shape, contiguity) run on every device; value checks
(windows, indices, slots, lengths) read the data and so exist on CPU only (CUDA clamps/masks)."""

import math
import re

import pytest
import torch

from indexcache_ops import ops

from _util import (BF16, MAX_TOPK, PAGE, SMALL_ARGS, gpu, indexer_inputs, move,
                   paged_indexer_inputs, raises_naming)


def call(op: str, args: dict):
    return getattr(ops, op)(**args)


def transposed(t: torch.Tensor, d0: int = 0, d1: int = 1) -> torch.Tensor:
    """Same shape and values, non-contiguous strides."""
    return t.transpose(d0, d1).contiguous().transpose(d0, d1)


def every_other_column(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, column stride 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def zeros_like_shape(t: torch.Tensor, *shape, dtype=None) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype or t.dtype, device=t.device)


def edit(**changes):
    """A mutation: each keyword is a function of the valid argument dict giving the new value."""
    return lambda a: {**a, **{k: f(a) for k, f in changes.items()}}


def set_item(name, index, value):
    """A mutation writing one element of a (CPU) argument."""
    def f(a):
        t = a[name].clone()
        t[index] = value
        return t
    return edit(**{name: f})


# (op names, case id, mutation, argument the error must name, cpu only)
RAGGED_OPS = ("indexer_logits", "indexer_topk")
PAGED_OPS = ("indexer_logits_paged", "indexer_topk_paged")
CASES = [
    (RAGGED_OPS, "q-dtype", edit(q=lambda a: a["q"].to(BF16)), "q", False),
    (RAGGED_OPS, "q-rank", edit(q=lambda a: a["q"][0]), "q", False),
    (RAGGED_OPS, "q-heads", edit(q=lambda a: zeros_like_shape(a["q"], 4, 16, 64)), "q", False),
    (RAGGED_OPS, "q-dim", edit(q=lambda a: zeros_like_shape(a["q"], 4, 32, 96)), "q", False),
    (RAGGED_OPS, "q-noncontig", edit(q=lambda a: transposed(a["q"])), "q", False),
    (RAGGED_OPS, "k-dtype", edit(k=lambda a: a["k"].float()), "k", False),
    (RAGGED_OPS, "k-dim", edit(k=lambda a: zeros_like_shape(a["k"], 70, 128)), "k", False),
    (RAGGED_OPS, "k-noncontig", edit(k=lambda a: transposed(a["k"])), "k", False),
    (RAGGED_OPS, "k_scale-len", edit(k_scale=lambda a: a["k_scale"][:-1]), "k_scale", False),
    (RAGGED_OPS, "k_scale-dtype", edit(k_scale=lambda a: a["k_scale"].double()), "k_scale", False),
    (RAGGED_OPS, "weights-shape", edit(weights=lambda a: a["weights"][:, :-1].contiguous()), "weights", False),
    (RAGGED_OPS, "weights-dtype", edit(weights=lambda a: a["weights"].to(BF16)), "weights", False),
    (RAGGED_OPS, "weights-noncontig", edit(weights=lambda a: transposed(a["weights"])), "weights", False),
    (RAGGED_OPS, "ks-dtype", edit(ks=lambda a: a["ks"].long()), "ks", False),
    (RAGGED_OPS, "ke-len", edit(ke=lambda a: a["ke"][:-1]), "ke", False),
    (RAGGED_OPS, "ks-negative", set_item("ks", 1, -1), "ks", True),
    (RAGGED_OPS, "ke-past-N", set_item("ke", 2, 71), "ke", True),
    (RAGGED_OPS, "ks-after-ke", edit(ks=lambda a: a["ke"] + 1), "ks", True),
    (RAGGED_OPS, "out-dtype", edit(out=lambda a: torch.empty(4, 70, dtype=torch.float64, device=a["q"].device)), "out", False),
    (("indexer_topk",), "out-shape", edit(out=lambda a: torch.empty(4, 15, dtype=torch.int32, device=a["q"].device)), "out", False),
    (("indexer_logits",), "out-col-stride", edit(out=lambda a: torch.empty(4, 140, device=a["q"].device)[:, ::2]), "out", False),
    (("indexer_topk",), "topk-zero", edit(topk=lambda a: 0), "topk", False),
    (("indexer_topk",), "topk-too-big", edit(topk=lambda a: MAX_TOPK + 1), "topk", False),

    (PAGED_OPS, "q-rank", edit(q=lambda a: a["q"][0]), "q", False),
    (PAGED_OPS, "q-dtype", edit(q=lambda a: a["q"].float()), "q", False),
    (PAGED_OPS, "q-next_n", edit(q=lambda a: zeros_like_shape(a["q"], 2, 5, 32, 64)), "q", False),
    (PAGED_OPS, "q-noncontig", edit(q=lambda a: transposed(a["q"], 1, 2)), "q", False),
    (PAGED_OPS, "kv_cache-dtype", edit(kv_cache=lambda a: a["kv_cache"].view(torch.int8)), "kv_cache", False),
    (PAGED_OPS, "kv_cache-row-bytes", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 5, PAGE, 1, 72)), "kv_cache", False),
    (PAGED_OPS, "kv_cache-page-size", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 10, 32, 1, 68)), "kv_cache", False),
    (PAGED_OPS, "kv_cache-noncontig", edit(kv_cache=lambda a: torch.cat([a["kv_cache"]] * 2)[::2]), "kv_cache", False),
    (PAGED_OPS, "weights-shape", edit(weights=lambda a: a["weights"][:-1]), "weights", False),
    (PAGED_OPS, "context_lens-dtype", edit(context_lens=lambda a: a["context_lens"].long()), "context_lens", False),
    (PAGED_OPS, "context_lens-len", edit(context_lens=lambda a: a["context_lens"][:1]), "context_lens", False),
    (PAGED_OPS, "block_table-dtype", edit(block_table=lambda a: a["block_table"].long()), "block_table", False),
    (PAGED_OPS, "block_table-rows", edit(block_table=lambda a: a["block_table"][:1]), "block_table", False),
    (PAGED_OPS, "block_table-col-stride", edit(block_table=lambda a: every_other_column(a["block_table"])), "block_table", False),
    (PAGED_OPS, "max_context_len-negative", edit(max_context_len=lambda a: -1), "max_context_len", False),
    (PAGED_OPS, "context_lens-past-table", set_item("context_lens", 1, 2 * PAGE + 1), "context_lens", True),
    (PAGED_OPS, "context_lens-past-max", edit(max_context_len=lambda a: 99), "context_lens", True),
    (PAGED_OPS, "context_lens-negative", set_item("context_lens", 1, -1), "context_lens", True),
    (PAGED_OPS, "block_table-page-in-use", set_item("block_table", (0, 1), 5), "block_table", True),
    (PAGED_OPS, "block_table-minus1-in-use", set_item("block_table", (1, 0), -1), "block_table", True),
    (("indexer_topk_paged",), "topk-zero", edit(topk=lambda a: 0), "topk", False),
    (("indexer_topk_paged",), "topk-too-big", edit(topk=lambda a: MAX_TOPK + 1), "topk", False),
    (("indexer_logits_paged",), "out-shape", edit(out=lambda a: torch.empty(4, 99, device=a["q"].device)), "out", False),

    (("topk",), "logits-dtype", edit(logits=lambda a: a["logits"].double()), "logits", False),
    (("topk",), "logits-bf16", edit(logits=lambda a: a["logits"].to(BF16)), "logits", False),
    (("topk",), "logits-rank", edit(logits=lambda a: a["logits"][None]), "logits", False),
    (("topk",), "logits-col-stride", edit(logits=lambda a: every_other_column(a["logits"])), "logits", False),
    (("topk",), "k-zero", edit(k=lambda a: 0), "k", False),
    (("topk",), "k-negative", edit(k=lambda a: -3), "k", False),
    (("topk",), "k-too-big", edit(k=lambda a: MAX_TOPK + 1), "k", False),
    (("topk",), "row_starts-dtype", edit(row_starts=lambda a: a["row_starts"].long()), "row_starts", False),
    (("topk",), "row_ends-len", edit(row_ends=lambda a: a["row_ends"][:-1]), "row_ends", False),
    (("topk",), "row_starts-noncontig", edit(row_starts=lambda a: every_other_column(a["row_starts"])), "row_starts", False),
    (("topk",), "row_ends-alone", edit(row_starts=lambda a: None), "row_starts", False),
    (("topk",), "out-dtype", edit(out=lambda a: torch.empty(5, 8, dtype=torch.int64, device=a["logits"].device)), "out", False),
    (("topk",), "out-rows-overlap", edit(out=lambda a: torch.empty(12, dtype=torch.int32, device=a["logits"].device).as_strided((5, 8), (1, 1))), "out", False),
    (("topk",), "row_starts-after-end", set_item("row_starts", 1, 21), "row_starts", True),
    (("topk",), "row_ends-past-C", set_item("row_ends", 0, 51), "row_ends", True),
    (("topk",), "row_starts-negative", set_item("row_starts", 4, -1), "row_starts", True),

    (("sparse_mla_prefill",), "q-dtype", edit(q=lambda a: a["q"].float()), "q", False),
    (("sparse_mla_prefill",), "q-heads", edit(q=lambda a: zeros_like_shape(a["q"], 3, 8, 576)), "q", False),
    (("sparse_mla_prefill",), "q-dim", edit(q=lambda a: a["q"][..., :512].contiguous()), "q", False),
    (("sparse_mla_prefill",), "q-noncontig", edit(q=lambda a: transposed(a["q"])), "q", False),
    (("sparse_mla_prefill",), "kv-rank", edit(kv=lambda a: a["kv"][:, 0]), "kv", False),
    (("sparse_mla_prefill",), "kv-heads", edit(kv=lambda a: zeros_like_shape(a["kv"], 20, 2, 576)), "kv", False),
    (("sparse_mla_prefill",), "kv-dtype", edit(kv=lambda a: a["kv"].half()), "kv", False),
    (("sparse_mla_prefill",), "indices-dtype", edit(indices=lambda a: a["indices"].long()), "indices", False),
    (("sparse_mla_prefill",), "indices-rows", edit(indices=lambda a: a["indices"][:2]), "indices", False),
    (("sparse_mla_prefill",), "indices-noncontig", edit(indices=lambda a: transposed(a["indices"])), "indices", False),
    (("sparse_mla_prefill",), "indices-past-N", set_item("indices", (1, 2), 20), "indices", True),
    (("sparse_mla_prefill",), "indices-below-minus1", set_item("indices", (0, 0), -2), "indices", True),
    (("sparse_mla_prefill",), "sm_scale-zero", edit(sm_scale=lambda a: 0.0), "sm_scale", False),
    (("sparse_mla_prefill",), "sm_scale-nan", edit(sm_scale=lambda a: math.nan), "sm_scale", False),
    (("sparse_mla_prefill", "sparse_mla_decode"), "sm_scale-float-underflow", edit(sm_scale=lambda a: 1e-50), "sm_scale", False),
    (("sparse_mla_prefill", "sparse_mla_decode"), "sm_scale-float-overflow", edit(sm_scale=lambda a: 1e39), "sm_scale", False),
    (("sparse_mla_prefill",), "d_v", edit(d_v=lambda a: 128), "d_v", False),
    (("sparse_mla_prefill",), "out-dtype", edit(out=lambda a: torch.empty(3, 16, 512, device=a["q"].device),
                                                lse=lambda a: torch.empty(3, 16, device=a["q"].device)), "out", False),
    (("sparse_mla_prefill",), "lse-shape", edit(out=lambda a: torch.empty(3, 16, 512, dtype=BF16, device=a["q"].device),
                                                lse=lambda a: torch.empty(3, 17, device=a["q"].device)), "lse", False),

    (("sparse_mla_decode",), "q-rank", edit(q=lambda a: a["q"][0]), "q", False),
    (("sparse_mla_decode",), "q-next_n", edit(q=lambda a: zeros_like_shape(a["q"], 2, 5, 16, 576)), "q", False),
    (("sparse_mla_decode",), "kv_cache-dtype", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 5, PAGE, 1, 576, dtype=torch.float32)), "kv_cache", False),
    (("sparse_mla_decode",), "kv_cache-bf16-width", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 5, PAGE, 1, 656, dtype=BF16)), "kv_cache", False),
    (("sparse_mla_decode",), "kv_cache-fp8-width", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 5, PAGE, 1, 576)), "kv_cache", False),
    (("sparse_mla_decode",), "indices-shape", edit(indices=lambda a: zeros_like_shape(a["indices"], 2, 3, 8)), "indices", False),
    (("sparse_mla_decode",), "block_table-dtype", edit(block_table=lambda a: a["block_table"].long()), "block_table", False),
    (("sparse_mla_decode",), "sm_scale-inf", edit(sm_scale=lambda a: math.inf), "sm_scale", False),
    (("sparse_mla_decode",), "indices-past-table", set_item("indices", (1, 0, 3), 3 * PAGE), "indices", True),
    (("sparse_mla_decode",), "indices-below-minus1", set_item("indices", (0, 1, 0), -5), "indices", True),
    (("sparse_mla_decode",), "block_table-page-referenced", set_item("block_table", (1, 0), 5), "block_table", True),

    (("indexer_k_quant_and_cache",), "k-dtype", edit(k=lambda a: a["k"].float()), "k", False),
    (("indexer_k_quant_and_cache",), "k-dim", edit(k=lambda a: zeros_like_shape(a["k"], 5, 96)), "k", False),
    (("indexer_k_quant_and_cache",), "k-noncontig", edit(k=lambda a: every_other_column(a["k"])), "k", False),
    (("indexer_k_quant_and_cache",), "kv_cache-row-bytes", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 2, PAGE, 1, 68)), "kv_cache", False),
    (("indexer_k_quant_and_cache",), "kv_cache-dtype", edit(kv_cache=lambda a: a["kv_cache"].view(torch.int8)), "kv_cache", False),
    (("indexer_k_quant_and_cache",), "kv_cache-noncontig", edit(kv_cache=lambda a: torch.cat([a["kv_cache"]] * 2)[::2]), "kv_cache", False),
    (("indexer_k_quant_and_cache",), "slot_mapping-dtype", edit(slot_mapping=lambda a: a["slot_mapping"].int()), "slot_mapping", False),
    (("indexer_k_quant_and_cache",), "slot_mapping-len", edit(slot_mapping=lambda a: a["slot_mapping"][:4]), "slot_mapping", False),
    (("indexer_k_quant_and_cache",), "slot_mapping-past-cache", set_item("slot_mapping", 2, 2 * PAGE), "slot_mapping", True),

    (("mla_kv_cache_insert",), "kv_c-width", edit(kv_c=lambda a: a["kv_c"][:, :511]), "kv_c", False),
    (("mla_kv_cache_insert",), "kv_c-dtype", edit(kv_c=lambda a: a["kv_c"].float()), "kv_c", False),
    (("mla_kv_cache_insert",), "kv_c-col-stride", edit(kv_c=lambda a: every_other_column(a["kv_c"])), "kv_c", False),
    (("mla_kv_cache_insert",), "k_pe-width", edit(k_pe=lambda a: a["k_pe"][:, :32]), "k_pe", False),
    (("mla_kv_cache_insert",), "k_pe-rows", edit(k_pe=lambda a: a["k_pe"][:4]), "k_pe", False),
    (("mla_kv_cache_insert",), "kv_cache-dtype", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 2, PAGE, 1, 576, dtype=torch.float32)), "kv_cache", False),
    (("mla_kv_cache_insert",), "kv_cache-bf16-width", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 2, PAGE, 1, 656, dtype=BF16)), "kv_cache", False),
    (("mla_kv_cache_insert",), "kv_cache-fp8-width", edit(kv_cache=lambda a: zeros_like_shape(a["kv_cache"], 2, PAGE, 1, 576)), "kv_cache", False),
    (("mla_kv_cache_insert",), "slot_mapping-past-cache", set_item("slot_mapping", 0, 2 * PAGE), "slot_mapping", True),
]

STRUCTURAL = [pytest.param(op, mut, name, id=f"{op}-{cid}")
              for ops_, cid, mut, name, cpu_only in CASES if not cpu_only for op in ops_]
VALUES = [pytest.param(op, mut, name, id=f"{op}-{cid}")
          for ops_, cid, mut, name, cpu_only in CASES if cpu_only for op in ops_]


def test_every_op_has_cases():
    covered = {op for ops_, *_ in CASES for op in ops_}
    assert covered == set(SMALL_ARGS)


@pytest.mark.parametrize("op", sorted(SMALL_ARGS))
def test_valid_arguments_pass(op, device):
    call(op, SMALL_ARGS[op](device))


# Inputs read row by row take any row stride, 0 included (one row broadcast to every row): the
# same result as the materialised rows.
BROADCAST_ROWS = [("topk", "logits"), ("indexer_logits_paged", "block_table"),
                  ("indexer_topk_paged", "block_table"), ("sparse_mla_decode", "block_table"),
                  ("mla_kv_cache_insert", "k_pe")]


@pytest.mark.parametrize("op,name", BROADCAST_ROWS)
def test_inputs_with_broadcast_rows(device, op, name):
    def run(rows):
        args = SMALL_ARGS[op](device)
        args[name] = rows(args[name][:1].expand_as(args[name]))
        assert args[name].stride(0) == 0 or args[name].is_contiguous()
        return written_by(op, args)
    for got, want in zip(run(lambda t: t), run(lambda t: t.contiguous()), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op,mutate,name", STRUCTURAL)
def test_structural_errors(device, op, mutate, name):
    with raises_naming(name):
        call(op, mutate(SMALL_ARGS[op](device)))


@pytest.mark.parametrize("op,mutate,name", VALUES)
def test_value_errors_on_cpu(op, mutate, name):
    with raises_naming(name):
        call(op, mutate(SMALL_ARGS[op]("cpu")))


# The argument moved to the other device, per op (the first tensor argument stays).
SECOND_ARGUMENT = {
    "indexer_logits": "k", "indexer_topk": "weights", "indexer_logits_paged": "block_table",
    "indexer_topk_paged": "kv_cache", "topk": "row_starts", "sparse_mla_prefill": "kv",
    "sparse_mla_decode": "indices", "indexer_k_quant_and_cache": "slot_mapping",
    "mla_kv_cache_insert": "k_pe",
}


@gpu
@pytest.mark.parametrize("op", sorted(SMALL_ARGS))
@pytest.mark.parametrize("home,away", [("cpu", "cuda"), ("cuda", "cpu")])
def test_device_mix(op, home, away):
    args = SMALL_ARGS[op](home)
    name = SECOND_ARGUMENT[op]
    args[name] = args[name].to(away)
    with raises_naming(name):
        call(op, args)


# ---- empty inputs are valid


def test_empty_indexer(device, gen):
    x = move(indexer_inputs(gen, 0, 50, 64, 128), device)
    assert ops.indexer_logits(*x.args()).shape == (0, 50)
    assert ops.indexer_topk(*x.args(), 16).shape == (0, 16)
    x = move(indexer_inputs(gen, 3, 0, 64, 128, "empty"), device)
    assert ops.indexer_logits(*x.args()).shape == (3, 0)
    got = ops.indexer_topk(*x.args(), 16)
    assert got.shape == (3, 16) and torch.all(got == -1)
    # One row may have any row stride (only rows must not overlap), here 1, below its width.
    one = move(indexer_inputs(gen, 1, 0, 64, 128, "empty"), device)
    out = torch.zeros(16, 1, dtype=torch.int32, device=device).t()
    ops.indexer_topk(*one.args(), 16, out=out)
    assert out.stride() == (1, 1) and torch.all(out == -1)


def test_empty_paged_indexer(device, gen):
    x = move(paged_indexer_inputs(gen, [], 2, 32, 64, spare_pages=1, spare_cols=1, extra_len=10), device)
    assert ops.indexer_logits_paged(*x.args()).shape == (0, 10)
    assert ops.indexer_topk_paged(*x.args(), 4).shape == (0, 4)


def test_empty_topk(device):
    assert ops.topk(torch.empty(0, 10, device=device), 4).shape == (0, 4)
    got = ops.topk(torch.empty(3, 0, device=device), 4)
    assert got.shape == (3, 4) and torch.all(got == -1)


def test_empty_sparse_mla(device, gen):
    a = SMALL_ARGS["sparse_mla_prefill"](device)
    out, lse = ops.sparse_mla_prefill(a["q"][:0], a["kv"], a["indices"][:0], 0.1)
    assert out.shape == (0, 16, 512) and lse.shape == (0, 16)
    out, lse = ops.sparse_mla_prefill(a["q"], a["kv"][:0], torch.full_like(a["indices"], -1), 0.1)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    d = SMALL_ARGS["sparse_mla_decode"](device)
    out, lse = ops.sparse_mla_decode(d["q"][:0], d["kv_cache"], d["indices"][:0], d["block_table"][:0], 0.1)
    assert out.shape == (0, 2, 16, 512) and lse.shape == (0, 2, 16)


@pytest.mark.parametrize("op", ["sparse_mla_prefill", "sparse_mla_decode"])
@pytest.mark.parametrize("given", ["out", "lse"])
def test_attention_outputs_come_in_pairs(op, given):
    a = SMALL_ARGS[op]("cpu")
    reference_out, reference_lse = call(op, a)
    buffer = {"out": reference_out, "lse": reference_lse}[given]
    missing = "lse" if given == "out" else "out"
    with pytest.raises(RuntimeError, match=f"argument '{missing}' must be given together with"):
        call(op, {**a, given: torch.empty_like(buffer)})


# ---- outputs that alias inputs: rows are read and written concurrently, so an alias would give
# wrong rows silently; every output is checked against every input its op reads

INPUTS = {
    "indexer_logits": ("q", "k", "k_scale", "weights", "ks", "ke"),
    "indexer_topk": ("q", "k", "k_scale", "weights", "ks", "ke"),
    "indexer_logits_paged": ("q", "kv_cache", "weights", "context_lens", "block_table"),
    "indexer_topk_paged": ("q", "kv_cache", "weights", "context_lens", "block_table"),
    "topk": ("logits", "row_starts", "row_ends"),
    "sparse_mla_prefill": ("q", "kv", "indices"),
    "sparse_mla_decode": ("q", "kv_cache", "indices", "block_table"),
    "indexer_k_quant_and_cache": ("k", "slot_mapping"),
    "mla_kv_cache_insert": ("kv_c", "k_pe", "slot_mapping"),
}
WRITTEN_IN_PLACE = {"indexer_k_quant_and_cache": "kv_cache", "mla_kv_cache_insert": "kv_cache"}
ALIASES = [(op, written, read) for op, reads in INPUTS.items()
           for written in (("out", "lse") if op.startswith("sparse_mla") else
                           (WRITTEN_IN_PLACE.get(op, "out"),))
           for read in reads]
ALIASES += [("sparse_mla_prefill", "lse", "out"), ("sparse_mla_decode", "lse", "out")]


def with_outputs(op: str, args: dict) -> dict:
    """The arguments with every output given explicitly (shapes and dtypes from a first call)."""
    if op in WRITTEN_IN_PLACE:
        return dict(args)
    result = call(op, args)
    if op.startswith("sparse_mla"):
        return {**args, "out": torch.empty_like(result[0]), "lse": torch.empty_like(result[1])}
    return {**args, "out": torch.empty_like(result)}


def share_storage(read: torch.Tensor, written: torch.Tensor, gap: int | None):
    """An input and an output in one byte buffer: at the same address (gap None; the buffer holds
    the input's values), or the output at least `gap` bytes past the end of the input, 256-byte
    aligned as an arena would place it (each holding its own values)."""
    offset = 0 if gap is None else -(-(read.nbytes + gap) // 256) * 256
    buf = torch.zeros(max(read.nbytes, offset + written.nbytes), dtype=torch.uint8,
                      device=read.device)
    view = lambda t, at: buf[at:at + t.nbytes].view(t.dtype).view(t.shape)
    out = view(written, offset)
    if gap is not None:
        out.copy_(written)
    return view(read, 0).copy_(read), out


def test_every_op_has_alias_cases():
    assert {op for op, *_ in ALIASES} == set(SMALL_ARGS)


@pytest.mark.parametrize("op,written,read", ALIASES)
def test_output_overlapping_an_input_is_rejected(device, op, written, read):
    args = with_outputs(op, SMALL_ARGS[op](device))
    args[read], args[written] = share_storage(args[read], args[written], gap=None)
    with pytest.raises(RuntimeError, match=re.escape(f"'{written}' must not overlap '{read}'")):
        call(op, args)


def written_by(op: str, args: dict) -> tuple:
    result = call(op, args)
    if op in WRITTEN_IN_PLACE:
        return (args[WRITTEN_IN_PLACE[op]],)
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("op,written,read", ALIASES)
def test_disjoint_views_of_one_storage_are_accepted(device, op, written, read):
    # An input and an output in one allocation without overlap: the call runs and writes what it
    # writes into separate tensors.
    expected = written_by(op, with_outputs(op, SMALL_ARGS[op](device)))
    args = with_outputs(op, SMALL_ARGS[op](device))
    args[read], args[written] = share_storage(args[read], args[written], gap=16)
    for got, want in zip(written_by(op, args), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---- CUDA only: views that start off a 16-byte boundary, where the kernels move rows in 16-byte
# vectors (the CPU path takes any address)

ALIGNED = [("indexer_logits", "q"), ("indexer_logits", "k"), ("indexer_topk", "q"),
           ("indexer_topk", "k"), ("indexer_logits_paged", "q"), ("indexer_logits_paged", "kv_cache"),
           ("indexer_topk_paged", "q"), ("indexer_topk_paged", "kv_cache"),
           ("sparse_mla_prefill", "q"), ("sparse_mla_prefill", "kv"), ("sparse_mla_prefill", "out"),
           ("sparse_mla_decode", "q"), ("sparse_mla_decode", "kv_cache"),
           ("sparse_mla_decode", "out"), ("indexer_k_quant_and_cache", "kv_cache"),
           ("mla_kv_cache_insert", "kv_cache")]


def eight_bytes_in(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view that starts 8 bytes into its allocation."""
    buf = torch.empty(t.nbytes + 16, dtype=torch.uint8, device=t.device)
    return buf[8:8 + t.nbytes].view(t.dtype).view(t.shape).copy_(t)


@gpu
@pytest.mark.parametrize("op,name", ALIGNED)
def test_misaligned_views_are_rejected_on_cuda(op, name):
    args = with_outputs(op, SMALL_ARGS[op]("cuda"))
    args[name] = eight_bytes_in(args[name])
    with pytest.raises(RuntimeError, match=re.escape(f"'{name}' must start at a 16-byte aligned")):
        call(op, args)


@pytest.mark.parametrize("op", ["indexer_logits_paged", "indexer_topk_paged", "sparse_mla_decode"])
def test_next_n_out_of_range_names_the_dimension(device, op):
    args = SMALL_ARGS[op](device)
    q = args["q"]
    args["q"] = torch.zeros(q.shape[0], 5, *q.shape[2:], dtype=q.dtype, device=q.device)
    with pytest.raises(RuntimeError, match=re.escape("'q' next_n (dimension 1) must be in [1, 4], got 5")):
        call(op, args)
