"""What was built: the version has one source, the build reports itself, and the module shares
the process's C++ runtime."""

import re
from pathlib import Path

import indexcache_ops
from indexcache_ops import _C
from indexcache_ops.version import __version__


def test_build_info_reports_the_build():
    info = indexcache_ops.build_info()
    assert info["version"] == __version__ == indexcache_ops.__version__
    assert info["cuda_archs"] == "sm_90a"
    assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["cutlass_version"])
    assert info["git_sha"]


def _needed_libraries(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object, read directly."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    e_shoff = int.from_bytes(data[0x28:0x30], "little")
    e_shentsize = int.from_bytes(data[0x3A:0x3C], "little")
    e_shnum = int.from_bytes(data[0x3C:0x3E], "little")
    sections = [data[e_shoff + i * e_shentsize: e_shoff + (i + 1) * e_shentsize]
                for i in range(e_shnum)]
    dynamic = next(s for s in sections if int.from_bytes(s[4:8], "little") == 6)  # SHT_DYNAMIC
    strtab = sections[int.from_bytes(dynamic[40:44], "little")]  # sh_link
    str_off = int.from_bytes(strtab[24:32], "little")
    off, size = int.from_bytes(dynamic[24:32], "little"), int.from_bytes(dynamic[32:40], "little")
    names = []
    for entry in range(off, off + size, 16):
        tag = int.from_bytes(data[entry:entry + 8], "little")
        if tag == 1:  # DT_NEEDED
            start = str_off + int.from_bytes(data[entry + 8:entry + 16], "little")
            names.append(data[start:data.index(b"\0", start)].decode())
    return names


def test_extension_links_the_shared_cpp_runtime_and_cuda_runtime():
    # A private static libstdc++ (or cudart) inside _C next to torch's shared ones crashed on
    # the H100 image; the module must depend on the shared libraries instead.
    needed = _needed_libraries(Path(_C.__file__))
    assert any(name.startswith("libstdc++.so") for name in needed), needed
    assert any(name.startswith("libcudart.so") for name in needed), needed
