"""Tests of the per-layer index-reuse API: IndexCacheConfig (the Full/Shared split) and IndexCache
(persistent buffers, Full layers through the ops, Shared layers aliasing their source)."""

import types

import pytest
import torch
import torch._dynamo.testing

import indexcache_ops
from indexcache_ops import ops
from indexcache_ops.reuse import IndexCache, IndexCacheConfig

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def _independent_full(num_layers, freq, offset):
    """The adopters' rule, transcribed on its own: Shared iff max(L - offset + 1, 0) % freq != 0."""
    full = []
    for layer in range(num_layers):
        shifted = layer - offset + 1
        if shifted < 0:
            shifted = 0
        if shifted % freq == 0:
            full.append(layer)
    return full


def test_rule_matches_independent_transcription_on_every_small_config():
    for num_layers in range(1, 101):
        for freq in range(1, 9):
            for offset in range(1, 5):
                cfg = IndexCacheConfig(num_hidden_layers=num_layers, index_topk_freq=freq,
                                       index_skip_topk_offset=offset)
                full = _independent_full(num_layers, freq, offset)
                assert list(cfg.full_layers) == full, (num_layers, freq, offset)
                assert cfg.num_full == len(full)
                assert cfg.pattern == "".join("F" if i in full else "S"
                                              for i in range(num_layers))
                source = 0
                for layer in range(num_layers):
                    if layer in full:
                        source = layer
                    assert cfg.source_layer(layer) == source
                    assert cfg.is_full(layer) == (layer in full)


def test_official_offset2_freq4():
    cfg = IndexCacheConfig(num_hidden_layers=47, index_topk_freq=4)
    assert cfg.index_skip_topk_offset == 2
    assert cfg.full_layers == (0, 1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45)
    assert cfg.pattern.startswith("FFSSSFSSSF")
    assert [cfg.source_layer(i) for i in range(10)] == [0, 1, 1, 1, 1, 5, 5, 5, 5, 9]


def test_glm52_78_layers_freq4_offset3():
    cfg = IndexCacheConfig(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3)
    expected = [0, 1, 2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62, 66, 70, 74]
    assert len(expected) == 21
    assert list(cfg.full_layers) == expected
    assert cfg.num_full == 21 and cfg.num_shared == 57
    assert len(cfg.shared_layers) == 57
    assert [cfg.source_layer(i) for i in (3, 5, 6, 75, 77)] == [2, 2, 6, 74, 74]
    assert not cfg.needs_indexer(3) and not cfg.needs_indexer_k_cache(77)
    assert cfg.needs_indexer(74) and cfg.needs_indexer_k_cache(2)


def test_all_full_without_freq_pattern_or_types():
    for cfg in (IndexCacheConfig(num_hidden_layers=5),
                IndexCacheConfig(num_hidden_layers=5, index_topk_freq=1)):
        assert cfg.pattern == "FFFFF"
        assert cfg.full_layers == (0, 1, 2, 3, 4)
        assert cfg.indexer_k_cache_bytes_saved(num_blocks=100) == 0
    assert IndexCacheConfig(num_hidden_layers=5).pattern_source == "default"


def test_precedence_types_over_pattern_over_freq():
    freq_only = IndexCacheConfig(num_hidden_layers=6, index_topk_freq=2)
    assert freq_only.pattern == "FFSFSF" and freq_only.pattern_source == "index_topk_freq"

    with_pattern = IndexCacheConfig(num_hidden_layers=6, index_topk_freq=2,
                                    index_topk_pattern="FSSSSF")
    assert with_pattern.pattern == "FSSSSF"
    assert with_pattern.pattern_source == "index_topk_pattern"

    with_types = IndexCacheConfig(
        num_hidden_layers=6, index_topk_freq=2, index_topk_pattern="FSSSSF",
        indexer_types=["full", "shared", "full", "shared", "shared", "shared"])
    assert with_types.pattern == "FSFSSS" and with_types.pattern_source == "indexer_types"
    assert with_types.full_layers == (0, 2)
    assert with_types.source_layer(5) == 2


def test_pattern_and_types_round_trip():
    cfg = IndexCacheConfig(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3)
    via_pattern = IndexCacheConfig(num_hidden_layers=78,
                                   index_topk_pattern=cfg.to_pattern_string())
    via_types = IndexCacheConfig(num_hidden_layers=78, indexer_types=cfg.to_indexer_types())
    for other in (via_pattern, via_types):
        assert other.pattern == cfg.pattern
        assert other.full_layers == cfg.full_layers
    assert via_pattern.to_pattern_string() == cfg.to_pattern_string()
    assert cfg.to_indexer_types()[:4] == ["full", "full", "full", "shared"]


