"""greedy_search and the pattern helpers: optimum, trajectory, caching, resume, two ranks."""

import datetime
import itertools
import json
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from indexcache_ops.search import (
    SearchResult,
    greedy_search,
    layers_to_pattern,
    pattern_to_layers,
    uniform_pattern,
)


class Additive:
    """Loss = base + the sum of the cost of every Shared layer: the exact optimum is known."""

    def __init__(self, costs, base=1.0, fail_after=None, failure=KeyboardInterrupt):
        self.costs = costs
        self.base = base
        self.fail_after = fail_after
        self.failure = failure
        self.calls = []

    def __call__(self, pattern):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise self.failure("simulated interruption")
        self.calls.append(pattern)
        return self.base + sum(c for c, kind in zip(self.costs, pattern) if kind == "S")


def random_costs(num_layers, seed):
    rng = random.Random(seed)
    return [rng.random() for _ in range(num_layers)]


def expected_evaluations(num_layers, num_full, frozen=1):
    flippable = num_layers - frozen
    return 1 + sum(flippable - step for step in range(num_layers - num_full))


# ---- pattern helpers -------------------------------------------------------------------------

def test_pattern_conversions_round_trip():
    assert pattern_to_layers("FSSFS") == [0, 3]
    assert layers_to_pattern([3, 0], 5) == "FSSFS"
    for pattern in ["F", "FF", "FSF", "FSSSFSSSFSS"]:
        assert layers_to_pattern(pattern_to_layers(pattern), len(pattern)) == pattern


@pytest.mark.parametrize("pattern", ["", "SFF", "FXS", "fss", ["F", "S"]])
def test_pattern_to_layers_rejects(pattern):
    with pytest.raises(ValueError):
        pattern_to_layers(pattern)


@pytest.mark.parametrize("layers,num_layers,match", [
    ([1, 2], 4, r"expected layer 0 \(always Full\)"),
    ([0, 4], 4, r"expected ids in \[0, 4\)"), ([0, 0], 4, "distinct"),
    ([0, 1.0], 4, "full_layers entry: expected an int"), ([0], 0, "num_layers"),
])
def test_layers_to_pattern_rejects(layers, num_layers, match):
    with pytest.raises(ValueError, match=match):
        layers_to_pattern(layers, num_layers)


