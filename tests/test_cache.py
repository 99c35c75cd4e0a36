"""Cache writers against the reference quantiser, byte for byte.

Exactness rule: bf16 rows and power-of-two scales must match the reference bit for bit (x / 2^e
is exact, so every correct round-to-nearest-even quantiser gives the same codes). With arbitrary
scales the scale itself must still be bit-exact (amax / 448 in float32 is one correctly rounded
division), while the codes may differ by one step where float32 x / scale (or x * (1 / scale))
rounds the quotient across a rounding boundary: see _util.e4m3_codes_close."""

import pytest
import torch

from indexcache_ops import ops
from indexcache_ops import quant
from indexcache_ops import reference as ref

from _util import PAGE, e4m3_codes_close, randint, randn


def garbage_cache(gen, shape, dtype=torch.uint8) -> torch.Tensor:
    """Random bytes: whatever the writer does not own must come back unchanged."""
    raw = randint(gen, 0, 256, *shape[:-1], shape[-1] * dtype.itemsize).to(torch.uint8)
    return raw.view(dtype)


def slots_for(gen, tokens: int, num_pages: int) -> torch.Tensor:
    """Distinct random slots, some negative (skipped), as int64."""
    slots = torch.randperm(num_pages * PAGE, generator=gen)[:tokens]
    skip = torch.rand(tokens, generator=gen) < 0.15
    return torch.where(skip, -1 - randint(gen, 0, 5, tokens), slots)


def keys(gen, tokens: int, d: int) -> torch.Tensor:
    """bf16 keys spanning six orders of magnitude across tokens (every block's amax above the
    1e-4 floor; test_tiny_and_zero_blocks covers the floor)."""
    return (randn(gen, tokens, d) * torch.logspace(-3, 3, tokens).reshape(tokens, 1)).bfloat16()


def split_indexer_pages(cache: torch.Tensor, d: int):
    """(e4m3 code bytes, float32 scales) of every slot of an indexer cache."""
    pages = cache.reshape(cache.shape[0], PAGE * (d + 4))
    codes = pages[:, : PAGE * d].reshape(-1, d)
    scales = pages[:, PAGE * d:].contiguous().view(torch.float32).reshape(-1)
    return codes, scales


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_indexer_k_quant_and_cache(gen, device, d, pow2):
    tokens, pages = 77, 3
    k, slots = keys(gen, tokens, d), slots_for(gen, tokens, pages)
    cache = garbage_cache(gen, (pages, PAGE, 1, d + 4))
    want = ref.indexer_k_quant_and_cache(k, cache, slots, pow2_scale=pow2)
    got = cache.to(device)
    assert ops.indexer_k_quant_and_cache(k.to(device), got, slots.to(device), pow2_scale=pow2) is None
    got = got.cpu()
    if pow2:
        assert torch.equal(got, want)
        return
    got_codes, got_scales = split_indexer_pages(got, d)
    want_codes, want_scales = split_indexer_pages(want, d)
    assert torch.equal(got_scales.view(torch.int32), want_scales.view(torch.int32))
    e4m3_codes_close(got_codes.numpy(), want_codes.numpy())


def test_indexer_k_quant_and_cache_default_is_pow2(gen, device):
    d, pages = 128, 1
    k, slots = keys(gen, 10, d), torch.arange(10)
    cache = torch.zeros(pages, PAGE, 1, d + 4, dtype=torch.uint8, device=device)
    ops.indexer_k_quant_and_cache(k.to(device), cache, slots.to(device))
    assert torch.equal(cache.cpu(), ref.indexer_k_quant_and_cache(k, cache, slots, pow2_scale=True))


