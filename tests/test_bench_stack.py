"""CPU tests of the DSA stack benchmark: the Amdahl bound against hand-computed numbers, the
pattern list of DeepSeek-V3.2 (61 layers) and GLM-5 (78 layers), the run plans, and the CPU
fallback end to end writing its DESIGN §7 JSON."""

import json
import math
import sys
from pathlib import Path

import pytest

# bench/ is a top-level package of the repository, not part of the installed indexcache_ops.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_stack, harness  # noqa: E402

CPU = harness.Machine(device="cpu", cuda=False, l2_bytes=0, slug="cpu")
ROW_KEYS = {"op", "impl", "shape", "time_us", "tflops", "tbps", "pct_of_ceiling", "speedup",
            "amdahl_bound", "pct_of_bound", "kcache_bytes_saved", "indexer_us", "attention_us",
            "reuse_host_us"}


def test_amdahl_bound_hand_computed():
    # 4 layers, 1 Full: t_full = 3, t_shared = 1 -> 4*3 / (1*3 + 3*1) = 12 / 6
    assert bench_stack.amdahl_bound(4, 1, 3.0, 1.0) == 2.0
    # DeepSeek-V3.2 200K prefill guess, 16 of 61 Full: t_full = 36 + 14 ms, t_shared = 14 ms
    # -> 61*50 / (16*50 + 45*14) = 3050 / 1430
    assert bench_stack.amdahl_bound(61, 16, 0.050, 0.014) == pytest.approx(3050 / 1430)
    assert bench_stack.amdahl_bound(61, 61, 0.050, 0.014) == 1.0        # all Full: no gain
    assert bench_stack.amdahl_bound(78, 21, 0.02, 0.02) == 1.0          # free indexer: no gain
    assert bench_stack.amdahl_bound(78, 21, 1.0, 0.0) == pytest.approx(78 / 21)   # L / F limit


@pytest.mark.parametrize("layers, expected", [
    (61, {"all-full": 61, "uniform-1/2": 31, "offset3-1/2": 32, "uniform-1/4": 16,
          "offset3-1/4": 17, "uniform-1/8": 8, "offset3-1/8": 10}),
    (78, {"all-full": 78, "uniform-1/2": 39, "offset3-1/2": 40, "uniform-1/4": 20,
          "offset3-1/4": 21, "uniform-1/8": 10, "offset3-1/8": 12}),
])
def test_pattern_list(layers, expected):
    pats = bench_stack.patterns(layers)
    assert [p.name for p in pats] == list(expected)           # all-full first: the reference
    assert {p.name: p.config.num_full for p in pats} == expected
    for p in pats:
        assert len(p.config.pattern) == layers and p.config.pattern[0] == "F"
    by_name = {p.name: p.config for p in pats}
    # uniform: ceil(L/f) evenly spaced Full layers; offset 3: Full at 0, 1, 2, 2+f, 2+2f, ...
    assert by_name["uniform-1/4"].full_layers == tuple(i * layers // math.ceil(layers / 4)
                                                       for i in range(math.ceil(layers / 4)))
    assert by_name["offset3-1/4"].full_layers == (0, 1) + tuple(range(2, layers, 4))
    # the quick plan keeps all-full and the 1/4 patterns only
    assert [p.name for p in bench_stack.patterns(layers, (4,))] == [
        "all-full", "uniform-1/4", "offset3-1/4"]


def test_glm52_pattern_is_the_shipped_one():
    # DESIGN §4: GLM-5.2 ships freq 4, offset 3 -> F at 0, 1, 2, 6, 10, ..., 74: 21 of 78 layers
    offset = {p.name: p.config for p in bench_stack.patterns(78)}["offset3-1/4"]
    assert offset.full_layers == (0, 1, 2) + tuple(range(6, 75, 4))
    # 57 Shared layers x 3200 pages (200K tokens) x 64 tokens x (128 + 4) bytes
    assert offset.indexer_k_cache_bytes_saved(context_len=204800) == 57 * 3200 * 64 * 132


def test_plans():
    default = bench_stack.make_plan(cuda=True)
    assert default.mode == "headline" and [m.name for m in default.models] == [
        "deepseek-v3.2", "glm-5"]
    assert default.prefill_contexts == default.decode_contexts == (8192, 65536, 204800)
    assert default.batches == (1, 32, 128) and default.retentions == (2, 4, 8)
    sweep = bench_stack.make_plan(cuda=True, sweep=True, model_names=["glm-5"])
    assert sweep.prefill_contexts == (8192, 32768, 65536, 131072, 204800)
    assert [m.name for m in sweep.models] == ["glm-5"]
    groups = sweep.groups(sweep.models[0])
    assert len(groups) == 5 + 5 * 3 and groups[0].queries == 8192
    cpu = bench_stack.make_plan(cuda=False, sweep=True)   # no sweep without CUDA
    assert [m.name for m in cpu.models] == ["tiny-cpu"] and cpu.prefill_contexts == (256,)
    assert cpu.models[0].layers <= 4 and cpu.models[0].topk == 64


def test_cpu_fallback_writes_design_json(tmp_path, monkeypatch, capsys):
    # forced, so the test runs the tiny CPU path also on a machine with a GPU
    monkeypatch.setattr(harness, "detect_machine", lambda: CPU)
    assert bench_stack.main(["--out", str(tmp_path), "--budget", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "CPU FALLBACK" in out and "=== summary" in out
    doc = json.loads((tmp_path / "stack-headline-cpu.json").read_text())
    assert doc["device"] == "cpu" and set(doc["ceilings"]) == {"copy_tbps", "bf16_tflops",
                                                               "fp8_tflops"}
    rows = doc["rows"]
    names = [p.name for p in bench_stack.patterns(4)]
    # prefill at 256 tokens, decode at 256 tokens for batch 1 and 2: 7 patterns each
    assert [(r["op"], r["shape"]["batch"]) for r in rows[::7]] == [
        ("dsa_stack_prefill", 1), ("dsa_stack_decode", 1), ("dsa_stack_decode", 2)]
    assert [r["impl"] for r in rows] == names * 3
    for r in rows:
        assert set(r) == ROW_KEYS
        shape = r["shape"]
        assert shape["model"] == "tiny-cpu" and shape["context"] == 256
        assert (shape["H"], shape["Hq"], shape["k"], shape["layers"]) == (32, 16, 64, 4)
        assert shape["num_full"] == shape["pattern"].count("F")
        assert r["time_us"] > 0 and r["speedup"] > 0
        t_full, t_shared = r["indexer_us"] + r["attention_us"], r["attention_us"]
        # Every stored number has 4 significant digits (up to 5e-4 relative off the exact value),
        # so a value recomputed from two of them and compared with a third can be ~1.5e-3 off.
        assert r["amdahl_bound"] == pytest.approx(bench_stack.amdahl_bound(
            4, shape["num_full"], t_full, t_shared), rel=2e-3)
        assert r["pct_of_bound"] == pytest.approx(100 * r["speedup"] / r["amdahl_bound"],
                                                  rel=2e-3)
        # one 64-token page of (128 + 4) bytes per 64 tokens of 256, per Shared layer
        assert r["kcache_bytes_saved"] == (4 - shape["num_full"]) * 4 * 64 * 132
        if r["impl"] == "all-full":
            assert r["speedup"] == r["amdahl_bound"] == 1.0 and r["reuse_host_us"] is None
        else:
            assert r["reuse_host_us"] > 0
    png = tmp_path / "stack-headline-cpu.png"
    assert png.exists() == (harness.optional_module("matplotlib") is not None)