def test_mtp_layers_are_full_and_their_own_source():
    cfg = IndexCacheConfig(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3,
                           num_nextn_predict_layers=1)
    assert cfg.mtp_layers == (78,)
    assert cfg.is_full(78) and cfg.source_layer(78) == 78
    assert cfg.needs_indexer(78) and cfg.needs_indexer_k_cache(78)
    assert cfg.num_full == 21 and len(cfg.pattern) == 78
    assert cfg.indexer_layers == cfg.full_layers + (78,)
    assert cfg.layers == tuple(range(79))

    explicit = IndexCacheConfig(num_hidden_layers=8, index_topk_freq=4, mtp_layer_ids=[11, 10])
    assert explicit.mtp_layers == (10, 11)
    assert explicit.source_layer(11) == 11
    with pytest.raises(ValueError, match=r"layer: expected an id in \[0, 8\) or an MTP layer"):
        explicit.is_full(8)

    agree = IndexCacheConfig(num_hidden_layers=8, num_nextn_predict_layers=2,
                             mtp_layer_ids=(8, 9))
    assert agree.mtp_layers == (8, 9)


def test_pipeline_stages():
    cfg = IndexCacheConfig(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3,
                           num_nextn_predict_layers=1, pipeline_stage_starts=[0, 22, 42, 62])
    assert cfg.num_stages == 4
    assert cfg.stage_layers(0) == tuple(range(0, 22))
    assert cfg.stage_layers(3) == tuple(range(62, 78)) + (78,)
    assert [cfg.stage_of(i) for i in (0, 21, 22, 61, 62, 77, 78)] == [0, 0, 1, 2, 3, 3, 3]
    for stage in range(cfg.num_stages):
        for layer in cfg.stage_layers(stage):
            assert cfg.stage_of(cfg.source_layer(layer)) == stage

    implied_zero = IndexCacheConfig(num_hidden_layers=10, index_topk_freq=4,
                                    pipeline_stage_starts=(5,))
    assert implied_zero.pipeline_stage_starts == (0, 5)
    assert implied_zero.stage_layers(1) == (5, 6, 7, 8, 9)
    assert IndexCacheConfig(num_hidden_layers=3).num_stages == 1
    with pytest.raises(ValueError, match=r"stage: expected an int in \[0, 2\), got 2"):
        implied_zero.stage_layers(2)


def test_indexer_k_cache_bytes_saved():
    cfg = IndexCacheConfig(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3)
    page = 64 * (128 + 4)
    assert page == 8448
    assert cfg.indexer_k_cache_bytes_saved(num_blocks=1000) == 57 * 1000 * page
    assert cfg.indexer_k_cache_bytes_saved(context_len=64) == 57 * 1 * page
    assert cfg.indexer_k_cache_bytes_saved(context_len=65) == 57 * 2 * page
    assert cfg.indexer_k_cache_bytes_saved(context_len=200_000) == 57 * 3125 * page
    assert cfg.indexer_k_cache_bytes_saved(context_len=0) == 0
    assert cfg.indexer_k_cache_bytes_saved(num_blocks=10, head_dim=64) == 57 * 10 * 64 * 68


def test_from_model_config_dict_and_object():
    fields = dict(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3,
                  num_nextn_predict_layers=1, hidden_size=6144)
    from_dict = IndexCacheConfig.from_model_config(fields)
    from_obj = IndexCacheConfig.from_model_config(types.SimpleNamespace(**fields))
    assert from_dict == from_obj
    assert from_dict.num_full == 21 and from_dict.mtp_layers == (78,)

    # Entries present as None are absent: offset falls back to 2, the pattern to the freq rule.
    with_nones = IndexCacheConfig.from_model_config(
        {"num_hidden_layers": 10, "index_topk_freq": 4, "index_skip_topk_offset": None,
         "index_topk_pattern": None, "indexer_types": None})
    assert with_nones.full_layers == (0, 1, 5, 9)

    types_list = ["full", "shared", "full", "shared"]
    hf_like = IndexCacheConfig.from_model_config(
        types.SimpleNamespace(num_hidden_layers=4, index_topk_freq=4, indexer_types=types_list))
    assert hf_like.full_layers == (0, 2)
    assert hf_like.indexer_types == tuple(types_list)
    hash(hf_like)

    plain = IndexCacheConfig.from_model_config(types.SimpleNamespace(num_hidden_layers=3))
    assert plain.pattern == "FFF"

    staged = IndexCacheConfig.from_model_config(fields, pipeline_stage_starts=[0, 42])
    assert staged.stage_layers(1)[0] == 42