def test_uniform_pattern_rule():
    assert uniform_pattern(10, 4) == "FSFSSFSFSS"
    assert uniform_pattern(8, 4) == "FSFSFSFS"
    assert uniform_pattern(5, 5) == "FFFFF"
    assert uniform_pattern(5, 1) == "FSSSS"
    for num_layers in range(1, 40):
        for num_full in range(1, num_layers + 1):
            layers = pattern_to_layers(uniform_pattern(num_layers, num_full))
            assert layers == [i * num_layers // num_full for i in range(num_full)]
            gaps = [b - a for a, b in zip(layers, layers + [num_layers])]
            assert max(gaps) - min(gaps) <= 1


@pytest.mark.parametrize("args", [(4, 0), (4, 5), (0, 1), (4.0, 2), (True, 1)])
def test_uniform_pattern_rejects(args):
    with pytest.raises(ValueError):
        uniform_pattern(*args)


# ---- greedy search ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_layers,num_full", [(8, 2), (10, 3), (9, 9), (7, 1)])
def test_greedy_finds_the_additive_optimum(seed, num_layers, num_full):
    costs = random_costs(num_layers, seed)
    evaluate = Additive(costs)
    result = greedy_search(evaluate, num_layers, num_full, progress=False)
    # Brute force over every pattern with layer 0 Full and num_full Full layers.
    best = min((evaluate(layers_to_pattern((0, *rest), num_layers)), (0, *rest))
               for rest in itertools.combinations(range(1, num_layers), num_full - 1))
    assert result.full_layers == list(best[1])
    assert result.loss == pytest.approx(best[0])
    assert isinstance(result, SearchResult)


def test_trajectory_structure():
    num_layers, num_full = 9, 3
    evaluate = Additive(random_costs(num_layers, 7))
    result = greedy_search(evaluate, num_layers, num_full, progress=False)
    assert result.baseline_loss == evaluate("F" * num_layers)
    assert len(result.steps) == num_layers - num_full
    pattern = "F" * num_layers
    for i, step in enumerate(result.steps):
        assert step.step == i
        # Every still-Full layer but 0 is a candidate, in ascending order, with its own flip's loss.
        assert list(step.candidates) == [l for l in range(1, num_layers) if pattern[l] == "F"]
        for layer, loss in step.candidates.items():
            assert loss == evaluate(pattern[:layer] + "S" + pattern[layer + 1:])
        assert step.loss == min(step.candidates.values()) == step.candidates[step.flipped]
        pattern = pattern[:step.flipped] + "S" + pattern[step.flipped + 1:]
        assert step.pattern == pattern
    assert result.pattern == pattern and pattern.count("F") == num_full
    assert result.loss == result.steps[-1].loss
    json.dumps(__import__("dataclasses").asdict(result))  # the result is JSON-serialisable


def test_ties_and_nan_go_deterministically():
    # Equal losses: the smallest layer flips first, so the last layers stay Full.
    result = greedy_search(lambda p: 1.0, 6, 3, progress=False)
    assert [s.flipped for s in result.steps] == [1, 2, 3]
    assert result.pattern == "FSSSFF"
    # NaN counts as +inf: the diverging layer 1 is flipped last.
    nan_at_1 = greedy_search(lambda p: math.nan if p[1] == "S" else 1.0, 4, 2, progress=False)
    assert nan_at_1.pattern == "FFSS"


def test_layer_zero_never_flips():
    costs = [-100.0] + [1.0] * 5  # flipping layer 0 would be by far the cheapest
    result = greedy_search(Additive(costs), 6, 1, progress=False)
    assert result.pattern == "FSSSSS"
    assert all(0 not in step.candidates for step in result.steps)


@pytest.mark.parametrize("stage_starts", [[0, 4, 8], [4, 8]])
def test_stage_starts_stay_full(stage_starts):
    costs = [0.0] + [1.0] * 11
    costs[4] = costs[8] = -1.0  # the stage starts would be the best flips
    result = greedy_search(Additive(costs), 12, 4, stage_starts=stage_starts, progress=False)
    assert all(result.pattern[l] == "F" for l in (0, 4, 8))
    assert all(not {0, 4, 8} & set(step.candidates) for step in result.steps)
    assert result.pattern.count("F") == 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=6, num_full=0), r"num_full: expected an int >= 1, got 0"),
    (dict(num_layers=6, num_full=7), r"num_full: expected an int in \[1, num_layers=6\]"),
    (dict(num_layers=0, num_full=1), "num_layers: expected an int >= 1"),
    (dict(num_layers=6, num_full=2, stage_starts=[0, 3, 5]), "never flip"),
    (dict(num_layers=6, num_full=3, stage_starts=[3, 2]), "strictly increasing"),
    (dict(num_layers=6, num_full=3, stage_starts=[0, 0]), "strictly increasing"),
    (dict(num_layers=6, num_full=3, stage_starts=[0, 6]), r"layer ids in \[0, 6\)"),
    (dict(num_layers=6, num_full=3, stage_starts=[-1, 2]), r"stage_starts\[0\]: expected an int >= 0"),
    (dict(num_layers=6, num_full=2.5), "num_full: expected an int"),
])
def test_greedy_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        greedy_search(Additive([0.0] * 6), progress=False, **kwargs)


