"""CPU tests of the benchmark harness: DESIGN §5 counters against hand-computed numbers, the
DESIGN §7 JSON schema, the CPU fallback of time_fn, and the torch baselines against the ops."""

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# bench/ is a top-level package of the repository, not part of the installed indexcache_ops.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_indexer, bench_sparse_mla, bench_topk, harness  # noqa: E402

ROW_KEYS = {"op", "impl", "shape", "time_us", "tflops", "tbps", "pct_of_ceiling"}
CPU = harness.Machine(device="cpu", cuda=False, l2_bytes=0, slug="cpu")
H100ISH = harness.Ceilings(copy_tbps=3.0, bf16_tflops=800.0, fp8_tflops=1400.0,
                           copy_burst_tbps=3.1, bf16_burst_tflops=900.0, fp8_burst_tflops=1500.0)


# --- counters ---------------------------------------------------------------------------------

def test_indexer_prefill_counts():
    # causal tail, S = 4 of N = 8: query t sees [0, 8 - 4 + t + 1) = 5, 6, 7, 8 keys
    ke = harness.causal_tail_ends(4, 8)
    assert ke.tolist() == [5, 6, 7, 8]
    pairs = harness.window_pairs([0] * 4, ke, 8)
    assert pairs == 26
    assert harness.indexer_flops(64, 128, pairs) == 2 * 64 * 128 * 26 == 425_984
    # windows are clipped to [0, N) and empty windows count nothing
    assert harness.window_pairs([0, 3, 5, -2], [2, 3, 9, 1], 8) == 2 + 0 + 3 + 1


def test_indexer_prefill_headline_counts():
    S, N = 4096, 65536
    causal = harness.window_pairs(torch.zeros(S), harness.causal_tail_ends(S, N), N)
    assert causal == S * (N - S) + S * (S + 1) // 2 == 260_048_896
    assert harness.indexer_flops(64, 128, causal) == 4_260_641_112_064
    assert harness.indexer_flops(64, 128, S * N) == 4_398_046_511_104


def test_indexer_paged_counts():
    # lens 10 and 3, next_n = 2: rows see 9, 10 and 2, 3 positions
    assert harness.paged_pairs([10, 3], 2) == 24
    # H = 2, D = 4: q 2*2*2*4 = 32, cache (10 + 3) * (4 + 4) = 104, weights 2*2*2*4 = 32,
    # output [4, 10] f32 = 160
    assert harness.indexer_paged_bytes([10, 3], 2, 2, 4, 160) == 32 + 104 + 32 + 160
    # headline B = 64, context 65536, next_n = 1, logits output
    lens = [65536] * 64
    assert harness.indexer_paged_bytes(lens, 1, 64, 128, 64 * 65536 * 4) == 570_966_016


def test_topk_and_sparse_mla_counts():
    assert harness.topk_bytes([5, 7]) == 48
    assert harness.topk_bytes([131072] * 4096) == 2 * 2**30
    assert harness.sparse_mla_flops(3, 16, 4) == 3 * 2 * 16 * 4 * 1088 == 417_792
    # q 2*16*576*2 + kv 2*4*656 + indices 2*4*4 + out 2*16*512*2 + lse 2*16*4
    assert harness.sparse_mla_decode_bytes(2, 16, 4, 656) == 36864 + 5248 + 32 + 32768 + 128
    assert harness.sparse_mla_decode_bytes(128, 128, 2048, 656) == 208_732_160


def test_rotation_sets_exceed_twice_l2():
    l2 = 50 * 2**20
    assert harness.sets_needed(10 * 2**20, l2) == 11            # 110 MiB > 100 MiB
    assert harness.sets_needed(60 * 2**20, l2) == 1             # one call already spills L2
    assert harness.sets_needed(1, l2) == harness.MAX_SETS
    assert harness.sets_needed(10, 0) == 1                      # CPU: no rotation
    made = []
    sets = harness.rotating_sets(lambda: made.append(1) or SimpleNamespace(x=torch.ones(4)), CPU)
    assert len(sets) == 1 and len(made) == 1


