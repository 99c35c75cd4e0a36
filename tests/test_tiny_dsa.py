"""The tiny DSA example (examples/tiny_dsa) on a CPU: its building blocks against this package's
ops, the IndexCache wiring, a real training check, and the whole pipeline at its few-step size."""

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.tiny_dsa import model as tiny  # noqa: E402
from examples.tiny_dsa import train as tiny_train  # noqa: E402
from indexcache_ops import ops  # noqa: E402
from indexcache_ops.layers import check_pattern  # noqa: E402
from indexcache_ops.reuse import IndexCacheConfig  # noqa: E402


def test_sparse_attention_matches_sparse_mla_prefill(gen):
    s, heads, k = 40, 16, 12
    q = torch.randn(s, heads, 576, generator=gen).to(torch.bfloat16)
    kv = torch.randn(s, 576, generator=gen).to(torch.bfloat16)
    # Distinct indices per row with -1 padding, at least one valid each.
    indices = torch.stack([torch.randperm(s, generator=gen)[:k] for _ in range(s)]).int()
    drop = torch.rand(s, k, generator=gen) < 0.3
    drop[:, 0] = False
    indices[drop] = -1
    want, _ = ops.sparse_mla_prefill(q, kv[:, None], indices, 576 ** -0.5)
    got, probs = tiny.sparse_attention(q.float()[None], kv.float()[None], indices[None],
                                       576 ** -0.5, 512)
    torch.testing.assert_close(got[0], want.float(), rtol=2e-2, atol=2e-2)
    assert torch.all((probs[0] > 0) == tiny.selection_mask(indices[None], s)[0][None])


def test_shared_layers_reuse_indices_and_skip_their_indexer():
    torch.manual_seed(0)
    model = tiny.TinyDSA(tiny.TINY)
    calls = []
    selector = model.selector
    model.selector = lambda *a: calls.append(1) or selector(*a)
    tokens = torch.randint(0, 256, (2, tiny.TINY.context))
    trace = model(tokens, IndexCacheConfig(4, index_topk_pattern="FSFS"), indexer_scores=True)
    assert len(calls) == 2
    assert trace.indices[1] is trace.indices[0] and trace.indices[3] is trace.indices[2]
    assert [s is None for s in trace.indexer_scores] == [False, True, False, True]
    topk = tiny.TINY.topk
    idx = trace.indices[0]
    assert idx.shape == (2, tiny.TINY.context, topk) and idx.dtype == torch.int32
    positions = torch.arange(tiny.TINY.context)[None, :, None]
    assert torch.all((idx >= 0) <= (idx <= positions))  # causal
    assert torch.all((idx >= 0).sum(-1) == (positions[..., 0] + 1).clamp(max=topk))


def test_data_split_is_by_file_and_deterministic():
    streams, stats = tiny_train.load_corpus()
    assert all(stats["files"][s] > 0 for s in tiny_train.SPLITS)
    assert all(stats["bytes"][s] == streams[s].size > 10 * 1025 for s in tiny_train.SPLITS)
    names = ["json/__init__.py", "asyncio/tasks.py", "test/test_re.py"]
    assert [tiny_train.split_of(n) for n in names] == [tiny_train.split_of(n) for n in names]


def test_training_decreases_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny.TINY
    model = tiny.TinyDSA(cfg)
    gen = torch.Generator().manual_seed(0)
    streams, _ = tiny_train.load_corpus()
    stream = torch.from_numpy(streams["train"].copy())
    batch = tiny_train.random_windows(stream, 4, cfg.context, gen)
    all_full = "F" * cfg.n_layers
    before = tiny_train.lm_loss(model, [batch], all_full)
    opt = tiny_train.make_optimizer(model, 3e-3)
    causal = tiny_train.causal_rows(4, cfg.context, batch.device)
    model.train()
    for step in range(8):
        lm, kl = tiny_train.train_step(model, opt, batch, step >= 3, causal, 3e-3)
        assert math.isfinite(lm.item()) and math.isfinite(kl.item()) and kl.item() > -1e-6
    after = tiny_train.lm_loss(model, [batch], all_full)
    assert after < before - 0.3, (before, after)


