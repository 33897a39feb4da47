"""Integration tests on real KVM: the `pystrato` process runs purpose-built guests
(tests/guests). They are marked `kvm` and skip only when /dev/kvm is missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.guests.build import build_guest
from tests.integration.guestvm import GuestVm


@pytest.fixture(autouse=True)
def _needs_kvm(request):
    if "kvm" in request.keywords and not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing")


@pytest.fixture(scope="session")
def guest():
    """guest(name) -> path of the built test guest image (built once per source change)."""
    return build_guest


@pytest.fixture(scope="session")
def linux_guest() -> Path:
    """The Linux guest directory of scripts/build-guest (vmlinux, initramfs, rootfs, cmdline):
    $PYSTRATO_GUEST_DIR (scripts/test exports it) or a build (cached per machine)."""
    env = os.environ.get("PYSTRATO_GUEST_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([str(root / "scripts" / "build-guest")], cwd=root, check=True,
                         stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def vm(tmp_path):
    """vm(kernel, append, *extra_args, mem_mib=128) starts pystrato on KVM; killed at teardown."""
    started: list[GuestVm] = []

    def start(kernel, append="", *extra, mem_mib=128, name="vm"):
        v = GuestVm(tmp_path, kernel, append, *extra, mem_mib=mem_mib, name=name)
        started.append(v)
        return v

    yield start
    for v in started:
        v.close()


@pytest.fixture
def disk(tmp_path):
    """disk(size, fill=b"\\0") -> path of a raw image filled with ``fill`` repeated."""
    def make(size: int = 8 << 20, fill: bytes = b"\0", name: str = "disk.img") -> str:
        p = tmp_path / name
        with open(p, "wb") as f:
            if fill == b"\0":
                f.truncate(size)
            else:
                f.write((fill * (size // len(fill) + 1))[:size])
        return str(p)
    return make
