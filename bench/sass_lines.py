"""Nsight Compute's stall samples per line of a kernel's own source file.

    python3 -m bench.sass_lines profile1-sass.csv indexcache_ops/_C*.so [--top 40]

The CSV is `ncu --import X.ncu-rep --page source --csv --print-source sass` (bench/device_run.sh
PROFILE writes it); the binary is the one that ran (a .so or a .cubin). Its line table comes
from `nvdisasm -gi` (the build has -lineinfo), which names for each instruction its innermost
line and the kernel-body line it was inlined into; the samples go to the first of these in this
repo's csrc/, so an inlined CUTLASS helper (an mbarrier wait, a wgmma) is charged to the kernel
line that used it: "the producer", "WG0's wait for the next tile", not "barrier.h:424". The
kernel's code is found in the binary by its instruction sequence, which the CSV repeats, so
neither kernel names nor addresses need to match. The lines' text is read from the tree, which
should be the one that built the binary.
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


@dataclass
class Instruction:
    offset: int
    opcode: str
    locations: list[tuple[str, int]]  # innermost first: (file, line), then each inlined-at site


@dataclass
class Profile:
    kernel: str
    opcodes: list[str]
    samples: list[float]
    stalls: list[dict[str, float]] = field(default_factory=list)  # reason -> samples, per row


def opcode_of(sass: str) -> str:
    """The mnemonic of one SASS line, without its predicate and modifiers ("@!P0 BRA ..." -> BRA)."""
    words = sass.replace(";", " ").split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def parse_disasm(text: str) -> dict[str, list[Instruction]]:
    """`nvdisasm -gi -c` output -> {section: instructions in address order}."""
    sections: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    locations: list[tuple[str, int]] = []
    for line in text.splitlines():
        header = re.match(r"\s*\.section\s+(\.text\.[^,\s]+)", line)
        if header:
            current = sections.setdefault(header.group(1)[len(".text."):], [])
            locations = []
            continue
        if "## File" in line:
            locations = [(Path(f).name, int(n)) for f, n in re.findall(r'"([^"]+)", line (\d+)', line)]
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*)", line)
        if ins and current is not None:
            current.append(Instruction(int(ins.group(1), 16), opcode_of(ins.group(2)), locations))
    return sections


def parse_csv(text: str) -> Profile:
    rows = list(csv.reader(io.StringIO(text)))
    kernel = rows[0][1] if rows and len(rows[0]) > 1 else ""
    header = rows[1]
    source, samples = header.index("Source"), header.index(SAMPLES)
    reasons = [(i, h[len("stall_"):]) for i, h in enumerate(header)
               if h.startswith("stall_") and "Not Issued" not in h]
    prof = Profile(kernel, [], [])
    for row in rows[2:]:
        if len(row) <= samples:
            continue
        prof.opcodes.append(opcode_of(row[source]))
        prof.samples.append(float(row[samples] or 0))
        prof.stalls.append({name: float(row[i]) for i, name in reasons if row[i] not in ("", "0")})
    return prof


def match_section(sections: dict[str, list[Instruction]], opcodes: list[str]) -> str:
    """The section whose opcode sequence is the profiled kernel's; raises when none is."""
    for name, code in sections.items():
        if [ins.opcode for ins in code] == opcodes:
            return name
    raise LookupError(f"no kernel of {len(sections)} in the binary has the profiled kernel's "
                      f"{len(opcodes)} instructions: not the binary that ran?")


def attribute(code: list[Instruction], prof: Profile, own_files: set[str]):
    """Samples per source line: the first location in one of `own_files` along each instruction's
    inline chain (else its innermost location). Returns [(line key, samples, {reason: samples})]."""
    totals: dict[tuple[str, int], float] = collections.Counter()
    reasons: dict[tuple[str, int], collections.Counter] = collections.defaultdict(collections.Counter)
    for ins, n, stalls in zip(code, prof.samples, prof.stalls):
        own = [loc for loc in ins.locations if loc[0] in own_files]
        key = own[0] if own else (ins.locations[0] if ins.locations else ("?", 0))
        totals[key] += n
        reasons[key].update(stalls)
    return [(key, n, reasons[key]) for key, n in sorted(totals.items(), key=lambda kv: -kv[1])]


def disassemble(binary: Path) -> str:
    tools = [Path(os.environ["CUDA_HOME"]) / "bin"] if os.environ.get("CUDA_HOME") else []
    tools.append(Path("/usr/local/cuda/bin"))

    def tool(name: str) -> str:
        found = shutil.which(name) or next((str(d / name) for d in tools if (d / name).exists()), None)
        if found is None:
            raise FileNotFoundError(f"{name} is neither on PATH nor in CUDA_HOME/bin")
        return found

    with tempfile.TemporaryDirectory() as tmp:
        cubins = [binary]
        if binary.suffix != ".cubin":
            subprocess.run([tool("cuobjdump"), "-xelf", "all", str(binary.resolve())], cwd=tmp,
                           check=True, capture_output=True)
            cubins = sorted(Path(tmp).glob("*.cubin"))
        return "\n".join(subprocess.run([tool("nvdisasm"), "-gi", "-c", str(c)], check=True,
                                        capture_output=True, text=True).stdout for c in cubins)


def source_line(sources: dict[str, Path], key: tuple[str, int]) -> str:
    if key[0] not in sources:
        return ""
    lines = sources[key[0]].read_text(errors="replace").splitlines()
    return lines[key[1] - 1].strip() if 0 < key[1] <= len(lines) else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("binary", type=Path, help="the .so or .cubin that ran")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent / "csrc",
                        help="the sources whose lines get the samples (default: this repo's csrc)")
    args = parser.parse_args(argv)
    sources = {p.name: p for p in args.src.rglob("*") if p.suffix in (".cu", ".cuh", ".h")}
    prof = parse_csv(args.csv.read_text())
    sections = parse_disasm(disassemble(args.binary))
    code = sections[match_section(sections, prof.opcodes)]
    total = sum(prof.samples) or 1.0
    print(f"{prof.kernel}\n{total:.0f} samples, {len(code)} instructions")
    for key, n, why in attribute(code, prof, set(sources))[:args.top]:
        top = ", ".join(f"{r} {100 * v / total:.1f}" for r, v in why.most_common(3))
        print(f"{100 * n / total:5.1f}%  {key[0]}:{key[1]:<5} [{top}]  {source_line(sources, key)[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