def test_package_exports():
    assert indexcache_ops.IndexCacheConfig is IndexCacheConfig
    assert indexcache_ops.IndexCache is IndexCache


_REJECTIONS = [
    (dict(num_hidden_layers=0), r"num_hidden_layers: expected an int >= 1, got 0"),
    (dict(num_hidden_layers=4.0), r"num_hidden_layers: expected an int >= 1, got 4\.0 \(float\)"),
    (dict(num_hidden_layers=4, index_topk_freq=0), r"index_topk_freq: expected an int >= 1, got 0"),
    (dict(num_hidden_layers=4, index_topk_freq=-2),
     r"index_topk_freq: expected an int >= 1, got -2"),
    (dict(num_hidden_layers=4, index_topk_freq=2.0),
     r"index_topk_freq: expected an int >= 1, got 2\.0 \(float\)"),
    (dict(num_hidden_layers=4, index_topk_freq="4"),
     r"index_topk_freq: expected an int >= 1, got '4' \(str\)"),
    (dict(num_hidden_layers=4, index_topk_freq=True),
     r"index_topk_freq: expected an int >= 1, got True \(bool\)"),
    (dict(num_hidden_layers=4, index_topk_freq=4, index_skip_topk_offset=0),
     r"index_skip_topk_offset: expected an int >= 1, got 0"),
    (dict(num_hidden_layers=4, index_topk_freq=4, index_skip_topk_offset=-1),
     r"index_skip_topk_offset: expected an int >= 1, got -1"),
    (dict(num_hidden_layers=4, index_topk_pattern="FSS"),
     r"index_topk_pattern: expected one character per layer \(num_hidden_layers = 4\), "
     r"got length 3"),
    (dict(num_hidden_layers=4, index_topk_pattern="FSSSF"),
     r"index_topk_pattern: .* got length 5"),
    (dict(num_hidden_layers=4, index_topk_pattern="FSxS"),
     r"index_topk_pattern: expected only 'F' and 'S', got 'x' at position 2"),
    (dict(num_hidden_layers=4, index_topk_pattern="ffss"),
     r"index_topk_pattern: expected only 'F' and 'S', got 'f' at position 0"),
    (dict(num_hidden_layers=4, index_topk_pattern="SFFF"),
     r"index_topk_pattern: expected layer 0 to be 'F'.*got 'S'"),
    (dict(num_hidden_layers=4, index_topk_pattern=["F", "S", "S", "S"]),
     r"index_topk_pattern: expected a string of 'F'/'S', got \[.*\(list\)"),
    (dict(num_hidden_layers=3, indexer_types=["full", "shared"]),
     r"indexer_types: expected one entry per layer \(num_hidden_layers = 3\), got length 2"),
    (dict(num_hidden_layers=3, indexer_types=["full", "Shared", "full"]),
     r"indexer_types: expected only 'full' and 'shared', got 'Shared' at layer 1"),
    (dict(num_hidden_layers=3, indexer_types=["full", "F", "full"]),
     r"indexer_types: expected only 'full' and 'shared', got 'F' at layer 1"),
    (dict(num_hidden_layers=3, indexer_types=["shared", "full", "full"]),
     r"indexer_types: expected layer 0 to be 'full'.*got 'shared'"),
    (dict(num_hidden_layers=3, indexer_types="FSS"),
     r"indexer_types: expected a list of 'full'/'shared', got 'FSS'"),
    # An invalid field is refused also where a higher-precedence field overrides it.
    (dict(num_hidden_layers=2, index_topk_freq=0, indexer_types=["full", "full"]),
     r"index_topk_freq: expected an int >= 1, got 0"),
    (dict(num_hidden_layers=2, index_topk_pattern="F", indexer_types=["full", "full"]),
     r"index_topk_pattern: .* got length 1"),
    (dict(num_hidden_layers=10, index_topk_freq=4, pipeline_stage_starts=[0, 4]),
     r"pipeline_stage_starts: expected every stage to start on a Full layer, got stage 1 "
     r"starting at layer 4, which is Shared \(it would reuse layer 1's indices from stage 0\)"),
    (dict(num_hidden_layers=10, pipeline_stage_starts=[0, 5, 5]),
     r"pipeline_stage_starts: expected strictly increasing layer ids in \[0, 10\), "
     r"got \(0, 5, 5\)"),
    (dict(num_hidden_layers=10, pipeline_stage_starts=[0, 6, 3]),
     r"pipeline_stage_starts: expected strictly increasing"),
    (dict(num_hidden_layers=10, pipeline_stage_starts=[0, 10]),
     r"pipeline_stage_starts: expected strictly increasing layer ids in \[0, 10\), "
     r"got \(0, 10\)"),
    (dict(num_hidden_layers=10, pipeline_stage_starts=[0, -5]),
     r"pipeline_stage_starts\[1\]: expected an int >= 0, got -5"),
    (dict(num_hidden_layers=4, num_nextn_predict_layers=-1),
     r"num_nextn_predict_layers: expected an int >= 0, got -1"),
    (dict(num_hidden_layers=4, mtp_layer_ids=[3]),
     r"mtp_layer_ids: expected distinct ids >= num_hidden_layers \(4\), got \(3,\)"),
    (dict(num_hidden_layers=4, mtp_layer_ids=[4, 4]),
     r"mtp_layer_ids: expected distinct ids >= num_hidden_layers \(4\), got \(4, 4\)"),
    (dict(num_hidden_layers=4, num_nextn_predict_layers=2, mtp_layer_ids=[4]),
     r"mtp_layer_ids: expected num_nextn_predict_layers \(2\) ids, got 1"),
]