def test_whole_pipeline_tiny(tmp_path):
    results = tiny_train.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--seed", "0"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["heldout"]["rows"] == json.loads(json.dumps(results["heldout"]["rows"]))
    assert (tmp_path / "results.md").read_text().startswith("| setting")
    n = tiny.TINY.n_layers

    training = on_disk["training"]
    assert training["steps"] == 8 and training["dense_steps"] + training["sparse_steps"] == 8
    assert training["dense_steps"] > 0 and training["sparse_steps"] > 0
    assert all(math.isfinite(c["lm_loss"]) and math.isfinite(c["indexer_kl"])
               for c in training["curve"])

    matrix = torch.tensor(on_disk["overlap"]["matrix"])
    assert matrix.shape == (n, n) and torch.all((matrix >= 0) & (matrix <= 1))
    torch.testing.assert_close(matrix.diagonal(), torch.ones(n))

    search = on_disk["search"]
    assert search["evaluations"] == 1 + 3 + 2 + 1  # 4 layers down to 1 Full, layer 0 fixed
    for retention, pattern in search["patterns"].items():
        check_pattern(pattern, n)
        assert pattern.count("F") == max(1, n // int(retention.split("/")[1]))

    rows = on_disk["heldout"]["rows"]
    names = {(r["name"], r["retention"]) for r in rows}
    for r in ("1/2", "1/4", "1/8"):
        assert ("uniform", r) in names and ("searched", r) in names
    assert ("uniform + distillation", "1/4") in names and ("all-Full", "1") in names
    for row in rows:
        assert math.isfinite(row["loss"]) and 0 < row["loss"] < 10
        if row["pattern"] is not None:
            check_pattern(row["pattern"], n)

    distillation = on_disk["distillation"]
    assert distillation["steps"] == 3
    assert all(math.isfinite(c["kl"]) and c["kl"] > -1e-6 for c in distillation["curve"])
    assert [type(c["holds"]) for c in on_disk["expectations"]] == [bool] * 3


def test_distillation_trains_only_the_full_indexers():
    torch.manual_seed(0)
    cfg = tiny.TINY
    model = tiny.TinyDSA(cfg)
    streams, _ = tiny_train.load_corpus()
    stream = torch.from_numpy(streams["train"].copy())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = tiny_train.TINY_SETTINGS
    student, record = tiny_train.distill(model, "FSFS", stream, settings,
                                         torch.Generator().manual_seed(0))
    assert record["served"] == {"0": [0, 1], "2": [2, 3]}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    full_indexers = ("blocks.0.indexer.", "blocks.2.indexer.")
    assert changed and all(k.startswith(full_indexers) for k in changed)


def test_trajectory_summary_by_hand():
    from examples.tiny_dsa import trajectory
    # 8 layers, baseline 2.0: single flips cost 1 %, 2 %, ... of it; greedy flips 3, 1, 5, ...
    single = {str(layer): 2.0 * (1 + layer / 100) for layer in range(1, 8)}
    losses = [2.001, 2.003, 2.01, 2.05, 2.1, 2.2, 2.4]
    steps = [{"step": 0, "flipped": 3, "loss": losses[0], "candidates": single}]
    steps += [{"step": i, "flipped": f, "loss": losses[i], "candidates": {}}
              for i, f in enumerate([1, 5, 2, 7, 4, 6], start=1)]
    searched = [{"name": "searched", "retention": f"1/{r}", "num_full": 8 // r} for r in (2, 4, 8)]
    doc = {"config": {"model": {"n_layers": 8}},
           "search": {"baseline_loss": 2.0, "steps": steps},
           "heldout": {"rows": [{"name": "uniform", "retention": "1/2", "num_full": 4}] + searched}}
    s = trajectory.summarise(doc)
    assert s["free_flips"] == 2                         # +0.05 %, +0.15 %, then +0.5 %
    half = s["retentions"]["1/2"]                       # 4 flips: layers 3, 1, 5, 2
    assert half["flips"] == 4 and math.isclose(half["measured_pct"], 2.5)
    assert math.isclose(half["sum_of_single_flips_pct"], 3 + 1 + 5 + 2)
    assert s["retentions"]["1/8"]["flips"] == 7 and math.isclose(
        s["retentions"]["1/8"]["measured_pct"], 20.0)


def test_trajectory_reads_committed_runs(capsys):
    from examples.tiny_dsa import trajectory
    runs = sorted((ROOT / "bench" / "results").glob("tiny_dsa*/results.json"))
    assert runs, "the committed tiny DSA runs are gone"
    assert trajectory.main([str(p) for p in runs]) == 0
    out = capsys.readouterr().out
    blocks = out.split(f"{runs[0].parent.parent}/")[1:]  # one per run, in argument order
    assert len(blocks) == len(runs)
    for path, block in zip(runs, blocks):
        n = json.loads(path.read_text())["config"]["model"]["n_layers"]
        # 1/4 keeps n / 4 Full layers: n - n / 4 greedy flips (12 of 16, 24 of 32).
        assert block.startswith(f"{path.parent.name}/results.json: {n} layers")
        assert f"1/4: {n - n // 4} flips" in block
