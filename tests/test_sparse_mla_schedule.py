"""The warpgroup handoffs of the sparse MLA kernel (csrc/sparse_mla/sparse_mla_sm90.cuh), replayed
in Python under random interleavings: WG0 computes S, the softmax and its P V, WG1 the other P V
from P in smem, and the producer refills whole tiles, with bf16 rows (prefill and decode), FP8
rows (staged, then dequantised) and the paired FP8 fill of Hq = 128, where the two CTAs of a
cluster each convert half of every tile's rows into both CTAs' tiles. (Prefill's alternating
schedule, replayed here until session 13, was removed from the kernel.) Modelled: the kernel's
mbarriers (parity waits; the arrivals each phase needs), named barriers (bar.arrive / bar.sync
generations) and wgmma batches (smem read from issue until the wait that retires them).

Checked for every interleaving: no deadlock; every read (at issue and until retired) sees the
write it is meant to see (the right tile's rows, the right tile's P, the running max after the
right tile, the right tile's valid mask); no write lands on a region a pending wgmma still reads;
no warpgroup arrives twice in one named-barrier generation (with 256 counted threads that would
release the barrier without the other warpgroup); and the plain smem accesses are ordered the way
compute-sanitizer racecheck can see (bench/racecheck_probe.cu): between the math warpgroups by
how many bar.syncs each has passed (the second access must come after more than the first), and
a producer refill of smem a math warpgroup wrote by an mbarrier arrival of that warpgroup after
its write, which the producer waited for (wgmma operand reads are outside both rules). It checks
the protocol, not the CUDA code, which the GPU tests check; a change to the kernel's handoff
order must be mirrored here."""

import random

import pytest

P_READY, P_FREE = "p_ready", "p_free"  # the math warpgroups' two handoffs
PAIRED_FREED_CTAS = 2  # a paired CTA's tile buffer is free once both CTAs' readers are done


class Hazard(AssertionError):
    pass


class RacecheckBlind(Hazard):
    """A correct handoff that racecheck would still report."""


def is_math(role):
    return role.endswith(("wg0", "wg1"))