@pytest.mark.parametrize("kwargs,match", _REJECTIONS)
def test_config_rejections(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IndexCacheConfig(**kwargs)


def test_from_model_config_rejections():
    with pytest.raises(ValueError, match=r"num_hidden_layers: expected an int >= 1 in the model "
                                         r"config, got nothing"):
        IndexCacheConfig.from_model_config({"index_topk_freq": 4})
    with pytest.raises(ValueError, match=r"index_skip_topk_offset: expected an int >= 1, got 0"):
        IndexCacheConfig.from_model_config(types.SimpleNamespace(
            num_hidden_layers=8, index_topk_freq=4, index_skip_topk_offset=0))


def test_query_rejections():
    cfg = IndexCacheConfig(num_hidden_layers=8, index_topk_freq=4, num_nextn_predict_layers=1)
    for bad in (-1, 9, True, 1.0, "3"):
        with pytest.raises(ValueError, match=r"layer: expected an id in \[0, 8\) or an MTP layer "
                                             r"\(8,\), got"):
            cfg.source_layer(bad)
    with pytest.raises(ValueError, match=r"expected exactly one of context_len and num_blocks, "
                                         r"got context_len=None, num_blocks=None"):
        cfg.indexer_k_cache_bytes_saved()
    with pytest.raises(ValueError, match=r"expected exactly one of context_len and num_blocks, "
                                         r"got context_len=64, num_blocks=1"):
        cfg.indexer_k_cache_bytes_saved(context_len=64, num_blocks=1)
    with pytest.raises(ValueError, match=r"num_blocks: expected an int >= 0, got -1"):
        cfg.indexer_k_cache_bytes_saved(num_blocks=-1)
    with pytest.raises(ValueError, match=r"head_dim: expected an int >= 1, got 0"):
        cfg.indexer_k_cache_bytes_saved(num_blocks=1, head_dim=0)


def test_config_is_frozen():
    cfg = IndexCacheConfig(num_hidden_layers=4, index_topk_freq=2)
    with pytest.raises(AttributeError):
        cfg.index_topk_freq = 1


# ---------------------------------------------------------------------------------------------
# Runtime (CPU ops; the CUDA tests at the end)
# ---------------------------------------------------------------------------------------------

H, D, TOPK = 32, 128, 64
# Full at 0, 1, 3, 5; Shared 2 -> 1 and 4 -> 3.
CFG6 = IndexCacheConfig(num_hidden_layers=6, index_topk_freq=2)


def _prefill_inputs(seed, s, n, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, H, D, generator=g).to(torch.float8_e4m3fn)
    k = torch.randn(n, D, generator=g).to(torch.float8_e4m3fn)
    k_scale = torch.rand(n, generator=g) + 0.5
    weights = torch.randn(s, H, generator=g)
    # Causal windows with the S queries at the end of N keys; the first row sees fewer than TOPK.
    ke = torch.arange(n - s + 1, n + 1, dtype=torch.int32)
    ks = torch.zeros(s, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k, k_scale, weights, ks, ke))


