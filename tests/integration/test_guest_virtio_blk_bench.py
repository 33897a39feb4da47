"""virtio_blk guest's bench mode (what bench/kvm_devices.py times) on KVM: several requests in
flight through the image's I/O threads, completions reaped in batches, the guest either asleep
in hlt until the used-buffer interrupt (EVENT_IDX negotiated) or polling with interrupts off, in
ring 0 or (ring=3, the bench's default) in user mode through lib.c's user_call. Every request
must succeed and every block must hold what some slot wrote."""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.kvm

BS = 64 << 10


@pytest.mark.parametrize("wait, direct, depth, ring", [("irq", "on", 4, 0), ("poll", "off", 3, 0), ("irq", "off", 1, 0),
                                                      ("poll", "on", 8, 3), ("poll", "off", 1, 3)])
def test_bench_write_then_read(vm, guest, disk, wait, direct, depth, ring):
    size = 2 << 20
    img = disk(size, fill=random.randbytes(512))
    total = 3 * size  # wraps around the disk three times: every block is written
    args = ("-drive", f"file={img},id=d0,format=raw,direct={direct}", "-device", "virtio-blk-device,drive=d0,id=blk0")
    v = vm(guest("virtio_blk"), f"exit=halt bench=write bs={BS} total={total} depth={depth} wait={wait} ring={ring}", *args,
           name="w")
    m, _ = v.wait_line(r"^bench: done bytes=(\d+) errors=(\d+)", timeout=300)
    assert m.groups() == (str(total), "0"), v.output
    assert f"wait={wait} ring={ring}" in v.output
    v.command("quit")
    assert v.wait_exit() == 0
    data = open(img, "rb").read()
    fills = {bytes([0x5A + slot]) * BS for slot in range(depth)}
    assert all(data[off:off + BS] in fills for off in range(0, size, BS))

    r = vm(guest("virtio_blk"), f"exit=halt bench=read bs={BS} total={total} depth={depth} wait={wait} ring={ring}", *args,
           name="r")
    m, _ = r.wait_line(r"^bench: done bytes=(\d+) errors=(\d+)", timeout=300)
    assert m.groups() == (str(total), "0"), r.output
    r.command("quit")
    assert r.wait_exit() == 0
