"""The warpgroup handoffs of the sparse MLA kernel (csrc/sparse_mla/sparse_mla_sm90.cuh), replayed
in Python under random interleavings: the alternating schedule of prefill (the math warpgroups
take alternate tiles, the producer refills tile halves in the order they are freed) and the serial
schedule of decode (WG0: S, softmax and its P V; WG1: the other P V from P in smem; whole tiles
refilled), the latter with bf16 rows, FP8 rows (staged, then dequantised) and the paired FP8
fill of Hq = 128, where the two CTAs of a cluster each convert half of every tile's rows into
both CTAs' tiles. Modelled: the kernel's mbarriers (parity waits; the arrivals each phase
needs), named barriers (bar.arrive / bar.sync generations) and wgmma batches (smem read from
issue until the wait that retires them).

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

MAX_EVEN, MAX_ODD, P_EVEN, P_ODD = "max_even", "max_odd", "p_even_ready", "p_odd_ready"
P_READY, P_FREE = "p_ready", "p_free"  # the serial schedule's two handoffs
PAIRED_FREED_CTAS = 2  # a paired CTA's tile half is free once both CTAs' readers are done
FREED01_ARRIVALS = 2  # alternating: buffer 0 half 1, WG1's peer P V and WG0's P store into it


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
    """The alternating schedule's fills (prefill, bf16 rows): halves in the order they are freed."""
    assert not fp8, "FP8 rows only come with the decode (serial) schedule"
    order = [(0, 0), (1, 1), (0, 1), (1, 0)]  # (buffer, half) in the order they are freed
    for pair in range((n_tiles + 1) // 2):
        free_parity = (pair & 1) ^ 1
        for b, h in order:
            yield ("mb_wait", cta.at(f"freed{b}{h}"), free_parity)
            if h == b:  # the valid words go with the first half of the buffer its reader frees
                yield ("write", cta.at(f"valid{b}"), ("valid", 2 * pair + b))
                yield ("mb_arrive", cta.at(f"valid_ready{b}"))
            for r in cta.half(b, h):
                yield ("write", r, ("kv", 2 * pair + b))
            yield ("mb_arrive", cta.at(f"ready{b}{h}"))


def producer_serial(m, n_tiles, fp8, cta):
    """The serial schedule's fills (decode): whole tiles, buffer b once both P V of its previous
    tile are done (freed{b}0). FP8: staged, then half 0 dequantised (half 1 is WG1's, once
    `staged` says the bytes landed); paired: this CTA's rows into both CTAs' tiles."""
    own = (cta.c,) if cta.paired else cta.rows

    def claim(tile):
        b = tile & 1
        yield ("mb_wait", cta.at(f"freed{b}0"), ((tile >> 1) & 1) ^ 1)
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


def free(cta, b, h):
    """A reader done with buffer b, half h; paired, the peer's producer writes there too."""
    yield ("mb_arrive", cta.at(f"freed{b}{h}"))
    if cta.paired:
        yield ("mb_arrive_peer", cta.at(f"freed{b}{h}", cta.peer))


def tile_s(cta, b, t, phase):
    """S of tile t in buffer b: each half once it has landed, then retired."""
    for h in (0, 1):
        yield ("mb_wait", cta.at(f"ready{b}{h}"), phase)
        yield ("issue", kv(cta, b, h, t))
    yield ("retire", 0)


def math_wg0(m, n_tiles, cta):
    at = cta.at
    n_pairs = (n_tiles + 1) // 2
    if n_pairs:
        yield from tile_s(cta, 0, 0, 0)
    for pair in range(n_pairs):
        even, odd, phase = 2 * pair, 2 * pair + 1, pair & 1
        yield ("mb_wait", at("valid_ready0"), phase)
        yield ("read", at("valid0"), ("valid", even))
        yield ("write", at("m_from_wg0"), ("m", even))
        yield ("bar_arrive", at(MAX_EVEN))
        yield ("issue", [(r, ("kv", even)) for r in cta.latent(0, 0, cta.rows)])  # own P V
        yield ("retire", 0)
        yield from free(cta, 0, 0)
        yield ("bar_sync", at(MAX_ODD))
        yield ("read", at("m_from_wg1"), ("tile_max", odd))
        yield ("write", at("k0rope"), ("P", even))             # P of the even tile, RoPE block
        yield ("bar_arrive", at(P_EVEN))
        yield from free(cta, 0, 1)  # the refill of that half also waits for the P store
        yield ("bar_sync", at(P_ODD))
        yield ("issue", [(at("p_odd"), ("P", odd))]
               + [(r, ("kv", odd)) for r in cta.latent(1, 0, cta.rows)])  # peer P V
        if pair + 1 < n_pairs:
            yield ("mb_wait", at("ready00"), phase ^ 1)
            yield ("issue", kv(cta, 0, 0, even + 2))
            yield ("retire", 1)
            yield from free(cta, 1, 0)
            yield ("mb_wait", at("ready01"), phase ^ 1)
            yield ("issue", kv(cta, 0, 1, even + 2))
            yield ("retire", 0)
        else:
            yield ("retire", 0)
            yield from free(cta, 1, 0)


def math_wg1(m, n_tiles, cta):
    at = cta.at
    for pair in range((n_tiles + 1) // 2):
        even, odd, phase = 2 * pair, 2 * pair + 1, pair & 1
        yield ("mb_wait", at("ready11"), phase)
        yield ("issue", kv(cta, 1, 1, odd))
        yield ("mb_wait", at("ready10"), phase)
        yield ("issue", kv(cta, 1, 0, odd))
        yield ("retire", 0)
        yield ("mb_wait", at("valid_ready1"), phase)
        yield ("read", at("valid1"), ("valid", odd))
        yield ("write", at("m_from_wg1"), ("tile_max", odd))
        yield ("bar_arrive", at(MAX_ODD))
        yield ("bar_sync", at(MAX_EVEN))
        yield ("read", at("m_from_wg0"), ("m", even))
        yield ("issue", [(r, ("kv", odd)) for r in cta.latent(1, 1, cta.rows)])  # own P V
        yield ("write", at("p_odd"), ("P", odd))
        yield ("bar_sync", at(P_EVEN))
        yield ("issue", [(at("k0rope"), ("P", even))]
               + [(r, ("kv", even)) for r in cta.latent(0, 1, cta.rows)])  # peer P V
        yield ("bar_arrive", at(P_ODD))
        yield ("retire", 1)
        yield from free(cta, 1, 1)
        yield ("retire", 0)
        yield from free(cta, 0, 1)


def math_wg0_serial(m, n_tiles, cta):
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
        yield ("retire", 0)
        yield from free(cta, b, 0)  # before waiting for the next tile
        if t + 1 < n_tiles:
            yield from tile_s(cta, b ^ 1, t + 1, ((t + 1) >> 1) & 1)


def math_wg1_serial(m, n_tiles, cta, fp8):
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
        yield from free(cta, b, 0)
        if t + 1 < n_tiles:
            yield ("bar_sync", at(P_FREE))


FILLS = {  # fill -> (schedule, FP8 rows, paired CTAs), as the kernel instantiates them
    "prefill-bf16": ("alternating", False, False),
    "decode-bf16": ("serial", False, False),
    "decode-fp8": ("serial", True, False),
    "decode-fp8-paired": ("serial", True, True),
}


def run(n_tiles, fill, rng, racecheck_rules=True):
    schedule, fp8, paired = FILLS[fill]
    serial = schedule == "serial"
    ctas = [Cta(c, paired) for c in ((0, 1) if paired else (0,))]
    # A tile half is free once its last reader(s) are done (serial: both warpgroups, freed{b}0
    # for the whole buffer); paired, in both CTAs (128 local threads + 4 remote warps per
    # reader), and ready once both producers delivered their rows (128 local arrivals, one of
    # them expecting the peer's st.async bytes).
    readers = 2 if serial else 1
    need = {"ready": 2 if paired else 1, "freed": readers * (PAIRED_FREED_CTAS if paired else 1)}
    m = Machine({cta.at(f"{kind}{b}{h}"): need[kind] for cta in ctas for kind in need
                 for b in (0, 1) for h in (0, 1)}, racecheck_rules)
    if not serial:
        m.need[ctas[0].at("freed01")] = FREED01_ARRIVALS
    roles = {}
    for cta in ctas:
        roles[cta.at("producer")] = (producer_serial if serial else producer)(m, n_tiles, fp8, cta)
        roles[cta.at("wg0")] = (math_wg0_serial if serial else math_wg0)(m, n_tiles, cta)
        roles[cta.at("wg1")] = (math_wg1_serial(m, n_tiles, cta, fp8) if serial
                                else math_wg1(m, n_tiles, cta))
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


def assert_mutant_caught(mutants, n_tiles, seed, fill="prefill-bf16", error=Hazard):
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
    """WG1 reading the running max without waiting for WG0's bar.arrive must be caught."""
    assert_mutant_caught({"math_wg1": dropping(lambda act: act == ("bar_sync", "0:" + MAX_EVEN))},
                         4, 7)


def test_the_checker_catches_an_early_refill():
    """A producer that refills buffer 0's second half without waiting for WG1's peer P V to free
    it overwrites P of the even tile (or V) while it is still read."""
    assert_mutant_caught({"producer": dropping(lambda act: act[:2] == ("mb_wait", "0:freed01"))},
                         6, 11)


def test_the_checker_catches_an_early_p_overwrite():
    """Serial: WG0 writing P of the next tile without waiting for WG1 to be done with this one
    (bar.arrive instead of its bar.sync, so that WG1 is not left waiting: no deadlock)."""
    assert_mutant_caught({"math_wg0_serial": arriving_at(P_FREE)}, 5, 17, "decode-bf16")


def test_the_checker_catches_a_paired_refill_before_the_peer_read(monkeypatch):
    """Paired: with a free barrier that counts only its own CTA's readers, the other CTA's
    producer writes its rows into this CTA's tile while this CTA's wgmma still reads them."""
    monkeypatch.setattr(__import__(__name__), "PAIRED_FREED_CTAS", 1)
    assert_mutant_caught({"free": dropping(lambda act: act[0] == "mb_arrive_peer")}, 6, 13,
                         "decode-fp8-paired")


@pytest.mark.parametrize("fill", ["decode-bf16", "decode-fp8"])
def test_racecheck_rule_flags_one_sided_serial_handoffs(fill):
    """The serial handoffs as they were until b9464c9, bar.arrive on the writer's side: correct
    (no other check fails), but WG0 rewrote alpha past as many bar.syncs as WG1 had passed when
    it read it, which racecheck reported."""
    assert_mutant_caught({"math_wg0_serial": arriving_at(P_READY),
                          "math_wg1_serial": arriving_at(P_FREE)}, 4, 5, fill,
                         error=RacecheckBlind)


def test_racecheck_rule_flags_the_pair_max_written_after_the_peer_barrier():
    """The alternating schedule until b9464c9: WG1 published the pair max after its bar.sync on
    kMaxEvenReady, which WG0 read past its first bar.sync of the pair, as many as WG1 had: correct,
    and reported by racecheck."""
    def late_publish(acts):
        held = []
        for act in acts:
            if act[:2] == ("write", "0:m_from_wg1") or act == ("bar_arrive", "0:" + MAX_ODD):
                held.append(act)
                continue
            yield act
            if act[:2] == ("read", "0:m_from_wg0"):
                yield from held
                held.clear()

    assert_mutant_caught({"math_wg1": late_publish}, 4, 3, error=RacecheckBlind)


def test_racecheck_rule_flags_a_refill_released_only_through_the_peer(monkeypatch):
    """Until 997cbce only WG1 arrived on buffer 0 half 1's free barrier: the refill waited for
    the P store WG0 made in its RoPE block only through WG1 (kPEvenReady, then WG1's arrival).
    Correct, but racecheck reported every refill against that store."""
    monkeypatch.setattr(__import__(__name__), "FREED01_ARRIVALS", 1)
    assert_mutant_caught({"math_wg0": dropping(lambda act: act == ("mb_arrive", "0:freed01"))},
                         6, 9, error=RacecheckBlind)
