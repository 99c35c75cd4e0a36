"""The selection protocol of the fused indexer_topk kernel (csrc/indexer/indexer_topk.cu), replayed
step for step in Python and checked against a brute-force top-k: candidate encoding, pool floor,
the cut trigger after every tile, the cut's sampled floor and its radix-select fallback, the
math warps' filtering (order keys only) with a floor several tiles old, both output orders, and the
whole-group schedule. It checks the algorithm (no reachable state overflows a pool or loses a key;
every query group is scored by exactly one CTA), not the CUDA code, which
tests/test_indexer_topk_fused.py checks on the GPU.

Also replayed here, ahead of the kernel (bench/NOTES.md, indexer_topk, session 15's next steps):
groups split across CTAs at any tile, each part selected alone and the parts merged by the CTA
that finishes last, which would take the whole-group schedule's imbalance away."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

TILE, MAX_TOPK = 256, 2048
POOLS = {64: 2 * MAX_TOPK + 1024, 32: MAX_TOPK + 1536}  # entries per query, by head count


def order_key(x: np.float32) -> int:
    """indexcache/numeric.h topk_order_key: NaN < -inf < ... < +inf as unsigned 32-bit."""
    bits = int(np.float32(x).view(np.uint32))
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return 0
    if bits == 0x80000000:
        bits = 0
    return (~bits) & 0xFFFFFFFF if bits & 0x80000000 else bits | 0x80000000


def candidate(score, key: int) -> int:
    return (order_key(score) << 32) | ((~key) & 0xFFFFFFFF)


def select_k(pool: list[int], k: int) -> tuple[list[int], int]:
    """The kernel's select_k on one pool: the k largest entries and the new floor."""
    if len(pool) <= k:
        return pool, None
    prefix = mask = 0
    k_rem = k
    for shift in range(56, -8, -8):
        hist = [0] * 256
        for c in pool:
            if c & mask == prefix:
                hist[(c >> shift) & 255] += 1
        above = 0
        for b in range(255, -1, -1):  # the warp's scan from the top
            if above + hist[b] >= k_rem:
                break
            above += hist[b]
        prefix |= b << shift
        mask |= 255 << shift
        k_rem -= above
        if hist[b] == k_rem:
            break
    kept = [c for c in pool if c & mask >= prefix]
    assert len(kept) == k
    return kept, prefix


