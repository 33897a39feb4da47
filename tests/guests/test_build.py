"""The test-guest builder: cached by source content, and every image is one pystrato's Linux
ELF loader accepts (entry at _start, loaded at 1 MiB). No KVM needed, only gcc."""

from __future__ import annotations

import shutil

import pytest

from domain.boot.loader import load_kernel
from domain.memory import GuestMemory
from tests.guests import build


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """The builder working on a copy of the sources, into its own cache dir."""
    src = tmp_path / "src"
    shutil.copytree(build.SRC, src)
    monkeypatch.setattr(build, "SRC", src)
    monkeypatch.setattr(build, "BUILD", tmp_path / "cache")
    return src


def test_an_image_is_built_once_and_reused(sandbox):
    first = build.build_guest("hello")
    mtime = first.stat().st_mtime_ns
    again = build.build_guest("hello")
    assert again == first and again.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temp files left


def test_a_changed_source_or_header_rebuilds(sandbox):
    before = build.build_guest("hello")
    (sandbox / "hello.c").write_text((sandbox / "hello.c").read_text().replace("hello from", "hi from"))
    changed = build.build_guest("hello")
    assert changed != before and b"hi from" in changed.read_bytes()
    (sandbox / "lib.h").write_text((sandbox / "lib.h").read_text() + "\n/* touched */\n")
    assert build.build_guest("hello") != changed


def test_a_compile_error_is_reported_with_gcc_output(sandbox):
    (sandbox / "hello.c").write_text("int main(void) { return undefined_thing; }\n")
    with pytest.raises(build.GuestBuildError, match="undefined_thing"):
        build.build_guest("hello")


def test_unknown_guest_is_refused():
    with pytest.raises(KeyError, match="no test guest 'nope'"):
        build.build_guest("nope")


@pytest.mark.parametrize("name", sorted(build.GUESTS))
def test_every_guest_loads_through_the_linux_elf_path(name):
    image = build.build_guest(name).read_bytes()
    mem = GuestMemory([(0, bytearray(16 << 20))])
    info = load_kernel(mem, image)
    assert not info.is_bzimage
    assert info.load_addr == 0x100000 and info.entry == 0x100000  # _start leads .text
    assert info.kernel_end <= 0x800000  # below the hostile guest's OWNED_END, clear of its canary
    assert mem.read(0x100000, 16) == image[0x1000:0x1010]