def test_chunk_ranges_cover_everything():
    ranges = list(harness.chunk_ranges(10, harness.WORKSPACE_BYTES // 3))
    assert ranges == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(harness.chunk_ranges(5, 1)) == [(0, 5)]
    assert list(harness.chunk_ranges(2, 10 * harness.WORKSPACE_BYTES)) == [(0, 1), (1, 2)]


# --- rows and JSON ----------------------------------------------------------------------------

def test_make_row_rates_and_roofline_fraction():
    row = harness.make_row("sparse_mla_decode", "indexcache", {"B": 1}, 1e-3, flops=400 * 10**9,
                           nbytes=2 * 10**9, peak="bf16", ceilings=H100ISH)
    assert set(row) == ROW_KEYS
    assert row["time_us"] == 1000.0
    assert row["tflops"] == 400.0 and row["tbps"] == 2.0
    assert row["pct_of_ceiling"] == pytest.approx(100 * max(400 / 800, 2.0 / 3.0), rel=1e-3)
    # counts DESIGN §5 leaves undefined stay null; no ceilings (CPU) -> no percentage
    row = harness.make_row("topk", "torch", {}, 2e-3, None, 4 * 10**9, None, harness.Ceilings())
    assert row["tflops"] is None and row["tbps"] == 2.0 and row["pct_of_ceiling"] is None
    row = harness.make_row("indexer_logits", "x", {}, 1e-3, 10**12, None, "fp8", H100ISH)
    assert row["tbps"] is None and row["pct_of_ceiling"] == pytest.approx(100 / 1.4, rel=1e-3)
    assert harness.Ceilings().describe() == "ceilings: not measured"
    assert "copy 3 / 3.1 TB/s" in H100ISH.describe()


def test_results_document_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("INDEXCACHE_COMMIT", "abc1234-dirty")
    row = harness.make_row("topk", "torch", {"rows": 1}, 1e-5, None, 4096, None, H100ISH)
    doc = harness.results_document(CPU, H100ISH, harness.current_commit(), [row])
    path = harness.write_results(doc, tmp_path / "sub" / "topk.json")
    loaded = json.loads(path.read_text())
    assert list(loaded) == ["device", "date", "commit", "ceilings", "rows"]
    assert loaded["commit"] == "abc1234-dirty" and loaded["device"] == "cpu"
    assert loaded["ceilings"] == {"copy_tbps": 3.0, "bf16_tflops": 800.0, "fp8_tflops": 1400.0}
    assert [set(r) for r in loaded["rows"]] == [ROW_KEYS]


def test_commit_without_env(monkeypatch):
    monkeypatch.delenv("INDEXCACHE_COMMIT", raising=False)
    commit = harness.current_commit()
    assert commit == "unknown" or commit.split("-")[0].isalnum()


# --- timing -----------------------------------------------------------------------------------

def test_time_fn_cpu_rotates_and_reports_statistics():
    seen = []
    sets = [SimpleNamespace(i=i) for i in range(3)]
    t = harness.time_fn(lambda x: seen.append(x.i), sets, warmup=3, reps=12, machine=CPU)
    assert (t.reps, t.sets, t.graph) == (12, 3, False)
    assert seen == [0, 1, 2] + [i % 3 for i in range(12)]
    assert 0 <= t.min_s <= t.median_s <= t.p90_s


def test_time_fn_cpu_budget_and_factory():
    t = harness.time_fn(lambda _: time.sleep(2e-3), lambda: SimpleNamespace(x=torch.ones(8)),
                        budget_s=0.004, machine=CPU)
    assert t.sets == 1
    assert t.reps == harness.MIN_REPS                # 4 ms of budget / 2 ms calls < MIN_REPS
    assert t.median_s >= 2e-3


def test_failures_are_classified():
    assert harness._classify(NotImplementedError("no CUDA kernel"))[0] == "skipped"
    assert harness._classify(RuntimeError("topk: CUDA path not implemented yet"))[0] == "skipped"
    assert harness._classify(harness.OpsUnavailable("not importable"))[0] == "skipped"
    status, reason = harness._classify(ValueError("bad\nsecond line"))
    assert status == "failed" and reason == "ValueError: bad"


def test_unavailable_ops_skip_instead_of_failing():
    ops = harness.UnavailableOps("indexcache_ops.ops not importable (ImportError: x)")
    with pytest.raises(harness.OpsUnavailable):
        ops.topk(torch.zeros(1, 1), 1)


# --- families on CPU --------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback runs only without CUDA")
def test_cpu_fallback_run_writes_design_json(tmp_path, capsys):
    rc = harness.main([bench_topk], ["--out", str(tmp_path), "--budget", "0.01", "--impls", "torch"])
    assert rc == 0
    doc = json.loads((tmp_path / "topk-headline-cpu.json").read_text())
    assert doc["device"] == "cpu" and doc["ceilings"]["copy_tbps"] is None
    assert {r["impl"] for r in doc["rows"]} == {"torch"} and len(doc["rows"]) == 2
    assert all(set(r) == ROW_KEYS and r["time_us"] > 0 for r in doc["rows"])
    out = capsys.readouterr().out
    assert "CPU FALLBACK" in out and out.rstrip().splitlines()[-1].startswith("rows: 2 ok")


def test_spread_indices_are_distinct_and_visible():
    torch.manual_seed(0)
    visible = torch.tensor([4096, 5000, 2048])
    idx = bench_sparse_mla.spread_indices(visible, 2048)
    assert idx.dtype == torch.int32 and idx.shape == (3, 2048)
    for row, n in zip(idx, visible):
        assert len(set(row.tolist())) == 2048 and 0 <= int(row.min()) and int(row.max()) < n
    with pytest.raises(ValueError):
        bench_sparse_mla.spread_indices(torch.tensor([100]), 2048)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    return float((a[finite].double() - b[finite].double()).norm() / b[finite].double().norm())


def test_padded_indexer_case_zeroes_its_last_queries():
    ops = pytest.importorskip("indexcache_ops.ops")
    ctx = harness.Context(machine=CPU, sweep=False, ops=ops)
    assert bench_indexer.PADDED_HEADLINE["zero_rows"] == 256
    shape = dict(S=40, N=700, H=32, D=128, window="causal", zero_rows=7)
    [case] = [c for c in bench_indexer._prefill_cases(ctx, shape) if c.op == "indexer_topk"]
    q = case.make_inputs().q.float()
    assert torch.all(q[-7:] == 0) and torch.all(q[:-7].abs().amax(dim=(1, 2)) > 0)


def test_torch_baselines_compute_the_ops(monkeypatch):
    """The baselines are timed as stand-ins for the ops, so they must compute the same thing
    (to bf16 accuracy); a tiny workspace forces their chunked paths."""
    ops = pytest.importorskip("indexcache_ops.ops")
    monkeypatch.setattr(harness, "WORKSPACE_BYTES", 1 << 20)
    torch.manual_seed(0)
    ctx = harness.Context(machine=CPU, sweep=False, ops=ops)
    for window in ("causal", "full"):
        case = bench_indexer._prefill_cases(ctx, dict(S=37, N=700, H=32, D=128, window=window))[0]
        x = case.make_inputs()
        ref = ops.indexer_logits(x.q, x.k, x.k_scale, x.weights, x.ks, x.ke)
        assert _relative(case.impls[1].fn(x), ref) < 1e-2
    case = bench_indexer._decode_cases(ctx, dict(B=3, ctx=640, next_n=2, H=32, D=128))[0]
    x = case.make_inputs()
    x.context_lens = torch.tensor([640, 300, 65], dtype=torch.int32)
    ref = ops.indexer_logits_paged(x.q, x.kv_cache, x.weights, x.context_lens, x.block_table, 640)
    assert _relative(case.impls[1].fn(x), ref) < 1e-2
    cases = [bench_sparse_mla._prefill_case(ctx, dict(S=40, N=3000, Hq=16, k=512))] + [
        bench_sparse_mla._decode_case(ctx, dict(B=3, next_n=2, Hq=16, k=512, cache=c, ctx=1024))
        for c in ("bf16", "fp8")]
    for case in cases:
        x = case.make_inputs()
        ref_out, ref_lse = case.impls[0].fn(SimpleNamespace(**{**vars(x), "out": None, "lse": None}))
        case.impls[1].fn(x)
        assert _relative(x.out, ref_out) < 1e-2 and _relative(x.lse, ref_lse) < 1e-3


# --- the profiling entry point ----------------------------------------------------------------

def test_profile_runs_the_benchmark_case_it_names(capsys):
    from bench import profile
    assert profile.main(["--family", "topk", "--op", "topk", "--shape", "rows=4",
                         "--calls", "1"]) == 0
    assert "ran topk [indexcache] rows=4 len=8192" in capsys.readouterr().out
    assert profile.main(["--family", "topk", "--op", "topk", "--impl", "nope"]) == 2
    assert profile.main(["--family", "topk", "--op", "sparse_mla_decode"]) == 2