def test_greedy_rejects_bad_evaluate():
    with pytest.raises(TypeError, match="callable"):
        greedy_search("loss", 4, 2)
    with pytest.raises(TypeError, match="must return a float loss"):
        greedy_search(lambda p: "low", 4, 2, progress=False)
    # One-element tensors (a typical loss) are accepted.
    result = greedy_search(lambda p: torch.tensor(p.count("S")), 4, 2, progress=False)
    assert result.pattern == "FSSF"


def test_each_pattern_is_evaluated_once_and_checkpoint_caches(tmp_path):
    path = tmp_path / "new_folder" / "search.json"  # the folder is created
    evaluate = Additive(random_costs(10, 3))
    first = greedy_search(evaluate, 10, 4, checkpoint=path, progress=False)
    assert len(evaluate.calls) == len(set(evaluate.calls)) == expected_evaluations(10, 4)
    saved = json.loads(path.read_text())["evaluations"]
    assert set(saved) == set(evaluate.calls)
    # Same search again: everything comes from the checkpoint.
    again = Additive(evaluate.costs)
    assert greedy_search(again, 10, 4, checkpoint=path, progress=False) == first
    assert again.calls == []
    # A deeper search replays the shared prefix and evaluates only the new steps.
    deeper = Additive(evaluate.costs)
    greedy_search(deeper, 10, 2, checkpoint=path, progress=False)
    assert len(deeper.calls) == expected_evaluations(10, 2) - expected_evaluations(10, 4)


@pytest.mark.parametrize("fail_after", [0, 1, 5, 9, 20, 33])
def test_resume_after_interruption(tmp_path, fail_after):
    costs = random_costs(9, 11)
    reference = greedy_search(Additive(costs), 9, 3, progress=False)
    total = expected_evaluations(9, 3)
    path = str(tmp_path / "search.json")
    interrupted = Additive(costs, fail_after=fail_after)
    with pytest.raises(KeyboardInterrupt):
        greedy_search(interrupted, 9, 3, checkpoint=path, progress=False)
    # Every finished evaluation is on disk, atomically (no temp file left behind).
    assert os.listdir(tmp_path) == (["search.json"] if fail_after else [])
    resumed = Additive(costs)
    assert greedy_search(resumed, 9, 3, checkpoint=path, progress=False) == reference
    assert len(interrupted.calls) + len(resumed.calls) == total
    assert not set(interrupted.calls) & set(resumed.calls)


def test_bad_checkpoints_are_refused(tmp_path):
    path = tmp_path / "search.json"
    greedy_search(Additive([0.0] * 5), 5, 2, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="num_layers=5"):
        greedy_search(Additive([0.0] * 6), 6, 2, checkpoint=path, progress=False)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        greedy_search(Additive([0.0] * 5), 5, 2, checkpoint=path, progress=False)
    path.write_text(json.dumps({"evaluations": {}}))
    with pytest.raises(ValueError, match="not a greedy_search checkpoint"):
        greedy_search(Additive([0.0] * 5), 5, 2, checkpoint=path, progress=False)


def test_progress_goes_to_stderr_only_when_asked(capsys):
    greedy_search(Additive([0.0] * 5), 5, 2, progress=False)
    assert capsys.readouterr().err == ""
    greedy_search(Additive([0.0] * 5), 5, 2, progress=True)
    err = capsys.readouterr().err
    assert "greedy search" in err and "10/10" in err


# ---- two ranks -------------------------------------------------------------------------------

DIST_LAYERS, DIST_FULL = 9, 3


