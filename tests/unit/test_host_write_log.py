"""HostWriteLog: the guest pages the VMM's devices may write while a live migration runs."""

from __future__ import annotations

from application.migratable import HostWriteLog
from domain.devices.virtio.queue import used_ring_size
from domain.memory import PAGE_SIZE, GuestMemory


def memory() -> GuestMemory:
    return GuestMemory([(0, bytearray(16 * PAGE_SIZE)), (1 << 20, bytearray(4 * PAGE_SIZE))])


def test_views_handed_out_are_recorded_page_by_page():
    mem = memory()
    log = HostWriteLog(mem)
    mem.view(PAGE_SIZE - 1, 2)[:] = b"ab"  # straddles two pages
    mem.write((1 << 20) + 10, b"x")  # write() goes through view()
    mem.write_u16(9 * PAGE_SIZE, 7)  # so do the scalar writes (used ring indices)
    mem.write_u32(10 * PAGE_SIZE, 7)
    mem.write_u64(11 * PAGE_SIZE, 7)
    mem.read_u64(12 * PAGE_SIZE)  # a read is not a write
    assert log.take() == {0, PAGE_SIZE, 1 << 20, 9 * PAGE_SIZE, 10 * PAGE_SIZE, 11 * PAGE_SIZE}
    assert log.take() == set()  # a round clears what it took
    mem.view(3 * PAGE_SIZE, 0)
    assert log.take() == set()


def test_after_final_every_page_since_the_start_is_returned():
    """A view recorded in one round may be written after that round read the log (its request
    completes later): once the devices are quiesced, every recorded page goes again."""
    mem = memory()
    log = HostWriteLog(mem)
    mem.view(2 * PAGE_SIZE, 8)
    assert log.take() == {2 * PAGE_SIZE}
    mem.view(5 * PAGE_SIZE, 8)
    log.final()
    assert log.take() == {2 * PAGE_SIZE, 5 * PAGE_SIZE}
    # later collections only add what the devices did since
    log.final()
    assert log.take() == set()
    mem.view(7 * PAGE_SIZE, 8)
    assert log.take() == {7 * PAGE_SIZE}


def test_rings_are_found_in_device_state_trees():
    log = HostWriteLog(memory())
    q = {"size": 256, "ready": True, "desc": 0, "avail": 0x1000, "used": 0x2000}
    idle = {"size": 256, "ready": False, "desc": 0, "avail": 0, "used": 0x8000}
    log.add_rings({"status": 15, "device": {"queues": [q, idle], "device": {}}})
    end = 0x2000 + used_ring_size(256) - 1
    assert log.take() == set(range(0x2000, end // PAGE_SIZE * PAGE_SIZE + 1, PAGE_SIZE))


def test_close_stops_the_tracking():
    mem = memory()
    log = HostWriteLog(mem)
    log.close()
    mem.view(0, 8)
    mem.write_u16(PAGE_SIZE, 1)
    assert log.take() == set()


def test_what_the_migration_reads_to_send_is_not_a_host_write():
    """Pages the engine reads to send them must not come back as dirty, or no migration
    converges (every round would resend everything it sent)."""
    mem = memory()
    log = HostWriteLog(mem)
    bytes(mem.read_view(0, 4 * PAGE_SIZE))
    assert log.take() == set()
