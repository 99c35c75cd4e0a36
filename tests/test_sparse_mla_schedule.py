"""The warpgroup handoffs of the sparse MLA kernel (csrc/sparse_mla/sparse_mla_sm90.cuh), replayed
in Python under random interleavings: the producer's fills of the two tile buffers (bf16 order and
the FP8 stage / dequantise order), both math warpgroups' S, softmax handoffs and P V, with the
kernel's mbarriers (parity waits, one arrival per warpgroup), named barriers (bar.arrive /
bar.sync generations) and wgmma batches (smem read from issue until the wait that retires them).

Checked for every interleaving: no deadlock; every read (at issue and until retired) sees the
write it is meant to see (the right tile's rows, the right tile's P, the running max after the
right tile, the right tile's valid mask); no write lands on a region a pending wgmma still reads;
no warpgroup arrives twice in one named-barrier generation (with 256 counted threads that would
release the barrier without the other warpgroup). It checks the protocol, not the CUDA code,
which the GPU tests check; a change to the kernel's handoff order must be mirrored here."""

import random

import pytest

MAX_EVEN, MAX_ODD, P_EVEN, P_ODD = "max_even", "max_odd", "p_even_ready", "p_odd_ready"


class Hazard(AssertionError):
    pass


class Machine:
    def __init__(self):
        self.smem = {}                 # region -> tag of its last write
        self.pending = {}              # role -> list of batches, each a list of (region, tag)
        self.mbar = {}                 # name -> completed phases
        self.named = {}                # id -> (generation, set of roles arrived)

    # -- smem --
    def write(self, role, region, tag):
        for other, batches in self.pending.items():
            for batch in batches:
                if any(r == region for r, _ in batch):
                    raise Hazard(f"{role} writes {region}={tag} while {other}'s wgmma reads it")
        self.smem[region] = tag

    def read(self, role, region, want):
        got = self.smem.get(region)
        if got != want:
            raise Hazard(f"{role} reads {region}: {got}, wants {want}")

    # -- wgmma --
    def issue(self, role, reads):
        for region, want in reads:
            self.read(role, region, want)
        self.pending.setdefault(role, []).append(list(reads))

    def retire(self, role, keep):
        batches = self.pending.get(role, [])
        while len(batches) > keep:
            for region, want in batches.pop(0):
                self.read(role, region, want)  # nothing overwrote it while in flight

    # -- mbarriers: one arrival per warpgroup completes a phase; wait(parity) passes once the
    #    phase of that parity has completed (a fresh barrier's "previous" phase 1 counts as done) --
    def mb_done(self, name, parity):
        return self.mbar.get(name, 0) % 2 != parity

    def mb_arrive(self, name):
        self.mbar[name] = self.mbar.get(name, 0) + 1

    # -- named barriers over the two math warpgroups --
    def bar_arrive(self, role, bid):
        gen, arrived = self.named.get(bid, (0, set()))
        if role in arrived:
            raise Hazard(f"{role} arrives twice at {bid} generation {gen}")
        arrived = arrived | {role}
        self.named[bid] = (gen + 1, set()) if len(arrived) == 2 else (gen, arrived)
        return gen

    def bar_passed(self, bid, gen):
        return self.named.get(bid, (0, set()))[0] > gen


def producer(m, n_tiles, fp8):
    n_pairs = (n_tiles + 1) // 2
    order = [(0, 0), (1, 1), (0, 1), (1, 0)]  # (buffer, half) in the order they are freed
    regions = {0: ("h0",), 1: ("h1v", "rope")}

    def fill(pair, b, h, tag):
        if h == b:  # the valid words go with the first half of the buffer its reader frees
            yield ("write", f"valid{b}", ("valid", 2 * pair + b))
            yield ("mb_arrive", f"valid_ready{b}")
        for r in regions[h]:
            yield ("write", f"k{b}{r}", (tag, 2 * pair + b))

    for pair in range(n_pairs):
        free_parity = (pair & 1) ^ 1
        if not fp8:
            for b, h in order:
                yield ("mb_wait", f"freed{b}{h}", free_parity)
                yield from fill(pair, b, h, "kv")
                yield ("mb_arrive", f"ready{b}{h}")
        else:
            def stage(b, h):
                yield ("mb_wait", f"freed{b}{h}", free_parity)
                yield from fill(pair, b, h, "raw")   # raw FP8 bytes staged in the same region

            def dequant(b, h):
                for r in regions[h]:
                    yield ("write", f"k{b}{r}", ("kv", 2 * pair + b))
                yield ("mb_arrive", f"ready{b}{h}")

            for lo, hi in ((0, 1), (2, 3)):
                yield from stage(*order[lo])
                yield from stage(*order[hi])
                yield from dequant(*order[lo])
                yield from dequant(*order[hi])


def kv(b, t):
    return [(f"k{b}h0", ("kv", t)), (f"k{b}h1v", ("kv", t)), (f"k{b}rope", ("kv", t))]


