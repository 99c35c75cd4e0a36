"""bench/sass_lines.py: Nsight Compute samples joined with a kernel's line table. Synthetic inputs
in the formats of `nvdisasm -gi -c` and `ncu --page source --csv --print-source sass`."""

import pytest

from bench import sass_lines

DISASM = """
\t.section\t.text._Z5otherv,"ax",@progbits
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   EXIT ;
\t.section\t.text._Z6kernelv,"ax",@progbits
\t//## File "/src/csrc/k/kernel.cuh", line 10
        /*0000*/                   LDC R1, c[0x0][0x28] ;
\t//## File "/deps/cutlass/barrier.h", line 424 inlined at "/src/csrc/k/kernel.cuh", line 42
        /*0010*/              @!P0 SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3 ;
        /*0020*/              @!P0 BRA `(.L_x_1) ;
\t//## File "/src/csrc/k/kernel.cuh", line 50
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   EXIT ;
"""

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued '
          'Samples)","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"')


def csv_of(rows):
    lines = ['"Kernel Name","void kernel()",', HEADER]
    lines += [",".join(f'"{v}"' for v in row) for row in rows]
    return "\n".join(lines) + "\n"


PROFILE = csv_of([
    ("0x7f0000", "      LDC R1, c[0x0][0x28]", "2", "2", "0", "2", "0"),
    ("0x7f0010", "@!P0 SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3", "10", "9", "9", "1", "9"),
    ("0x7f0020", "@!P0 BRA `(.L_x_1)", "30", "30", "30", "0", "30"),
    ("0x7f0030", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "5", "0", "0", "5", "0"),
    ("0x7f0040", "EXIT", "0", "0", "0", "0", "0"),
])


def test_opcode_drops_predicate_and_modifiers():
    assert sass_lines.opcode_of("@!P0 BRA `(.L_x_1) ;") == "BRA"
    assert sass_lines.opcode_of("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;") == "HGMMA"
    assert sass_lines.opcode_of("") == ""


def test_samples_go_to_the_kernel_line_that_inlined_the_helper():
    sections = sass_lines.parse_disasm(DISASM)
    assert set(sections) == {"_Z5otherv", "_Z6kernelv"}
    prof = sass_lines.parse_csv(PROFILE)
    assert prof.kernel == "void kernel()" and sum(prof.samples) == 47
    name = sass_lines.match_section(sections, prof.opcodes)
    assert name == "_Z6kernelv"
    rows = sass_lines.attribute(sections[name], prof, {"kernel.cuh"})
    assert [(key, n) for key, n, _ in rows] == [
        (("kernel.cuh", 42), 40.0), (("kernel.cuh", 50), 5.0), (("kernel.cuh", 10), 2.0)]
    assert rows[0][2] == {"long_sb": 39.0, "wait": 1.0}  # not-issued columns are not counted twice
    # Without the kernel's file among the sources, each instruction keeps its innermost line.
    assert sass_lines.attribute(sections[name], prof, set())[0][0] == ("barrier.h", 424)


def test_a_binary_without_the_profiled_kernel_is_refused():
    sections = sass_lines.parse_disasm(DISASM)
    prof = sass_lines.parse_csv(PROFILE)
    with pytest.raises(LookupError, match="not the binary that ran"):
        sass_lines.match_section(sections, prof.opcodes[:-1])