def _dist_worker(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        costs = random_costs(DIST_LAYERS, 5)
        record = {}
        # 1. A plain search: each rank must evaluate exactly its share. Only rank 0's checkpoint
        #    path is used, so rank 1's must never be created.
        fresh = Additive(costs)
        result = greedy_search(fresh, DIST_LAYERS, DIST_FULL, progress=False,
                               checkpoint=os.path.join(out_dir, f"fresh{rank}.json"))
        record["fresh"] = {"pattern": result.pattern, "calls": fresh.calls,
                           "steps": [s.flipped for s in result.steps]}
        # 2. Rank 1 fails on its 4th evaluation: both ranks must raise rather than hang...
        ckpt = os.path.join(out_dir, "resume.json")
        failing = Additive(costs, fail_after=3 if rank == 1 else None, failure=ValueError)
        try:
            greedy_search(failing, DIST_LAYERS, DIST_FULL, checkpoint=ckpt, progress=False)
            record["raised"] = None
        except (RuntimeError, ValueError) as exc:
            record["raised"] = f"{type(exc).__name__}: {exc}"
        # 3. ...and a rerun resumes from what both ranks had evaluated.
        resumed = Additive(costs)
        result = greedy_search(resumed, DIST_LAYERS, DIST_FULL, checkpoint=ckpt, progress=False)
        record["resume"] = {"pattern": result.pattern, "first": failing.calls,
                            "second": resumed.calls}
        # 4. An explicit group holding rank 1 only: there rank 1 is the group's rank 0, so it does
        #    all the work and owns the checkpoint; rank 0 is no member and is refused.
        solo = dist.new_group([1])
        alone = Additive(costs)
        try:
            result = greedy_search(alone, DIST_LAYERS, DIST_FULL, process_group=solo,
                                   checkpoint=os.path.join(out_dir, "solo.json"), progress=False)
            record["solo"] = {"pattern": result.pattern, "calls": len(alone.calls)}
        except ValueError as exc:
            record["solo"] = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_dist_worker, args=(2, str(out_dir / "store"), str(out_dir)), nprocs=2, join=True)
    records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return out_dir, records


def test_two_ranks_split_the_candidates(two_ranks):
    out_dir, records = two_ranks
    reference = greedy_search(Additive(random_costs(DIST_LAYERS, 5)), DIST_LAYERS, DIST_FULL,
                              progress=False)
    for record in records:
        assert record["fresh"]["pattern"] == reference.pattern
        assert record["fresh"]["steps"] == [s.flipped for s in reference.steps]
    # The batches a search evaluates (baseline, then each step's flips in layer order), dealt out
    # round-robin: rank r gets positions r, r + 2, ...
    batches = [["F" * DIST_LAYERS]]
    pattern = batches[0][0]
    for step in reference.steps:
        batches.append([pattern[:l] + "S" + pattern[l + 1:] for l in step.candidates])
        pattern = step.pattern
    for rank, record in enumerate(records):
        assert record["fresh"]["calls"] == [p for batch in batches for p in batch[rank::2]]
    assert (out_dir / "fresh0.json").exists() and not (out_dir / "fresh1.json").exists()
    saved = json.loads((out_dir / "fresh0.json").read_text())["evaluations"]
    assert len(saved) == expected_evaluations(DIST_LAYERS, DIST_FULL)


def test_two_ranks_fail_together_and_resume(two_ranks):
    _, records = two_ranks
    assert records[0]["raised"] == ("RuntimeError: greedy_search: evaluate raised on rank 1: "
                                    "ValueError('simulated interruption')")
    assert records[1]["raised"] == "ValueError: simulated interruption"
    patterns = {record["resume"]["pattern"] for record in records}
    assert patterns == {records[0]["fresh"]["pattern"]}
    # Nothing evaluated before the failure, on either rank, was evaluated again.
    first = [p for r in records for p in r["resume"]["first"]]
    second = [p for r in records for p in r["resume"]["second"]]
    assert not set(first) & set(second)
    assert len(first) + len(second) == expected_evaluations(DIST_LAYERS, DIST_FULL)


def test_explicit_process_group(two_ranks):
    out_dir, records = two_ranks
    assert records[0]["solo"] == "this process is not a member of process_group"
    assert records[1]["solo"] == {"pattern": records[1]["fresh"]["pattern"],
                                  "calls": expected_evaluations(DIST_LAYERS, DIST_FULL)}
    assert (out_dir / "solo.json").exists()
