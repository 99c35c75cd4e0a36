"""indexcache_ops.quant helpers, and the reference's own e4m3 encoder and layout decoders that the
cache tests lean on: each is checked against hand-computed values and against the other."""

import math

import numpy as np
import pytest
import torch

from indexcache_ops import quant
from indexcache_ops import reference as ref

from _util import PAGE, e4m3_codes_close, randn


def _codes(t: torch.Tensor) -> np.ndarray:
    return t.cpu().view(torch.uint8).numpy()


# ---- the reference e4m3 encoder is what every quantisation test trusts: pin it to torch's RNE


def test_reference_e4m3_encoder_matches_torch_rne(gen):
    table = ref._E4M3_POS
    midpoints = (table[1:] + table[:-1]) / 2  # every tie of the format
    x = np.concatenate([
        randn(gen, 20000, dtype=torch.float64).numpy() * 50,
        midpoints, -midpoints, table, -table,
        [0.0, -0.0, 1e-9, -1e-9, 2.0 ** -10, 3 * 2.0 ** -11, 448.0, -448.0],
    ])
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(ref.e4m3_encode(x), want)


def test_reference_e4m3_decode_hand_values():
    codes = np.array([0x00, 0x80, 0x01, 0x08, 0x38, 0x7E, 0xFE, 0x40], dtype=np.uint8)
    want = [0.0, -0.0, 2.0 ** -9, 2.0 ** -6, 1.0, 448.0, -448.0, 2.0]
    np.testing.assert_array_equal(ref.e4m3_decode(codes), want)
    assert np.isnan(ref.e4m3_decode(np.array([0x7F, 0xFF], dtype=np.uint8))).all()


# ---- quantize_fp8_per_block


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("block", [64, 128])
def test_quantize_matches_reference(gen, device, pow2, block):
    x = randn(gen, 7, 3, 256, dtype=torch.bfloat16) * torch.logspace(-3, 3, 7).reshape(7, 1, 1).bfloat16()
    q, scale = quant.quantize_fp8_per_block(x.to(device), block, pow2_scale=pow2)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and q.device.type == device
    assert scale.dtype == torch.float32 and scale.shape == (7, 3, 256 // block)
    want_codes, want_scale = ref.quantize_blocks(ref._f64(x), block, pow2)
    np.testing.assert_array_equal(scale.cpu().numpy(), want_scale)
    if pow2:  # x / 2^e is exact, so both round the same quotient
        np.testing.assert_array_equal(_codes(q), want_codes)
    else:
        e4m3_codes_close(_codes(q), want_codes)


def test_quantize_scale_rules(gen):
    x = randn(gen, 64, 128) * 10
    _, s = quant.quantize_fp8_per_block(x, pow2_scale=False)
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(s, amax / 448)
    _, s2 = quant.quantize_fp8_per_block(x, pow2_scale=True)
    exponent = torch.log2(s2)
    assert torch.equal(exponent, exponent.round()), "pow2 scales must be powers of two"
    assert torch.all(s2 >= s) and torch.all(s2 < 2 * s)


def test_quantize_exact_power_of_two_boundary():
    # amax / 448 exactly a power of two must not be bumped to the next one.
    x = torch.zeros(2, 128)
    x[0, 5] = 448.0 * 2.0 ** -3
    x[1, 7] = -448.0 * 2.0 ** -3 * (1 + 2.0 ** -20)
    q, s = quant.quantize_fp8_per_block(x, pow2_scale=True)
    assert s.flatten().tolist() == [2.0 ** -3, 2.0 ** -2]
    assert q.float()[0, 5] == 448.0 and q.float()[1, 7] == -224.0


def test_quantize_zero_block_is_finite_and_zero():
    x = torch.zeros(3, 256)
    x[1, 128:] = 1.0
    q, s = quant.quantize_fp8_per_block(x)
    assert torch.isfinite(s).all() and s[0, 0] == torch.tensor(1e-4) / 448
    assert torch.all(q.float()[0] == 0) and torch.all(q.float()[1, :128] == 0)


def test_quantize_error_bound_and_roundtrip(gen, device):
    x = (randn(gen, 33, 512) * torch.rand(33, 1, generator=gen) * 100).to(device)
    q, s = quant.quantize_fp8_per_block(x)
    back = quant.dequantize_fp8_per_block(q, s)
    assert back.shape == x.shape and back.dtype == torch.float32
    # Round to nearest: |x / s - q| <= half an ulp (2^-4 relative, 2^-10 absolute in subnormals).
    scaled = (x / s.repeat_interleave(128, dim=-1)).double()
    bound = torch.maximum(q.double().abs() * 2.0 ** -4, torch.full_like(scaled, 2.0 ** -10))
    assert torch.all((scaled - q.double()).abs() <= bound * (1 + 1e-6))
    assert torch.all(q.float().abs() <= 448)


def test_quantize_rejects_ragged_blocks():
    with pytest.raises(ValueError, match="multiple"):
        quant.quantize_fp8_per_block(torch.ones(4, 100))


# ---- fold_indexer_weights


def test_fold_indexer_weights_hand_value():
    w = torch.tensor([[2.0, -1.0]])
    s = torch.tensor([[0.5, 4.0]])
    got = quant.fold_indexer_weights(w, s, num_heads=2, head_dim=8)
    want = torch.tensor([[2.0 * 0.5, -1.0 * 4.0]]) / math.sqrt(2) / math.sqrt(8)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=0)
    torch.testing.assert_close(quant.fold_indexer_weights(w.bfloat16(), s[..., None], 2, 8), want,
                               rtol=1e-7, atol=0)
    assert got.dtype == torch.float32 and got.is_contiguous()


