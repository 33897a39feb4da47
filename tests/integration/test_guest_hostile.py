"""hostile: a guest driver that posts bad descriptors and pokes unassigned MMIO/PIO.

The VMM must survive (the process lives, QMP answers), must not write any guest RAM outside
the driver's own pages (a canary above them and at the top of RAM, zeros in between: checked
byte for byte through pmemsave, and against the memory digest), must not touch the image, and
each bad request must end as the virtio spec says: DEVICE_NEEDS_RESET (virtio 1.1 §2.1.2) for a
broken queue, an error status byte for a malformed request; after a reset the device works."""

from __future__ import annotations

import hashlib
import re
import struct

import pytest

pytestmark = pytest.mark.kvm

MIB = 1 << 20
NEEDS_RESET = 0x40
IOERR, UNSUPP = 1, 2

# What the virtio spec (and QEMU/Firecracker practice) asks of the device, case by case.
EXPECTED = {
    # Buffers outside RAM, overlapping MMIO, wrapping, oversized: the queue is unusable.
    "past_ram_end": "needs_reset",
    "straddles_ram_end": "needs_reset",
    "in_mmio_window": "needs_reset",
    "in_lapic": "needs_reset",
    "addr_wraps": "needs_reset",
    "len_overflow": "needs_reset",
    # Chains: loops, indexes beyond the table, a bad head, an avail index that jumps.
    "chain_loop": "needs_reset",
    "self_loop": "needs_reset",
    "next_out_of_range": "needs_reset",
    "head_out_of_range": "needs_reset",
    "avail_idx_jump": "needs_reset",
    # Indirect tables of bad size or place, nested, looping.
    "indirect_len_zero": "needs_reset",
    "indirect_len_unaligned": "needs_reset",
    "indirect_too_big": "needs_reset",
    "indirect_outside_ram": "needs_reset",
    "indirect_with_next": "needs_reset",
    "indirect_in_indirect": "needs_reset",
    "indirect_loop": "needs_reset",
    # Queues the device cannot map: refused when the driver sets DRIVER_OK.
    "ring_outside_ram": "needs_reset",
    "ring_above_4g": "needs_reset",
    "ring_misaligned": "needs_reset",
    "queue_size_not_pow2": "needs_reset",
    "queue_size_too_big": "needs_reset",
    # Well-formed chains carrying a bad request: an error status (virtio 1.1 §5.2.6).
    # ("status", byte, used length): only the status byte is written back.
    "len_sum_wraps": ("status", IOERR, 1),  # 4 GiB + 512 of buffers: not a one-sector read
    "short_header": ("status", IOERR, 1),
    "read_past_end": ("status", IOERR, 1),
    "read_straddles_end": ("status", IOERR, 1),
    "sector_overflow": ("status", IOERR, 1),
    "write_partial_sector": ("status", IOERR, 1),
    "unknown_type": ("status", UNSUPP, 1),
    # No device-writable byte to put a status in: completed with nothing written.
    "no_status_byte": "used_len_0",
    "readable_after_writable": "used_len_0",
    # Register abuse (odd sizes, frozen queue registers, notify of a missing queue) is ignored.
    "register_abuse": ("status", 0, 513),  # then a good one-sector read
}


def _canary(start: int, end: int, key: int) -> bytes:
    return b"".join(struct.pack("<Q", page ^ key) * 512 for page in range(start, end, 4096))


def test_hostile_driver_cannot_hurt_the_vmm_or_memory_outside_its_pages(vm, guest, disk):
    img = disk(8 * MIB, fill=b"\xa5")  # a wrong read into guest RAM would leave 0xa5 there
    v = vm(guest("hostile"), "exit=halt",
           "-drive", f"file={img},id=d0,format=raw,direct=off", "-device", "virtio-blk-device,drive=d0,id=blk0")
    ready, _ = v.wait_line(r"^hostile: ready owned_end=(0x\w+) canary_size=(0x\w+) ram_end=(0x\w+) "
                           r"canary_key=(0x\w+)")
    owned_end, canary, ram_end, key = (int(x, 16) for x in ready.groups())
    assert ram_end == 128 * MIB
    done, _ = v.wait_line(r"^hostile: done cases=(\d+) failed_recoveries=(\d+)$", timeout=240)
    out = v.output

    # The VMM is alive and answering.
    assert v.alive()
    status, _ = v.command("query-status")
    assert status["status"] == "running"
    assert "Traceback" not in v.stderr, v.stderr

    # Each case ended as the spec says, and the device worked again after a reset.
    results = dict(re.findall(r"^hostile: case (\w+) result=(.*)$", out, re.M))
    recovered = dict(re.findall(r"^hostile: case (\w+) recovered=(\w+)$", out, re.M))
    assert set(results) == set(EXPECTED), out
    assert int(done.group(1)) == len(EXPECTED)
    for name, want in EXPECTED.items():
        got = results[name]
        if want == "needs_reset":
            m = re.match(r"needs_reset status=0x(\w+)$", got)
            assert m and int(m.group(1), 16) & NEEDS_RESET, f"{name}: {got}"
        elif want == "used_len_0":
            assert re.match(r"done blk_status=255 used_len=0 ", got), f"{name}: {got}"
        else:
            m = re.match(r"done blk_status=(\d+) used_len=(\d+) ", got)
            assert m and (int(m.group(1)), int(m.group(2))) == want[1:], f"{name}: {got}"
        assert recovered[name] == "yes", f"{name}: the device did not work after a reset"
    assert done.group(2) == "0"

    # Unassigned MMIO and port I/O read as all-ones, at every size.
    pokes = re.findall(r"^hostile: unassigned (?:mmio addr|pio port)=0x\w+ size=(\d) value=0x(\w+)$", out, re.M)
    assert len(pokes) == 4 * 4 + 3 * 3
    for size, value in pokes:
        assert int(value, 16) == (1 << (8 * int(size))) - 1, (size, value)

    # Guest RAM outside the driver's pages is exactly what the driver left there.
    v.command("stop")
    ram = v.pmem(0, ram_end)
    digest, _ = v.command("x-query-memory-digest")
    assert digest["sha256"] == hashlib.sha256(ram).hexdigest()
    assert ram[owned_end:owned_end + canary] == _canary(owned_end, owned_end + canary, key)
    assert ram[ram_end - canary:] == _canary(ram_end - canary, ram_end, key)
    middle = ram[owned_end + canary:ram_end - canary]
    assert middle.count(0) == len(middle), "the device wrote guest RAM the driver never gave it"

    # The image was only ever read.
    assert open(img, "rb").read() == b"\xa5" * (8 * MIB)
    v.command("cont")
    v.command("quit")
    assert v.wait_exit() == 0