class Machine:
    def __init__(self, need=None, racecheck_rules=True):
        self.racecheck_rules = racecheck_rules  # off: the protocol checks alone
        self.smem = {}                 # region -> tag of its last write
        self.pending = {}              # role -> list of batches, each a list of (region, tag)
        self.mbar = {}                 # name -> arrivals so far
        self.need = need or {}         # name -> arrivals per phase (default 1)
        self.named = {}                # id -> (generation, set of roles arrived)
        self.syncs = {}                # role -> bar.syncs passed
        self.plain = {}                # region -> (last math write, math reads since), each
                                       # access as (role, bar.syncs passed then)
        self.arrivals = {}             # mbarrier -> [(role, that role's arrival ordinal)]
        self.released = {}             # role -> its mbarrier arrivals so far
        self.acquired = {}             # role -> {role: latest arrival of it waited for}
        self.math_write = {}           # region -> (math role, its arrivals before the write)

    # -- smem --
    def write(self, role, region, tag):
        for other, batches in self.pending.items():
            for batch in batches:
                if any(r == region for r, _ in batch):
                    raise Hazard(f"{role} writes {region}={tag} while {other}'s wgmma reads it")
        self.smem[region] = tag
        if is_math(role):
            last_write, reads = self.plain.get(region, (None, []))
            self.racecheck_sees(role, region, [last_write] + reads)
            self.plain[region] = ((role, self.syncs.get(role, 0)), [])
            self.math_write[region] = (role, self.released.get(role, 0))
        elif region in self.math_write:
            writer, before = self.math_write.pop(region)
            if self.racecheck_rules and self.acquired.get(role, {}).get(writer, 0) <= before:
                raise RacecheckBlind(f"{role} refills {region} written by {writer}, which made no "
                                     f"mbarrier arrival since that {role} waited for")

    def read(self, role, region, want, plain=True):
        got = self.smem.get(region)
        if got != want:
            raise Hazard(f"{role} reads {region}: {got}, wants {want}")
        if plain and is_math(role):
            last_write, reads = self.plain.get(region, (None, []))
            self.racecheck_sees(role, region, [last_write])
            reads.append((role, self.syncs.get(role, 0)))
            self.plain[region] = (last_write, reads)

    def racecheck_sees(self, role, region, earlier):
        if not self.racecheck_rules:
            return
        now = self.syncs.get(role, 0)
        for access in earlier:
            if access is not None and access[0] != role and now <= access[1]:
                raise RacecheckBlind(f"{role} (past {now} bar.syncs) accesses {region} after "
                                     f"{access[0]} (past {access[1]}): racecheck reports it")

    # -- wgmma --
    def issue(self, role, reads):
        for region, want in reads:
            self.read(role, region, want, plain=False)
        self.pending.setdefault(role, []).append(list(reads))

    def retire(self, role, keep):
        batches = self.pending.get(role, [])
        while len(batches) > keep:
            for region, want in batches.pop(0):
                self.read(role, region, want, plain=False)  # nothing overwrote it in flight

    # -- mbarriers: `need` arrivals complete a phase (one per warpgroup, per CTA when the two
    #    CTAs of a cluster share it); wait(parity) passes once the phase of that parity has
    #    completed (a fresh barrier's "previous" phase 1 counts as done) --
    def mb_done(self, name, parity):
        return (self.mbar.get(name, 0) // self.need.get(name, 1)) % 2 != parity

    def mb_arrive(self, name, role):
        self.mbar[name] = self.mbar.get(name, 0) + 1
        self.released[role] = self.released.get(role, 0) + 1
        self.arrivals.setdefault(name, []).append((role, self.released[role]))

    def mb_acquire(self, role, name):
        """`role`'s wait on `name` passed: it has seen every arrival of the completed phases."""
        arrivals = self.arrivals.get(name, [])
        need = self.need.get(name, 1)
        seen = self.acquired.setdefault(role, {})
        for other, ordinal in arrivals[:len(arrivals) // need * need]:
            seen[other] = max(seen.get(other, 0), ordinal)

    # -- named barriers over the two math warpgroups of one CTA --
    def bar_arrive(self, role, bid):
        gen, arrived = self.named.get(bid, (0, set()))
        if role in arrived:
            raise Hazard(f"{role} arrives twice at {bid} generation {gen}")
        arrived = arrived | {role}
        self.named[bid] = (gen + 1, set()) if len(arrived) == 2 else (gen, arrived)
        return gen

    def bar_passed(self, bid, gen):
        return self.named.get(bid, (0, set()))[0] > gen


class Cta:
    """Names in CTA `c` of a launch. Paired (FP8, Hq = 128): two CTAs, each converting one half of
    every tile's rows ("rows 0" / "rows 1") into both CTAs' tiles; the RoPE block (and, unpaired,
    everything) is one region of all rows."""

    def __init__(self, c, paired):
        self.c, self.paired = c, paired
        self.peer = 1 - c
        self.rows = (0, 1) if paired else ("all",)

    def at(self, name, cta=None):
        return f"{self.c if cta is None else cta}:{name}"

    def latent(self, b, h, rows, cta=None):
        """Regions of buffer b, half h holding V columns (dims 0-255 / 256-511) of `rows`."""
        return [self.at(f"k{b}{('h0', 'h1v')[h]}/{r}", cta) for r in rows]

    def half(self, b, h):
        """Every region a wgmma of this CTA reads from buffer b, half h."""
        return self.latent(b, h, self.rows) + ([self.at(f"k{b}rope")] if h == 1 else [])


def producer(m, n_tiles, fp8, cta):
    """Whole tiles, buffer b once both P V of its previous tile are done (freed{b}). FP8:
    staged, then half 0 dequantised (half 1 is WG1's, once `staged` says the bytes landed);
    paired: this CTA's rows into both CTAs' tiles."""
    own = (cta.c,) if cta.paired else cta.rows

    def claim(tile):
        b = tile & 1
        yield ("mb_wait", cta.at(f"freed{b}"), ((tile >> 1) & 1) ^ 1)
        yield ("write", cta.at(f"valid{b}"), ("valid", tile))
        yield ("mb_arrive", cta.at(f"valid_ready{b}"))

    if not fp8:
        for tile in range(n_tiles):
            b = tile & 1
            yield from claim(tile)
            for h in (0, 1):
                for r in cta.half(b, h):
                    yield ("write", r, ("kv", tile))
                yield ("mb_arrive", cta.at(f"ready{b}{h}"))
        return

    def stage(tile):
        b = tile & 1
        yield from claim(tile)
        # raw FP8 bytes of this CTA's rows, staged where they become bf16; RoPE: bf16, all rows
        for r in cta.latent(b, 0, own) + cta.latent(b, 1, own) + [cta.at(f"k{b}rope")]:
            yield ("write", r, ("raw", tile))
        yield ("mb_arrive", cta.at(f"staged{b}"))

    for tile in range(n_tiles):
        yield from stage(tile)
        yield from dequant(cta, tile, 0)


def dequant(cta, tile, h):
    """Half h of a staged FP8 tile to bf16: this CTA's rows here (and the RoPE block, which
    landed with the staged bytes) and, paired, into the peer (st.async, counted by its ready)."""
    b, own = tile & 1, ((cta.c,) if cta.paired else cta.rows)
    for r in cta.latent(b, h, own) + ([cta.at(f"k{b}rope")] if h == 1 else []):
        yield ("write", r, ("kv", tile))
    yield ("mb_arrive", cta.at(f"ready{b}{h}"))
    if cta.paired:
        for r in cta.latent(b, h, own, cta.peer):
            yield ("write", r, ("kv", tile))
        yield ("mb_complete_tx", cta.at(f"ready{b}{h}", cta.peer))


def kv(cta, b, h, t):
    return [(r, ("kv", t)) for r in cta.half(b, h)]


def free(cta, b):
    """A reader done with buffer b; paired, the peer's producer writes there too."""
    yield ("mb_arrive", cta.at(f"freed{b}"))
    if cta.paired:
        yield ("mb_arrive_peer", cta.at(f"freed{b}", cta.peer))


def tile_s(cta, b, t, phase, between=()):
    """S of tile t in buffer b: each half once it has landed (`between`: the actions after the
    first half's issue), then retired."""
    for h in (0, 1):
        yield ("mb_wait", cta.at(f"ready{b}{h}"), phase)
        yield ("issue", kv(cta, b, h, t))
        if h == 0:
            yield from between
    yield ("retire", 0)


def math_wg0(m, n_tiles, cta, early_s):
    """early_s (prefill): the next tile's S is queued behind this tile's P V, which is retired
    and its buffer freed between the two halves of that S."""
    at = cta.at
    if n_tiles:
        yield from tile_s(cta, 0, 0, 0)
    for t in range(n_tiles):
        b = t & 1
        yield ("mb_wait", at(f"valid_ready{b}"), (t >> 1) & 1)
        yield ("read", at(f"valid{b}"), ("valid", t))
        if t > 0:
            yield ("bar_sync", at(P_FREE))
        yield ("write", at("p_odd"), ("P", t))
        yield ("write", at("alpha"), ("alpha", t))
        yield ("bar_sync", at(P_READY))
        yield ("issue", [(r, ("kv", t)) for r in cta.latent(b, 0, cta.rows)])  # own P V
        if early_s and t + 1 < n_tiles:
            free_after_pv = [("retire", 1)] + list(free(cta, b))
            yield from tile_s(cta, b ^ 1, t + 1, ((t + 1) >> 1) & 1, free_after_pv)
            continue
        yield ("retire", 0)
        yield from free(cta, b)  # before waiting for the next tile
        if t + 1 < n_tiles:
            yield from tile_s(cta, b ^ 1, t + 1, ((t + 1) >> 1) & 1)


def math_wg1(m, n_tiles, cta, fp8):
    at = cta.at

    def convert(tile):  # FP8: half 1 of the next tile, during the P V of this one
        if fp8:
            yield ("mb_wait", at(f"staged{tile & 1}"), (tile >> 1) & 1)
            yield from dequant(cta, tile, 1)

    if n_tiles:
        yield from convert(0)
    for t in range(n_tiles):
        b = t & 1
        yield ("bar_sync", at(P_READY))
        yield ("read", at("alpha"), ("alpha", t))
        yield ("issue", [(at("p_odd"), ("P", t))]
               + [(r, ("kv", t)) for r in cta.latent(b, 1, cta.rows)])  # P V, columns 256-511
        if t + 1 < n_tiles:
            yield from convert(t + 1)  # while the P V runs
        yield ("retire", 0)
        yield from free(cta, b)
        if t + 1 < n_tiles:
            yield ("bar_sync", at(P_FREE))


FILLS = {  # fill -> (FP8 rows, paired CTAs, next S behind the P V), as the kernel instantiates them
    "prefill": (False, False, True),
    "bf16": (False, False, False),  # bf16 decode
    "fp8": (True, False, False),
    "fp8-paired": (True, True, False),
}


def run(n_tiles, fill, rng, racecheck_rules=True):
    fp8, paired, early_s = FILLS[fill]
    ctas = [Cta(c, paired) for c in ((0, 1) if paired else (0,))]
    # A tile buffer is free once both warpgroups' P V of its tile are done; paired, in both CTAs
    # (128 local threads + 4 remote warps per warpgroup), and a half is ready once both producers
    # delivered their rows (128 local arrivals, one of them expecting the peer's st.async bytes).
    need = {}
    for cta in ctas:
        for b in (0, 1):
            need[cta.at(f"freed{b}")] = 2 * (PAIRED_FREED_CTAS if paired else 1)
            for h in (0, 1):
                need[cta.at(f"ready{b}{h}")] = 2 if paired else 1
    m = Machine(need, racecheck_rules)
    roles = {}
    for cta in ctas:
        roles[cta.at("producer")] = producer(m, n_tiles, fp8, cta)
        roles[cta.at("wg0")] = math_wg0(m, n_tiles, cta, early_s)
        roles[cta.at("wg1")] = math_wg1(m, n_tiles, cta, fp8)
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
        if role in blocked:  # its wait is satisfied
            waited = blocked.pop(role)
            if waited[0] == "bar_wait":
                m.syncs[role] = m.syncs.get(role, 0) + 1
            else:
                m.mb_acquire(role, waited[1])
        try:
            act = next(roles[role])
        except StopIteration:
            del roles[role]
            continue
        steps += 1
        kind = act[0]
        if kind == "mb_wait":
            blocked[role] = act
        elif kind in ("mb_arrive", "mb_arrive_peer", "mb_complete_tx"):
            m.mb_arrive(act[1], role)
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


@pytest.mark.parametrize("fill", list(FILLS))
@pytest.mark.parametrize("n_tiles", [0, 1, 2, 3, 4, 7, 8])
def test_handoffs_hold_under_random_interleavings(n_tiles, fill):
    rng = random.Random(1000 * n_tiles + len(fill))
    for _ in range(300):
        run(n_tiles, fill, rng)


def assert_mutant_caught(mutants, n_tiles, seed, fill="bf16", error=Hazard):
    """Runs with the actions of each role in `mutants` (role: a generator function of this module)
    passed through its mutation; the checker must raise `error`. The racecheck rules apply only
    when `error` is theirs, so that a protocol mutant is caught by the protocol checks."""
    originals = {role: globals()[role] for role in mutants}

    def mutant(original, mutate):
        return lambda *args: mutate(original(*args))

    rng = random.Random(seed)
    globals().update({role: mutant(originals[role], mutate) for role, mutate in mutants.items()})
    try:
        with pytest.raises(error):
            for _ in range(300):
                run(n_tiles, fill, rng, racecheck_rules=issubclass(error, RacecheckBlind))
    finally:
        globals().update(originals)


def dropping(dropped):
    return lambda acts: (act for act in acts if not dropped(act))


def arriving_at(bid):
    """bar.arrive instead of bar.sync at barrier `bid` (of CTA 0)."""
    return lambda acts: (("bar_arrive", act[1]) if act == ("bar_sync", "0:" + bid) else act
                         for act in acts)


def test_the_checker_catches_a_missing_handoff():
    """WG1 reading alpha and P without waiting for WG0's handoff (bar.arrive instead of its
    bar.sync at P_READY) must be caught."""
    assert_mutant_caught({"math_wg1": arriving_at(P_READY)}, 4, 7)


def test_the_checker_catches_an_early_refill():
    """A producer that refills buffer 0 without waiting for both P V of its tile to free it
    overwrites V while it is still read."""
    assert_mutant_caught({"producer": dropping(lambda act: act[:2] == ("mb_wait", "0:freed0"))},
                         6, 11)


def test_the_checker_catches_a_free_before_the_p_v_retires():
    """Prefill: WG0 freeing its buffer between the halves of the next S without first retiring
    its P V (the S batch behind it keeps it pending) lets the producer overwrite V in flight."""
    assert_mutant_caught({"math_wg0": dropping(lambda act: act == ("retire", 1))}, 6, 19,
                         "prefill")


def test_the_checker_catches_an_early_p_overwrite():
    """WG0 writing P of the next tile without waiting for WG1 to be done with this one (bar.arrive
    instead of its bar.sync, so that WG1 is not left waiting: no deadlock)."""
    assert_mutant_caught({"math_wg0": arriving_at(P_FREE)}, 5, 17)


def test_the_checker_catches_a_paired_refill_before_the_peer_read(monkeypatch):
    """Paired: with a free barrier that counts only its own CTA's readers, the other CTA's
    producer writes its rows into this CTA's tile while this CTA's wgmma still reads them."""
    monkeypatch.setattr(__import__(__name__), "PAIRED_FREED_CTAS", 1)
    assert_mutant_caught({"free": dropping(lambda act: act[0] == "mb_arrive_peer")}, 6, 13,
                         "fp8-paired")


@pytest.mark.parametrize("fill", ["bf16", "fp8"])
def test_racecheck_rule_flags_one_sided_handoffs(fill):
    """The handoffs as they were until b9464c9, bar.arrive on the writer's side: correct (no
    other check fails), but WG0 rewrote alpha past as many bar.syncs as WG1 had passed when it
    read it, which racecheck reported."""
    assert_mutant_caught({"math_wg0": arriving_at(P_READY), "math_wg1": arriving_at(P_FREE)},
                         4, 5, fill, error=RacecheckBlind)
