"""Snapshot/restore and live migration of guests running on real KVM (tests/guests).

What "the guest continues" means here: the counter guest zeroes its counter (at ADDR in guest
RAM) and prints its start line once, then only increments the counter. A guest that resumed
where it stopped never prints that line again and its counter never goes back below the value
it had when it was paused; a guest that started over would do both.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.migration_kit import sha256_file
from tests.integration.counter_guest import ADDR, counter, moves_past, pause_and_resume, running_counter

pytestmark = pytest.mark.kvm


def wait_migrate(v, done=("completed", "failed", "cancelled"), timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info, _ = v.command("query-migrate")
        if info["status"] in done:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"migration still {info}")
        time.sleep(0.02)


def source_done(src, timeout: float = 120.0) -> None:
    """Follow the source's query-migrate until it exits (success ends it); a failed or
    cancelled migration (e.g. the destination's verify found different memory) is an error."""
    deadline = time.monotonic() + timeout
    while src.alive():
        try:
            info, _ = src.command("query-migrate")
        except (OSError, EOFError, AssertionError):  # the source closed QMP on its way out
            break
        assert info["status"] in ("setup", "active", "completed"), (info, src.stderr)
        assert time.monotonic() < deadline, f"migration still {info}"
        time.sleep(0.05)
    assert src.wait_exit(30) == 0, src.stderr


def test_snapshot_on_kvm_restores_and_the_counter_continues(vm, guest, tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    src = running_counter(vm, guest, name="src")
    _, events = src.command("stop")
    src.event("STOP", events)
    at_pause = counter(src)
    digest = src.command("x-query-memory-digest")[0]["sha256"]
    assert src.command("migrate", {"uri": f"file:{snap}"})[0] == {}
    assert wait_migrate(src) == {"status": "completed"}
    assert counter(src) == at_pause  # still paused
    src.command("quit")
    assert src.wait_exit() == 0

    # The memory file is guest RAM at the pause (regions back to back): the restored VM maps
    # it, so this is its memory before its vCPUs ran.
    assert sha256_file(str(snap / "memory")) == digest

    dst = vm(guest("counter"), f"addr={ADDR:#x}", "-incoming", f"file:{snap}", name="dst")
    status, _ = dst.command("query-status")
    assert status["status"] == "running"
    first = counter(dst)
    assert first >= at_pause
    moves_past(dst, moves_past(dst, first))
    assert "counter: running" not in dst.output  # not started over
    pause_and_resume(dst)  # the restored guest is an ordinary KVM guest
    dst.command("quit")
    assert dst.wait_exit() == 0


def test_live_migration_kvm_to_kvm_while_the_guest_runs(vm, guest, tmp_path):
    uri = f"unix:{tmp_path}/migrate.sock"
    src = running_counter(vm, guest, name="src")
    log = tmp_path / "dst.log"
    dst = vm(guest("counter"), f"addr={ADDR:#x}", "-incoming", uri, "-D", str(log), name="dst")
    status, _ = dst.command("query-status")
    assert status["status"] == "inmigrate"
    before = counter(src)
    # verify: the destination checks a SHA-256 of guest RAM taken at the source's pause
    # against its own RAM before it lets the vCPUs run.
    assert src.command("migrate", {"uri": uri, "verify": True})[0] == {}
    source_done(src)
    info = wait_migrate(dst)
    assert info == {"status": "completed"}, (info, dst.stderr)
    assert "memory digest verified" in log.read_text()
    status, _ = dst.command("query-status")
    assert status["status"] == "running"
    first = counter(dst)
    assert first > before
    moves_past(dst, moves_past(dst, first))
    assert "counter: running" not in dst.output
    dst.command("quit")
    assert dst.wait_exit() == 0


BLOCK = 64 << 10
BENCH_DEPTH = 4


def test_virtio_blk_guest_migrated_mid_io_keeps_its_data(vm, guest, disk, tmp_path):
    """The virtio_blk guest's own driver keeps BENCH_DEPTH 64 KiB writes in flight over the
    whole disk, again and again (each slot's buffer holds the byte 0x5a + slot). It is
    migrated while it writes: the destination must complete every request the source had
    not (a lost one stalls the guest: "device stopped answering"), and the image must end up
    with every block written whole."""
    img = disk(16 << 20)
    blocks = (16 << 20) // BLOCK
    total = 32 * blocks * BLOCK  # every block 32 times: far longer than the migration
    append = f"exit=halt bench=write bs={BLOCK} depth={BENCH_DEPTH} total={total}"
    drive = ["-drive", f"file={img},id=d0,format=raw", "-device", "virtio-blk-device,drive=d0,id=blk0"]
    uri = f"unix:{tmp_path}/migrate.sock"
    src = vm(guest("virtio_blk"), append, *drive, name="src")
    src.wait_line(r"^bench: start op=write")
    dst = vm(guest("virtio_blk"), append, *drive, "-incoming", uri, name="dst")
    dst.qmp()
    assert src.command("migrate", {"uri": uri, "verify": True})[0] == {}
    source_done(src)
    # The source stopped mid-I/O: it had not finished the writes.
    assert "bench: done" not in src.output
    m, _ = dst.wait_line(r"^bench: (done bytes=\d+ errors=\d+|device stopped answering.*)", timeout=300)
    assert m.group(1).startswith(f"done bytes={total} errors=0"), (m.group(0), dst.stderr)
    assert "bench: start" not in dst.output  # it went on, not over
    assert wait_migrate(dst) == {"status": "completed"}
    dst.command("quit")
    assert dst.wait_exit() == 0
    data = open(img, "rb").read()
    for b in range(blocks):
        chunk = data[b * BLOCK:(b + 1) * BLOCK]
        assert chunk == bytes([chunk[0]]) * BLOCK and 0x5A <= chunk[0] < 0x5A + BENCH_DEPTH, \
            f"block {b} is not one whole write"
