"""virtio_blk: the guest's own virtio-mmio driver writes patterns, flushes and reads them back;
the patterns are in the host image after `quit`; a readonly=on drive answers writes with
VIRTIO_BLK_S_IOERR (virtio 1.1 §5.2.6) and the image stays as it was."""

from __future__ import annotations

import hashlib
import random

import pytest

pytestmark = pytest.mark.kvm

SECTOR = 512
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR = 0, 1


def pattern(sector: int, count: int, seed: int) -> bytes:
    """What the guest writes: byte i of sector s is (s * 131 + i * 7 + seed) & 0xff."""
    return b"".join(bytes((s * 131 + i * 7 + seed) & 0xFF for i in range(SECTOR))
                    for s in range(sector, sector + count))


@pytest.mark.parametrize("direct", ["off", "on"])
def test_guest_writes_reach_the_image_after_quit(vm, guest, disk, direct):
    img = disk(8 << 20)
    sector, count, seed = 2048 + random.randrange(1024), 300, random.randrange(1, 255)
    v = vm(guest("virtio_blk"), f"exit=halt sector={sector} count={count} seed={seed} chunk=64",
           "-drive", f"file={img},id=d0,format=raw,direct={direct}", "-device", "virtio-blk-device,drive=d0,id=blk0")
    v.wait_line(r"^virtio_blk: done$")
    out = v.output
    assert "capacity=16384" in out and "ro=0" in out, out
    assert f"virtio_blk: write sector={sector} count={count} status={VIRTIO_BLK_S_OK}" in out
    assert f"virtio_blk: flush status={VIRTIO_BLK_S_OK}" in out
    assert f"virtio_blk: read sector={sector} count={count} status={VIRTIO_BLK_S_OK}" in out
    assert "virtio_blk: compare ok" in out
    _, events = v.command("quit")
    assert v.wait_exit() == 0
    data = open(img, "rb").read()
    assert data[sector * SECTOR:(sector + count) * SECTOR] == pattern(sector, count, seed)
    # Nothing else was written.
    assert data[:sector * SECTOR].count(0) == sector * SECTOR
    assert data[(sector + count) * SECTOR:].count(0) == len(data) - (sector + count) * SECTOR


def test_readonly_drive_refuses_writes_with_ioerr(vm, guest, disk):
    img = disk(4 << 20, fill=random.randbytes(4096))
    before = hashlib.sha256(open(img, "rb").read()).hexdigest()
    v = vm(guest("virtio_blk"), "exit=halt ro sector=8 count=16",
           "-drive", f"file={img},id=d0,format=raw,readonly=on", "-device", "virtio-blk-device,drive=d0,id=blk0")
    v.wait_line(r"^virtio_blk: done$")
    out = v.output
    assert "ro=1" in out, out  # VIRTIO_BLK_F_RO offered and negotiated
    assert f"virtio_blk: read sector=8 count=16 status={VIRTIO_BLK_S_OK}" in out
    assert f"virtio_blk: write sector=8 count=1 status={VIRTIO_BLK_S_IOERR}" in out
    assert "virtio_blk: reread status=0 unchanged=yes" in out
    v.command("quit")
    assert v.wait_exit() == 0
    assert hashlib.sha256(open(img, "rb").read()).hexdigest() == before