def test_indexer_k_cache_feeds_paged_logits(gen, device):
    # The writer's layout is the one indexer_logits_paged reads: scores through the cache equal
    # the ragged scores of the same quantised keys.
    d, h, n = 128, 64, 150
    k = quant.hadamard(randn(gen, n, d)).bfloat16()
    pages = 4
    table = torch.randperm(pages, generator=gen)[:3].int().reshape(1, 3)
    pos = torch.arange(n)
    slots = table[0, pos // PAGE].long() * PAGE + pos % PAGE
    cache = torch.zeros(pages, PAGE, 1, d + 4, dtype=torch.uint8, device=device)
    ops.indexer_k_quant_and_cache(k.to(device), cache, slots.to(device))
    k8, ks = quant.quantize_fp8_per_block(k, d, pow2_scale=True)
    q, qs = quant.quantize_fp8_per_block(quant.hadamard(randn(gen, 1, 1, h, d)), d, pow2_scale=True)
    w = quant.fold_indexer_weights(randn(gen, 1, h), qs.reshape(1, h), h, d)
    paged = ops.indexer_logits_paged(q.to(device), cache, w.to(device),
                                     torch.tensor([n], dtype=torch.int32, device=device),
                                     table.to(device), n)
    ragged = ops.indexer_logits(q[0].to(device), k8.to(device), ks.reshape(n).to(device),
                                w.to(device), torch.zeros(1, dtype=torch.int32, device=device),
                                torch.full((1,), n, dtype=torch.int32, device=device))
    torch.testing.assert_close(paged, ragged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pow2", [True, False])
def test_tiny_and_zero_blocks(device, pow2):
    # The package's convention (quant.py, reference.py, DeepSeek-V3.2, vLLM): scale =
    # max(amax, 1e-4) / 448, so an all-zero or tiny block quantises exactly as quant.py does.
    d = 128
    k = torch.zeros(3, 4 * d)
    k[1, :] = 3e-5
    k[2, 5] = -2e-6
    k = k.bfloat16()
    slots = torch.arange(3)
    head = k[:, :d].contiguous()
    cache = torch.zeros(1, PAGE, 1, d + 4, dtype=torch.uint8, device=device)
    ops.indexer_k_quant_and_cache(head.to(device), cache, slots.to(device), pow2_scale=pow2)
    assert torch.equal(cache.cpu(), ref.indexer_k_quant_and_cache(head, cache, slots, pow2_scale=pow2))
    k8, s = quant.quantize_fp8_per_block(head, d, pow2_scale=pow2)
    packed = quant.pack_indexer_k_cache(k8, s, slots, 1)
    assert torch.equal(cache.cpu(), packed)
    mla = torch.zeros(1, PAGE, 1, ref.MLA_FP8_ROW_BYTES, dtype=torch.uint8, device=device)
    ops.mla_kv_cache_insert(k.to(device), k[:, :64].to(device), mla, slots.to(device), pow2_scale=pow2)
    assert torch.equal(mla.cpu(), quant.pack_mla_kv_cache(k, k[:, :64], slots, 1, fp8=True, pow2_scale=pow2))


@pytest.mark.parametrize("fp8,pow2", [(False, False), (True, True), (True, False)])
def test_mla_kv_cache_insert(gen, device, fp8, pow2):
    tokens, pages = 70, 2
    rows = keys(gen, tokens, ref.MLA_DIM)
    # kv_c and k_pe as column slices of one projection output, as frameworks pass them.
    wide = torch.cat((rows, randn(gen, tokens, 40, dtype=torch.bfloat16)), dim=1)
    kv_c, k_pe = wide[:, : ref.MLA_LATENT], wide[:, ref.MLA_LATENT: ref.MLA_DIM]
    slots = slots_for(gen, tokens, pages)
    width = ref.MLA_FP8_ROW_BYTES if fp8 else ref.MLA_DIM
    cache = garbage_cache(gen, (pages, PAGE, 1, width), torch.uint8 if fp8 else torch.bfloat16)
    want = ref.mla_kv_cache_insert(kv_c, k_pe, cache, slots, pow2_scale=pow2)
    wide_dev = wide.to(device)
    got = cache.to(device)
    ops.mla_kv_cache_insert(wide_dev[:, : ref.MLA_LATENT], wide_dev[:, ref.MLA_LATENT: ref.MLA_DIM],
                            got, slots.to(device), pow2_scale=pow2)
    got = got.cpu()
    if not fp8 or pow2:
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        return
    g, w = got.reshape(-1, width), want.reshape(-1, width)
    assert torch.equal(g[:, ref.MLA_LATENT:], w[:, ref.MLA_LATENT:])  # scales and rope bit-exact
    e4m3_codes_close(g[:, : ref.MLA_LATENT].numpy(), w[:, : ref.MLA_LATENT].numpy())


@pytest.mark.parametrize("fp8", [False, True])
def test_mla_kv_cache_roundtrip_through_unpack(gen, device, fp8):
    tokens, pages = 40, 1
    rows = randn(gen, tokens, ref.MLA_DIM, dtype=torch.bfloat16).to(device)
    slots = torch.randperm(PAGE, generator=gen)[:tokens].to(device)
    cache = torch.zeros(pages, PAGE, 1, ref.MLA_FP8_ROW_BYTES if fp8 else ref.MLA_DIM,
                        dtype=torch.uint8 if fp8 else torch.bfloat16, device=device)
    ops.mla_kv_cache_insert(rows[:, :512], rows[:, 512:], cache, slots)
    back = quant.unpack_mla_kv_cache(cache, slots).float()
    block_amax = rows[:, :512].float().abs().reshape(tokens, 4, 128).amax(-1).repeat_interleave(128, -1)
    assert torch.all((back[:, :512] - rows[:, :512].float()).abs() <= block_amax * 2.0 ** -4 + 1e-30)
    assert torch.equal(back[:, 512:], rows[:, 512:].float())


def test_cache_writers_with_no_tokens(device):
    cache = torch.full((1, PAGE, 1, 132), 7, dtype=torch.uint8, device=device)
    ops.indexer_k_quant_and_cache(torch.empty(0, 128, dtype=torch.bfloat16, device=device), cache,
                                  torch.empty(0, dtype=torch.long, device=device))
    mla = torch.full((1, PAGE, 1, 656), 7, dtype=torch.uint8, device=device)
    ops.mla_kv_cache_insert(torch.empty(0, 512, dtype=torch.bfloat16, device=device),
                            torch.empty(0, 64, dtype=torch.bfloat16, device=device), mla,
                            torch.empty(0, dtype=torch.long, device=device))
    assert torch.all(cache == 7) and torch.all(mla == 7)