def math_wg0(m, n_tiles):
    n_pairs = (n_tiles + 1) // 2
    if n_pairs:
        yield ("mb_wait", "ready00", 0)
        yield ("issue", kv(0, 0)[:1])
        yield ("mb_wait", "ready01", 0)
        yield ("issue", kv(0, 0)[1:])
        yield ("retire", 0)
    for pair in range(n_pairs):
        even, odd, phase = 2 * pair, 2 * pair + 1, pair & 1
        yield ("mb_wait", "valid_ready0", phase)
        yield ("read", "valid0", ("valid", even))
        yield ("write", "m", ("m", even))
        yield ("bar_arrive", MAX_EVEN)
        yield ("issue", [("k0h0", ("kv", even))])          # own P V, V columns 0-255
        yield ("retire", 0)
        yield ("mb_arrive", "freed00")
        yield ("bar_sync", MAX_ODD)
        yield ("read", "m", ("m", odd))
        yield ("write", "k0rope", ("P", even))             # P of the even tile, RoPE block
        yield ("bar_arrive", P_EVEN)
        yield ("bar_sync", P_ODD)
        yield ("issue", [("p_odd", ("P", odd)), ("k1h0", ("kv", odd))])  # peer P V
        if pair + 1 < n_pairs:
            yield ("mb_wait", "ready00", phase ^ 1)
            yield ("issue", kv(0, even + 2)[:1])
            yield ("retire", 1)
            yield ("mb_arrive", "freed10")
            yield ("mb_wait", "ready01", phase ^ 1)
            yield ("issue", kv(0, even + 2)[1:])
            yield ("retire", 0)
        else:
            yield ("retire", 0)
            yield ("mb_arrive", "freed10")


def math_wg1(m, n_tiles):
    for pair in range((n_tiles + 1) // 2):
        even, odd, phase = 2 * pair, 2 * pair + 1, pair & 1
        yield ("mb_wait", "ready11", phase)
        yield ("issue", kv(1, odd)[1:])
        yield ("mb_wait", "ready10", phase)
        yield ("issue", kv(1, odd)[:1])
        yield ("retire", 0)
        yield ("mb_wait", "valid_ready1", phase)
        yield ("bar_sync", MAX_EVEN)
        yield ("read", "m", ("m", even))
        yield ("read", "valid1", ("valid", odd))
        yield ("write", "m", ("m", odd))
        yield ("bar_arrive", MAX_ODD)
        yield ("issue", [("k1h1v", ("kv", odd))])          # own P V, V columns 256-511
        yield ("write", "p_odd", ("P", odd))
        yield ("bar_sync", P_EVEN)
        yield ("issue", [("k0rope", ("P", even)), ("k0h1v", ("kv", even))])  # peer P V
        yield ("bar_arrive", P_ODD)
        yield ("retire", 1)
        yield ("mb_arrive", "freed11")
        yield ("retire", 0)
        yield ("mb_arrive", "freed01")


def run(n_tiles, fp8, rng):
    m = Machine()
    roles = {"producer": producer(m, n_tiles, fp8), "wg0": math_wg0(m, n_tiles),
             "wg1": math_wg1(m, n_tiles)}
    blocked = {}  # role -> the action it waits on
    steps = 0
    while roles:
        ready = []
        for role in roles:
            act = blocked.get(role)
            if act is None:
                ready.append(role)
            elif act[0] == "mb_wait" and m.mb_done(act[1], act[2]):
                ready.append(role)
            elif act[0] == "bar_wait" and m.bar_passed(act[1], act[2]):
                ready.append(role)
        if not ready:
            raise Hazard(f"deadlock at n_tiles={n_tiles}: {blocked}")
        role = rng.choice(ready)
        if role in blocked:
            del blocked[role]  # its wait is satisfied
        try:
            act = next(roles[role])
        except StopIteration:
            del roles[role]
            continue
        steps += 1
        kind = act[0]
        if kind == "mb_wait":
            blocked[role] = act
        elif kind == "mb_arrive":
            m.mb_arrive(act[1])
        elif kind == "bar_arrive":
            m.bar_arrive(role, act[1])
        elif kind == "bar_sync":
            blocked[role] = ("bar_wait", act[1], m.bar_arrive(role, act[1]))
        elif kind == "write":
            m.write(role, act[1], act[2])
        elif kind == "read":
            m.read(role, act[1], act[2])
        elif kind == "issue":
            m.issue(role, act[1])
        elif kind == "retire":
            m.retire(role, act[1])
    assert not any(m.pending.values()), "a wgmma batch was never retired"
    return steps


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("n_tiles", [0, 1, 2, 3, 4, 7, 8])
def test_handoffs_hold_under_random_interleavings(n_tiles, fp8):
    rng = random.Random(1000 * n_tiles + fp8)
    for _ in range(300):
        run(n_tiles, fp8, rng)


def assert_mutant_caught(role, dropped, n_tiles, seed):
    """Runs with `role` (a generator function of this module) minus the actions `dropped`
    matches; the checker must raise."""
    original = globals()[role]

    def mutant(*args):
        return (act for act in original(*args) if not dropped(act))

    rng = random.Random(seed)
    globals()[role] = mutant
    try:
        with pytest.raises(Hazard):
            for _ in range(300):
                run(n_tiles, False, rng)
    finally:
        globals()[role] = original


def test_the_checker_catches_a_missing_handoff():
    """WG1 reading the running max without waiting for WG0's bar.arrive must be caught."""
    assert_mutant_caught("math_wg1", lambda act: act == ("bar_sync", MAX_EVEN), 4, 7)


def test_the_checker_catches_an_early_refill():
    """A producer that refills buffer 0's second half without waiting for WG1's peer P V to free
    it overwrites P of the even tile (or V) while it is still read."""
    assert_mutant_caught("producer", lambda act: act[:2] == ("mb_wait", "freed01"), 6, 11)