def _paged_inputs(seed, context_lens, next_n, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    max_len = max(context_lens)
    pages_per_seq = -(-max_len // 64)
    num_pages = batch * pages_per_seq + 3
    values = torch.randn(num_pages, 64 * D, generator=g).to(torch.float8_e4m3fn)
    scales = torch.rand(num_pages, 64, generator=g) + 0.5
    kv_cache = torch.cat([values.view(torch.uint8), scales.view(torch.uint8)], dim=1)
    kv_cache = kv_cache.view(num_pages, 64, 1, D + 4)
    # Scattered page ids, so positions are not the same as cache rows.
    block_table = torch.randperm(num_pages, generator=g)[:batch * pages_per_seq]
    block_table = block_table.view(batch, pages_per_seq).to(torch.int32)
    q = torch.randn(batch, next_n, H, D, generator=g).to(torch.float8_e4m3fn)
    weights = torch.randn(batch * next_n, H, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    tensors = tuple(t.to(device) for t in (q, kv_cache, weights, lens, block_table))
    return tensors + (max_len,)


def _rows_sorted(t):
    return torch.sort(t, dim=1).values


def test_prefill_full_layers_equal_direct_op_and_shared_alias_source():
    cache = IndexCache(CFG6, max_tokens=40, topk=TOPK, device="cpu")
    results = {}
    for layer in range(6):
        if CFG6.is_full(layer):
            inputs = _prefill_inputs(layer, s=24, n=100)
            got = cache.prefill(layer, *inputs)
            want = ops.indexer_topk(*inputs, TOPK)
            assert got.dtype == torch.int32 and got.shape == (24, TOPK)
            assert torch.equal(_rows_sorted(got), _rows_sorted(want))
            assert got.data_ptr() == cache.buffer(layer).data_ptr()
        else:
            got = cache.prefill(layer)
            source = results[CFG6.source_layer(layer)]
            assert got.data_ptr() == source.data_ptr()
            assert got.shape == source.shape and torch.equal(got, source)
        results[layer] = got
    # Shared layers own no buffer: their buffer is their source's.
    assert cache.buffer(2) is cache.buffer(1)
    assert cache.nbytes == 4 * 40 * TOPK * 4


def test_buffers_persist_and_are_reused_across_steps():
    cache = IndexCache(CFG6, max_tokens=40, topk=TOPK, device="cpu")
    ptrs = {layer: cache.buffer(layer).data_ptr() for layer in CFG6.full_layers}
    previous = None
    for step, s in enumerate((24, 40, 7)):
        out = {}
        for layer in range(6):
            args = _prefill_inputs(100 * step + layer, s=s, n=90) if CFG6.is_full(layer) else ()
            out[layer] = cache.prefill(layer, *args)
            assert out[layer].shape == (s, TOPK)
            assert out[layer].data_ptr() == ptrs[CFG6.source_layer(layer)]
        assert {layer: cache.buffer(layer).data_ptr() for layer in CFG6.full_layers} == ptrs
        # The results of this step are this step's inputs', not the previous step's leftovers.
        want = ops.indexer_topk(*_prefill_inputs(100 * step + 3, s=s, n=90), TOPK)
        assert torch.equal(_rows_sorted(out[4]), _rows_sorted(want))
        if previous is not None:
            assert not torch.equal(out[4][:7], previous[:7])
        previous = out[4].clone()


def test_decode_full_layers_equal_direct_op_and_shared_alias_source():
    cache = IndexCache(CFG6, max_tokens=16, topk=TOPK, device="cpu", max_batch=8, max_next_n=2)
    assert cache.capacity == 16
    results = {}
    for layer in range(6):
        if CFG6.is_full(layer):
            inputs = _paged_inputs(layer, [130, 70, 5], next_n=2)
            got = cache.decode(layer, *inputs)
            want = ops.indexer_topk_paged(*inputs, TOPK)
            assert got.dtype == torch.int32 and got.shape == (6, TOPK)
            assert torch.equal(_rows_sorted(got), _rows_sorted(want))
            assert got.data_ptr() == cache.buffer(layer).data_ptr()
        else:
            got = cache.decode(layer, None, None, None, None, None, None)
            assert got.data_ptr() == results[CFG6.source_layer(layer)].data_ptr()
        results[layer] = got


def test_mixed_step_decode_rows_then_prefill_rows():
    cache = IndexCache(CFG6, max_tokens=32, topk=TOPK, device="cpu")
    dec, pre = {}, {}
    for layer in range(6):
        full = CFG6.is_full(layer)
        dec[layer] = cache.decode(layer, *(_paged_inputs(layer, [90, 3], 1) if full else ()))
        if not full:
            with pytest.raises(ValueError, match=rf"IndexCache.prefill: row_offset: expected 2 "
                                                 rf"\(what source layer {layer - 1} wrote at\) "
                                                 rf"for Shared layer {layer}, got 0"):
                cache.prefill(layer)
        pre[layer] = cache.prefill(layer, *(_prefill_inputs(layer, 10, 50) if full else ()),
                                   row_offset=2)
    for layer in range(6):
        source = CFG6.source_layer(layer)
        base = cache.buffer(source)
        assert dec[layer].data_ptr() == base.data_ptr()
        assert pre[layer].data_ptr() == base[2].data_ptr()
        # The prefill rows did not overwrite the decode rows.
        want = ops.indexer_topk_paged(*_paged_inputs(source, [90, 3], 1), TOPK)
        assert torch.equal(_rows_sorted(base[:2]), _rows_sorted(want))


def test_mtp_layer_runs_its_own_indexer():
    cfg = IndexCacheConfig(num_hidden_layers=4, index_topk_freq=4, num_nextn_predict_layers=1)
    cache = IndexCache(cfg, max_tokens=8, topk=TOPK, device="cpu")
    assert sorted(cache._buffers) == [0, 1, 4]
    inputs = _paged_inputs(7, [77], next_n=2)
    got = cache.decode(4, *inputs)
    assert got.data_ptr() == cache.buffer(4).data_ptr()
    assert torch.equal(_rows_sorted(got), _rows_sorted(ops.indexer_topk_paged(*inputs, TOPK)))


def test_shared_before_source_raises():
    cache = IndexCache(CFG6, max_tokens=32, topk=TOPK, device="cpu")
    with pytest.raises(RuntimeError, match=r"layer 2 is Shared and reuses layer 1's indices, but "
                                           r"layer 1 has not run prefill in this step"):
        cache.prefill(2)

    cache.prefill(0, *_prefill_inputs(0, 8, 20))
    cache.prefill(1, *_prefill_inputs(1, 8, 20))
    cache.prefill(2)
    # Indices of one entry point are not the other's.
    with pytest.raises(RuntimeError, match=r"layer 1 has not run decode in this step"):
        cache.decode(2)

    cache.begin_step()
    with pytest.raises(RuntimeError, match=r"layer 1 has not run prefill in this step"):
        cache.prefill(2)

    # The layer loop restarting (a lower layer id) starts a new step: the stale layer-3 indices of
    # the previous step are not handed to layer 4.
    for layer in range(4):
        cache.prefill(layer, *(_prefill_inputs(layer, 8, 20) if CFG6.is_full(layer) else ()))
    cache.prefill(0, *_prefill_inputs(0, 8, 20))
    cache.prefill(1, *_prefill_inputs(1, 8, 20))
    with pytest.raises(RuntimeError, match=r"layer 4 is Shared and reuses layer 3's indices"):
        cache.prefill(4)


def test_runtime_rejections():
    cache = IndexCache(CFG6, max_tokens=16, topk=TOPK, device="cpu", max_batch=2, max_next_n=2)
    q, k, k_scale, weights, ks, ke = _prefill_inputs(0, 8, 20)
    with pytest.raises(ValueError, match=r"IndexCache.prefill: layer 0 is Full and needs its "
                                         r"indexer inputs, got None for k_scale, ke"):
        cache.prefill(0, q, k, None, weights, ks, None)
    with pytest.raises(ValueError, match=r"IndexCache.decode: layer 1 is Full and needs its "
                                         r"indexer inputs, got None for q_fp8, kv_cache"):
        cache.decode(1)
    big = _prefill_inputs(0, 17, 20)
    with pytest.raises(ValueError, match=r"IndexCache.prefill: expected row_offset \+ rows <= "
                                         r"capacity 16 .* got row_offset 0 \+ 17 rows"):
        cache.prefill(0, *big)
    with pytest.raises(ValueError, match=r"got row_offset 9 \+ 8 rows"):
        cache.prefill(0, q, k, k_scale, weights, ks, ke, row_offset=9)
    with pytest.raises(ValueError, match=r"row_offset: expected an int >= 0, got -1"):
        cache.prefill(0, q, k, k_scale, weights, ks, ke, row_offset=-1)
    with pytest.raises(ValueError, match=r"IndexCache.prefill: q_fp8: expected \[S, H, D\], got "
                                         r"shape \(8, 4096\)"):
        cache.prefill(0, q.view(8, -1), k, k_scale, weights, ks, ke)
    with pytest.raises(ValueError, match=r"IndexCache.decode: expected batch <= max_batch 2, "
                                         r"got 3"):
        cache.decode(0, *_paged_inputs(0, [5, 5, 5], 1))
    with pytest.raises(ValueError, match=r"IndexCache.decode: expected next_n <= max_next_n 2, "
                                         r"got 3"):
        cache.decode(0, *_paged_inputs(0, [5], 3))
    with pytest.raises(ValueError, match=r"IndexCache.decode: q_fp8: expected \[B, next_n, H, D\]"):
        cache.decode(0, q, *_paged_inputs(0, [5], 1)[1:])
    with pytest.raises(ValueError, match=r"layer: expected an id in \[0, 6\)"):
        cache.prefill(6)
    with pytest.raises(ValueError, match=r"config: expected an IndexCacheConfig, got dict"):
        IndexCache({"num_hidden_layers": 6}, max_tokens=16)
    with pytest.raises(ValueError, match=r"max_tokens: expected an int >= 1, got 0"):
        IndexCache(CFG6, max_tokens=0)
    with pytest.raises(ValueError, match=r"topk: expected an int >= 1, got 0"):
        IndexCache(CFG6, max_tokens=8, topk=0)
    with pytest.raises(ValueError, match=r"share_buffers: expected a bool, got 1"):
        IndexCache(CFG6, max_tokens=8, share_buffers=1)


def test_stage_cache_holds_only_its_layers():
    cfg = IndexCacheConfig(num_hidden_layers=10, index_topk_freq=4, num_nextn_predict_layers=1,
                           pipeline_stage_starts=[0, 5])
    first = IndexCache(cfg, max_tokens=8, topk=TOPK, device="cpu", stage=0)
    last = IndexCache(cfg, max_tokens=8, topk=TOPK, device="cpu", stage=1)
    assert sorted(first._buffers) == [0, 1] and sorted(last._buffers) == [5, 9, 10]
    assert last.nbytes == 3 * 8 * TOPK * 4
    with pytest.raises(ValueError, match=r"layer: expected a layer of pipeline stage 1 "
                                         r"\(5, 6, 7, 8, 9, 10\), got 4"):
        last.prefill(4)
    got = last.prefill(5, *_prefill_inputs(5, 8, 30))
    assert last.prefill(6).data_ptr() == got.data_ptr()


def _lifetimes(cfg, layers):
    """Brute force: each indexer layer's index lifetime [layer, last layer reusing it]."""
    last = {f: f for f in layers if cfg.is_full(f)}
    for layer in layers:
        for f in last:
            if cfg.source_layer(layer) == f:
                last[f] = max(last[f], layer)
    return last


def _configs_for_sharing():
    g = torch.Generator().manual_seed(5)
    yield IndexCacheConfig(num_hidden_layers=61, index_topk_freq=4), None
    yield IndexCacheConfig(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3), None
    yield IndexCacheConfig(num_hidden_layers=10, index_topk_freq=4, num_nextn_predict_layers=2,
                           pipeline_stage_starts=[0, 5]), 1
    for _ in range(20):
        n = int(torch.randint(1, 30, (1,), generator=g))
        pattern = "F" + "".join("FS"[int(b)] for b in torch.randint(0, 2, (n - 1,), generator=g))
        yield IndexCacheConfig(num_hidden_layers=n, index_topk_pattern=pattern,
                               num_nextn_predict_layers=int(n % 3)), None


def test_shared_buffers_keep_overlapping_lifetimes_apart_with_fewest_buffers():
    for cfg, stage in _configs_for_sharing():
        cache = IndexCache(cfg, max_tokens=3, topk=5, device="cpu", stage=stage,
                           share_buffers=True)
        separate = IndexCache(cfg, max_tokens=3, topk=5, device="cpu", stage=stage)
        last = _lifetimes(cfg, cache.layers)
        assert sorted(cache._buffers) == sorted(last) == sorted(separate._buffers)
        ptr = {f: cache._buffers[f].data_ptr() for f in last}
        for f in last:
            for h in last:
                if f != h and f <= last[h] and h <= last[f]:
                    assert ptr[f] != ptr[h], (cfg, f, h)
        most_alive = max(sum(f <= x <= last[f] for f in last) for x in cache.layers)
        assert len(set(ptr.values())) == most_alive
        assert cache.nbytes == most_alive * 3 * 5 * 4
        assert separate.nbytes == len(last) * 3 * 5 * 4


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_shared_buffers_step_results_valid_through_their_lifetime(kind):
    cfg = IndexCacheConfig(num_hidden_layers=8, index_topk_pattern="FFSSFSFS")
    cache = IndexCache(cfg, max_tokens=24, topk=TOPK, device="cpu", max_batch=3, max_next_n=2,
                       share_buffers=True)
    assert cache.nbytes == cache.capacity * TOPK * 4  # one buffer for the whole layer stack
    for step in range(2):
        results = {}
        for layer in range(8):
            source = cfg.source_layer(layer)
            if kind == "prefill":
                inputs = _prefill_inputs(10 * step + layer, 24, 90) if layer == source else ()
                got = cache.prefill(layer, *inputs)
                want = ops.indexer_topk(*inputs, TOPK) if inputs else None
            else:
                inputs = _paged_inputs(10 * step + layer, [90, 40, 3], 2) if layer == source else ()
                got = cache.decode(layer, *(inputs or (None,) * 6))
                want = ops.indexer_topk_paged(*inputs, TOPK) if inputs else None
            if want is not None:
                assert torch.equal(_rows_sorted(got), _rows_sorted(want))
                results[layer] = got.clone()
            else:  # read before any later Full layer writes: still the source's indices
                assert torch.equal(got, results[source])


def test_decode_capacity_covers_max_batch_times_next_n():
    cache = IndexCache(CFG6, max_tokens=4, topk=TOPK, device="cpu", max_batch=3, max_next_n=2)
    assert cache.capacity == 6
    assert cache.decode(0, *_paged_inputs(0, [9, 70, 64], 2)).shape == (6, TOPK)


def test_torch_compile_layer_loop_fullgraph():
    torch._dynamo.reset()
    cache = IndexCache(CFG6, max_tokens=16, topk=TOPK, device="cpu")
    reference = IndexCache(CFG6, max_tokens=16, topk=TOPK, device="cpu")

    def forward(cache, per_layer):
        return [cache.prefill(layer, *per_layer[layer]) for layer in range(6)]

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(forward, backend=counter, fullgraph=True)
    frames = []
    for step in range(3):
        per_layer = [_prefill_inputs(10 * step + layer, 12, 40) if CFG6.is_full(layer) else ()
                     for layer in range(6)]
        got = compiled(cache, per_layer)
        want = forward(reference, per_layer)
        for layer in range(6):
            assert torch.equal(_rows_sorted(got[layer]), _rows_sorted(want[layer]))
            # The persistent buffer holds the compiled step's results.
            assert torch.equal(cache.buffer(layer)[:12], got[layer])
        frames.append(counter.frame_count)
    # No recompilation once the step boundary bookkeeping settled.
    assert frames[2] == frames[1]


def _capture(step):
    """Warms `step` up on a side stream, then captures it: (graph, what the capture returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


def _refresh(static, seed_offset, device):
    """New decode inputs written in place into the captured tensors (max_context_len stays)."""
    for layer, inputs in static.items():
        fresh = _paged_inputs(layer + seed_offset, [300, 64, 1, 129], 1, device)
        for dst, src in zip(inputs[:5], fresh[:5]):
            dst.copy_(src)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_captures_multi_layer_decode_step():
    device = "cuda"
    cache = IndexCache(CFG6, max_tokens=8, topk=TOPK, device=device, max_batch=4)
    static = {layer: _paged_inputs(layer, [300, 64, 1, 129], 1, device)
              for layer in CFG6.full_layers}

    def step():
        return [cache.decode(layer, *static.get(layer, ())) for layer in range(6)]

    graph, captured = _capture(step)
    for layer in range(6):
        assert captured[layer].data_ptr() == cache.buffer(layer).data_ptr()

    # New inputs written in place into the captured tensors; replay must see them.
    _refresh(static, 50, device)
    cache.buffer(0).fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    for layer in range(6):
        source = CFG6.source_layer(layer)
        want = ops.indexer_topk_paged(*static[source], TOPK)
        assert torch.equal(_rows_sorted(captured[layer]), _rows_sorted(want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_step_with_shared_buffers():
    """share_buffers in a captured step: every layer's indices are copied out right after its
    call (inside the graph), so each is checked within its lifetime after the replay."""
    device = "cuda"
    cache = IndexCache(CFG6, max_tokens=8, topk=TOPK, device=device, max_batch=4,
                       share_buffers=True)
    assert cache.nbytes == cache.capacity * TOPK * 4
    static = {layer: _paged_inputs(layer, [300, 64, 1, 129], 1, device)
              for layer in CFG6.full_layers}
    snapshots = [torch.empty(4, TOPK, dtype=torch.int32, device=device) for _ in range(6)]

    def step():
        for layer in range(6):
            snapshots[layer].copy_(cache.decode(layer, *static.get(layer, ())))

    graph, _ = _capture(step)
    _refresh(static, 70, device)
    graph.replay()
    torch.cuda.synchronize()
    for layer in range(6):
        want = ops.indexer_topk_paged(*static[CFG6.source_layer(layer)], TOPK)
        assert torch.equal(_rows_sorted(snapshots[layer]), _rows_sorted(want))