def test_fold_indexer_weights_checks_heads():
    with pytest.raises(ValueError, match="heads"):
        quant.fold_indexer_weights(torch.ones(3, 64), torch.ones(3, 64), num_heads=32, head_dim=128)


# ---- hadamard


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 4, 64, 128])
def test_hadamard_matches_sylvester_matrix(gen, device, n):
    x = randn(gen, 5, 3, n, dtype=torch.float64)
    got = quant.hadamard(x.to(device))
    assert got.dtype == torch.float64 and got.shape == x.shape
    torch.testing.assert_close(got.cpu(), x @ _sylvester(n), rtol=1e-12, atol=1e-12)


def test_hadamard_hand_values_and_involution(gen):
    torch.testing.assert_close(quant.hadamard(torch.tensor([1.0, 0.0])),
                               torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(quant.hadamard(torch.tensor([0.0, 1.0, 0.0, 0.0])),
                               torch.tensor([0.5, -0.5, 0.5, -0.5]))
    x = randn(gen, 9, 128)
    torch.testing.assert_close(quant.hadamard(quant.hadamard(x)), x, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    assert quant.hadamard(xb).dtype == torch.bfloat16


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        quant.hadamard(torch.ones(2, 96))


# ---- indexer K cache layout


def test_pack_indexer_k_cache_byte_layout():
    d, pages = 64, 3
    k = torch.arange(2 * d, dtype=torch.float32).reshape(2, d).div(16).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.25, 3.0])
    cache = quant.pack_indexer_k_cache(k, scale, torch.tensor([PAGE + 1, -1]), pages)
    assert cache.shape == (pages, PAGE, 1, d + 4) and cache.dtype == torch.uint8
    flat = cache.flatten()
    base = 1 * PAGE * (d + 4)  # page 1, row 1
    assert torch.equal(flat[base + d: base + 2 * d], k[0].view(torch.uint8))
    scale_at = base + PAGE * d + 4
    assert flat[scale_at: scale_at + 4].view(torch.float32).item() == 0.25
    assert int(flat.count_nonzero()) == int(k[0].view(torch.uint8).count_nonzero()) + 2  # 0.25 = 3E800000


@pytest.mark.parametrize("d", [64, 128])
def test_indexer_k_cache_roundtrip(gen, device, d):
    t, pages = 100, 3
    k, s = quant.quantize_fp8_per_block(randn(gen, t, d), d, pow2_scale=True)
    slots = torch.randperm(pages * PAGE, generator=gen)[:t]
    slots[::7] = -1
    cache = quant.pack_indexer_k_cache(k.to(device), s.to(device), slots.to(device), pages)
    assert cache.device.type == device
    kept = slots >= 0
    k2, s2 = quant.unpack_indexer_k_cache(cache, slots[kept])
    assert torch.equal(k2.cpu().view(torch.uint8), k[kept].view(torch.uint8))
    assert torch.equal(s2.cpu(), s[kept].reshape(-1))
    keys, scales = ref.decode_indexer_k_cache(cache)  # the reference's own decoder agrees
    page, row = slots[kept] // PAGE, slots[kept] % PAGE
    np.testing.assert_array_equal(keys[page, row], ref._f64(k[kept]))
    np.testing.assert_array_equal(scales[page, row], s[kept].reshape(-1).double().numpy())


# ---- MLA cache layout


def test_pack_mla_kv_cache_fp8_row_layout():
    kv_c = torch.zeros(1, 512)
    kv_c[0, 130] = 448.0 * 2  # block 1: scale 2, code for 448
    k_pe = torch.full((1, 64), -1.5)
    cache = quant.pack_mla_kv_cache(kv_c, k_pe, torch.tensor([3]), 1, fp8=True)
    assert cache.shape == (1, PAGE, 1, 656) and cache.dtype == torch.uint8
    row = cache[0, 3, 0]
    assert row[130].item() == 0x7E
    scales = row[512:528].clone().view(torch.float32)
    assert scales[1].item() == 2.0 and scales[0].item() == pytest.approx(1e-4 / 448)
    assert torch.all(row[528:].clone().view(torch.bfloat16) == -1.5)
    assert cache[0, :3].count_nonzero() == 0 and cache[0, 4:].count_nonzero() == 0


@pytest.mark.parametrize("fp8", [False, True])
def test_mla_kv_cache_roundtrip(gen, device, fp8):
    t, pages = 90, 2
    rows = randn(gen, t, 576, dtype=torch.bfloat16)
    slots = torch.randperm(pages * PAGE, generator=gen)[:t]
    slots[5] = -3
    cache = quant.pack_mla_kv_cache(rows[:, :512].to(device), rows[:, 512:].to(device),
                                    slots.to(device), pages, fp8=fp8, pow2_scale=True)
    kept = slots >= 0
    back = quant.unpack_mla_kv_cache(cache, slots[kept]).cpu()
    decoded = ref.decode_mla_kv_cache(cache)[slots[kept] // PAGE, slots[kept] % PAGE]
    np.testing.assert_array_equal(back.double().numpy(), decoded)  # pow2 scales: exact products
    if fp8:
        assert back.dtype == torch.float32 and torch.equal(back[:, 512:], rows[kept, 512:].float())
        err = (back[:, :512] - rows[kept, :512].float()).abs()
        assert torch.all(err <= rows[kept, :512].float().abs().amax() * 2.0 ** -3)
    else:
        assert back.dtype == torch.bfloat16 and torch.equal(back, rows[kept])
