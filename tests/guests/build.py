"""Builds the freestanding test guests (tests/guests/src) with the machine's gcc, cached.

    build_guest("hello") -> Path of an ELF64 image that pystrato boots with -kernel

Each guest is its own C file plus the shared runtime (start.S, lib.c, virtio.c) linked at 1 MiB
(guest.ld). The cache key covers every source, header and linker script, the flags and the
compiler's version, so an image is rebuilt only when one of them changes. Images land in
tests/guests/build/ (gitignored), or in $PYSTRATO_GUEST_BUILD_DIR.

    python -m tests.guests.build [NAME...]     prints the image paths
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"
BUILD = Path(os.environ.get("PYSTRATO_GUEST_BUILD_DIR", Path(__file__).resolve().parent / "build"))

RUNTIME = ("start.S", "lib.c")
GUESTS: dict[str, tuple[str, ...]] = {
    "hello": ("hello.c",),
    "counter": ("counter.c",),
    "pio": ("pio.c",),
    "smp": ("smp.c", "smp_tramp.S"),
    "virtio_blk": ("virtio.c", "virtio_blk.c"),
    "hostile": ("virtio.c", "hostile.c"),
    "rtc": ("rtc.c",),
}

# The AP stacks and count are shared by smp.c and smp_tramp.S.
DEFINES = ("-DAP_MAX=63", "-DAP_STACK_SIZE=16384")
CFLAGS = (
    "-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
    "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none", "-mno-red-zone", "-mgeneral-regs-only", "-mcmodel=small",
)
LDFLAGS = ("-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000",
           "-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments")


class GuestBuildError(RuntimeError):
    """gcc failed, or is missing."""


def _gcc() -> str:
    gcc = os.environ.get("CC", "gcc")
    path = shutil.which(gcc)
    if path is None:
        raise GuestBuildError(f"'{gcc}' not found: the test guests need gcc (scripts/setup installs it)")
    return path


def _compiler_id(gcc: str) -> bytes:
    return subprocess.run([gcc, "--version"], capture_output=True, check=True).stdout.split(b"\n")[0]


def _sources(name: str) -> list[Path]:
    return [SRC / f for f in (*RUNTIME, *GUESTS[name])]


def _key(gcc: str, name: str) -> str:
    h = hashlib.sha256()
    h.update(_compiler_id(gcc))
    h.update(repr((CFLAGS, LDFLAGS, DEFINES, RUNTIME, GUESTS[name])).encode())
    # Every header and the linker script: a guest may include any header.
    for p in sorted({*_sources(name), *SRC.glob("*.h"), SRC / "guest.ld"}):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def build_guest(name: str) -> Path:
    """The ELF image of guest ``name``, built now if its sources changed since the last build."""
    if name not in GUESTS:
        raise KeyError(f"no test guest '{name}' (have: {', '.join(sorted(GUESTS))})")
    gcc = _gcc()
    out = BUILD / f"{name}-{_key(gcc, name)}.elf"
    if out.exists():
        return out
    BUILD.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".elf", dir=BUILD)
    os.close(fd)
    cmd = [gcc, *CFLAGS, *DEFINES, *LDFLAGS, "-T", str(SRC / "guest.ld"), "-I", str(SRC), "-o", tmp,
           *(str(p) for p in _sources(name))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise GuestBuildError(f"building guest '{name}' failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, out)  # atomic: concurrent builders of the same key agree
    return out


def main(argv: list[str]) -> int:
    for name in argv or sorted(GUESTS):
        print(build_guest(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