def cut(pool: list[int], k: int, exact: bool) -> tuple[list[int], int]:
    """The kernel's cut: inside the loop the sample_rank-th largest of 64 evenly spaced entries,
    kept if it leaves at least k entries and room for a tile, else (and at the group end) the
    radix select. Returns the kept entries in pool order and the new floor."""
    n = len(pool)
    if not exact:
        p = np.float32(k) / np.float32(n)
        rank = int(np.float32(64) * p + np.float32(2.5) * np.sqrt(np.float32(64) * p * (1 - p)) + 1)
        if rank < 60:
            sample = [pool[(i * n) // 64] for i in range(64)]
            threshold = sorted(sample, reverse=True)[rank]
            above = sum(c >= threshold for c in pool)
            if k <= above <= n - TILE:
                return [c for c in pool if c >= threshold], threshold
    kept, prefix = select_k(pool, k)
    kept_in_order = [c for c in pool if c >= prefix]
    assert sorted(kept_in_order) == sorted(kept)
    return kept_in_order, prefix


def group_tiles(end: int, lo: int) -> int:
    """Tiles of a group whose keys start at lo and whose widest window ends at end."""
    return -(-(end - lo) // TILE)


def fused_topk(scores: np.ndarray, begin: int, end: int, k: int, lo: int, pool_size: int,
               lag: int = 0, part: tuple[int, int] | None = None) -> tuple[list[int], list[int]]:
    """One query of a group whose tiles start at key lo (<= begin): its row as sorted=True and as
    sorted=False return it. The math warps filter tile t with the floor the selection had `lag`
    tiles earlier (they read it while the selection runs behind them); any floor a cut has set
    stays safe for the rest of the group, so any lag is. part = (first, last tile + 1): only those
    tiles, as a CTA holding part of a split group selects them."""
    cut_above = pool_size - TILE  # one more tile can append at most TILE entries
    pool, floors = [], [0]
    first, last = part if part is not None else (0, group_tiles(end, lo))
    for t in range(first, last):
        floor = floors[max(0, len(floors) - 1 - lag)]
        for key in range(lo + t * TILE, lo + (t + 1) * TILE):
            if begin <= key < end:
                c = candidate(scores[key], key)
                if c >> 32 >= floor >> 32:  # the math warps test order keys only (ties pass)
                    pool.append(c)
        assert len(pool) <= pool_size, "pool overflow"
        if t + 1 < last and len(pool) > cut_above:
            pool, new_floor = cut(pool, k, exact=False)
            floors.append(new_floor)
        else:
            floors.append(floors[-1])
    if len(pool) > k:
        pool, _ = cut(pool, k, exact=True)
    pad = [-1] * (k - len(pool))
    as_sorted = [(~c) & 0xFFFFFFFF for c in sorted(pool, reverse=True)]
    in_key_order = [(~c) & 0xFFFFFFFF for c in pool]
    return as_sorted + pad, in_key_order + pad


def brute_force(scores: np.ndarray, begin: int, end: int, k: int) -> list[int]:
    keys = sorted(range(begin, end), key=lambda s: (-order_key(scores[s]), s))[:k]
    return keys + [-1] * (k - len(keys))


def rows(kind: str, n: int, rng) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ascending":
        return np.arange(n, dtype=np.float32)
    if kind == "descending":
        return -np.arange(n, dtype=np.float32)
    if kind == "all-equal":
        return np.full(n, 1.5, dtype=np.float32)
    if kind == "few-values":
        return rng.integers(0, 3, n).astype(np.float32)
    if kind == "specials":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.integers(0, n, n // 5)] = np.nan
        x[rng.integers(0, n, n // 5)] = -np.inf
        x[rng.integers(0, n, n // 9)] = np.inf
        x[rng.integers(0, n, n // 9)] = -0.0
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "ascending", "descending", "all-equal", "few-values",
                                  "specials"])
@pytest.mark.parametrize("k", [1, 37, 512, MAX_TOPK])
@pytest.mark.parametrize("heads", [64, 32])
def test_protocol_equals_brute_force(heads, kind, k):
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{k}".encode()))
    n = 9000
    scores = rows(kind, n, rng)
    for begin, end in [(0, n), (17, 5000), (300, 300 + k), (4000, 4001), (5, 5)]:
        lo = begin - begin % 16
        want = brute_force(scores, begin, end, k)
        for lag in (0, 10):
            as_sorted, in_key_order = fused_topk(scores, begin, end, k, lo, POOLS[heads], lag)
            assert as_sorted == want
            assert in_key_order == sorted(i for i in want if i >= 0) + [i for i in want if i < 0]


def whole_item_ranges(tiles: list[int], ctas: int) -> list[tuple[int, int]]:
    """indexer_sm90.cuh balanced_range<kWholeItems = true>: CTA b takes the items whose first tile
    lies in [total b / G, total (b + 1) / G): (first item, tile count) per CTA."""
    starts = np.concatenate([[0], np.cumsum(tiles)[:-1]]).tolist()
    total = sum(tiles)
    ranges = []
    for b in range(ctas):
        t0, t1 = total * b // ctas, total * (b + 1) // ctas
        n0 = sum(1 for s in starts if s < t0)
        a0 = sum(n for s, n in zip(starts, tiles) if s < t0)
        a1 = sum(n for s, n in zip(starts, tiles) if s < t1)
        ranges.append((n0, a1 - a0))
    return ranges


def walk(tiles: list[int], item: int, count: int) -> list[int]:
    """consume_ragged's walk from `item`: the items it scores (non-empty ones) until count tiles."""
    taken = []
    while count > 0:
        if tiles[item] > 0:
            taken.append(item)
            count -= tiles[item]
            assert count >= 0, "a range must end on an item boundary"
        item += 1
    return taken


@pytest.mark.parametrize("seed", range(20))
def test_whole_item_schedule_covers_every_group_once(seed):
    rng = np.random.default_rng(seed)
    items, ctas = int(rng.integers(1, 400)), int(rng.integers(1, 140))
    tiles = rng.integers(0, 20, items) * (rng.random(items) < 0.8)  # some groups have no keys
    tiles = tiles.tolist()
    ranges = whole_item_ranges(tiles, ctas)
    owned = [i for item, count in ranges for i in walk(tiles, item, count)]
    assert sorted(owned) == [i for i, n in enumerate(tiles) if n > 0]
    fair = sum(tiles) / ctas
    assert all(count <= fair + max(tiles) + 1 for _, count in ranges)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6000), k=st.integers(1, MAX_TOPK), heads=st.sampled_from([64, 32]),
       levels=st.integers(1, 50), window=st.tuples(st.floats(0, 1), st.floats(0, 1)),
       lag=st.integers(0, 16), seed=st.integers(0, 2**32 - 1))
def test_protocol_fuzz(n, k, heads, levels, window, lag, seed):
    # Few distinct values (levels) make long runs of ties that only the key bits separate.
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, n).astype(np.float32) * np.float32(0.37)
    begin, end = sorted(int(f * n) for f in window)
    lo = begin - begin % 16
    as_sorted, _ = fused_topk(scores, begin, end, k, lo, POOLS[heads], lag)
    assert as_sorted == brute_force(scores, begin, end, k)


# ---- groups split across CTAs ------------------------------------------------------------------


def merge_parts(scores: np.ndarray, parts: list[list[int]], k: int, pool_size: int) -> list[int]:
    """The CTA that finishes a split group last: every part's selection (keys in key order, as a
    part's sorted=False row has them; the parts in tile order) goes through the pool as staged
    tiles do, at most TILE entries at a time with the same cut trigger, and the group end's exact
    cut. Returns the keys in key order."""
    stream = [candidate(scores[key], key) for keys in parts for key in keys if key >= 0]
    pool = []
    for i in range(0, len(stream), TILE):
        pool.extend(stream[i:i + TILE])
        assert len(pool) <= pool_size, "pool overflow"
        if i + TILE < len(stream) and len(pool) > pool_size - TILE:
            pool, _ = cut(pool, k, exact=False)
    if len(pool) > k:
        pool, _ = cut(pool, k, exact=True)
    return [(~c) & 0xFFFFFFFF for c in pool]


def split_topk(scores: np.ndarray, begin: int, end: int, k: int, lo: int, pool_size: int,
               cuts: list[int], lag: int = 0) -> list[int]:
    """A group cut at tiles `cuts` (sorted, inside the group): each part selected alone, then
    merged. The unsorted row (key order), -1 padded."""
    bounds = [0] + cuts + [group_tiles(end, lo)]
    parts = [fused_topk(scores, begin, end, k, lo, pool_size, lag, (a, b))[1]
             for a, b in zip(bounds, bounds[1:])]
    keys = merge_parts(scores, parts, k, pool_size)
    return keys + [-1] * (k - len(keys))


@pytest.mark.parametrize("kind", ["normal", "ascending", "descending", "all-equal", "specials"])
@pytest.mark.parametrize("k", [1, 300, MAX_TOPK])
@pytest.mark.parametrize("heads", [64, 32])
def test_split_groups_equal_brute_force(heads, kind, k):
    rng = np.random.default_rng(zlib.crc32(f"split-{kind}-{k}-{heads}".encode()))
    n = 9000
    scores = rows(kind, n, rng)
    for begin, end in [(0, n), (17, 5000), (300, 300 + k), (4000, 4301)]:
        lo = begin - begin % 16
        tiles = group_tiles(end, lo)
        want = brute_force(scores, begin, end, k)
        want_key_order = sorted(i for i in want if i >= 0) + [i for i in want if i < 0]
        # A cut after the first tile, in the middle, before the last; two and three parts.
        splits = {(t,) for t in (1, tiles // 2, tiles - 1) if 0 < t < tiles}
        if tiles > 4:
            splits |= {(1, tiles - 1), (1, 2, 3)}
        for cuts in sorted(splits):
            assert split_topk(scores, begin, end, k, lo, POOLS[heads], list(cuts), lag=3) == \
                want_key_order


def split_ranges(tiles: list[int], ctas: int) -> list[list[tuple[int, int, int]]]:
    """indexer_logits' balanced_range (kWholeItems = false): CTA b scores the tiles
    [total b / G, total (b + 1) / G) of all groups' tiles laid end to end. Per CTA its pieces as
    (group, first tile, last tile + 1)."""
    starts = np.concatenate([[0], np.cumsum(tiles)]).tolist()
    total = starts[-1]
    out = []
    for b in range(ctas):
        t0, t1 = total * b // ctas, total * (b + 1) // ctas
        pieces = []
        for g, n in enumerate(tiles):
            a, z = max(t0, starts[g]), min(t1, starts[g] + n)
            if a < z:
                pieces.append((g, a - starts[g], z - starts[g]))
        out.append(pieces)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_split_schedule_balances_and_covers_every_tile_once(seed):
    rng = np.random.default_rng(seed)
    items, ctas = int(rng.integers(1, 400)), int(rng.integers(1, 140))
    tiles = (rng.integers(0, 20, items) * (rng.random(items) < 0.8)).tolist()
    pieces = split_ranges(tiles, ctas)
    for g, n in enumerate(tiles):
        covered = sorted((a, z) for cta in pieces for gg, a, z in cta if gg == g)
        assert [t for a, z in covered for t in range(a, z)] == list(range(n))
    loads = [sum(z - a for _, a, z in cta) for cta in pieces]
    assert max(loads) - min(loads) <= 1
    split = sum(1 for g in range(len(tiles))
                if sum(1 for cta in pieces for gg, _, _ in cta if gg == g) > 1)
    assert split <= ctas - 1  # a split group sits at a boundary between two CTAs' ranges


def test_split_schedule_at_the_headline_shape():
    """S = 4096 queries (2048 groups of 2 at H = 64), N = 65536, causal tail windows, 256-key
    tiles, 132 CTAs: the whole-group schedule's busiest CTA against the split one's."""
    S, N, groups, ctas = 4096, 65536, 2048, 132
    tiles = [-(-(N - S + 2 * g + 2) // TILE) for g in range(groups)]  # the group's longer window
    mean = sum(tiles) / ctas
    whole = max(count for _, count in whole_item_ranges(tiles, ctas))
    split = max(sum(z - a for _, a, z in cta) for cta in split_ranges(tiles, ctas))
    assert whole / mean > 1.05  # +5.8 % (bench/NOTES.md, session 14)
    assert split / mean < 1.001
