"""virtio-blk's native data plane (adapters/storage/native_queue.py, C) against the Python device
model it stands in for, on a real image file.

The reference is the same VirtioBlock over the same image with a backend that offers neither
``native_queue`` nor ``submit``: every request through Python, in ring order. Both see the same
requests, well-formed and not; the image, guest RAM, the used ring, the counts and a broken
queue's reason must come out the same. Hostile rings (fuzzed descriptor tables) must break the
queue exactly where the Python model does, and never make the C loop touch memory outside RAM.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.storage import native_queue
from adapters.storage.block import RawImageOpener
from domain.devices.virtio import block as b
from domain.devices.virtio import mmio as r
from domain.devices.virtio.block import VirtioBlock
from domain.devices.virtio.mmio import VirtioMmioTransport
from domain.devices.virtio.mock import MmioDriver, MockQueue
from domain.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from domain.errors import HostResourceError
from domain.memory import GuestMemory
from domain.ports import SERVE_DECLINE, SERVE_IDLE, SERVE_SIGNAL, SERVE_STOP
from tests.unit.virtio_blk_rig import notify_fuzzed_queue

RAM = 0x40000
QSIZE = 64
SECTORS = 512  # 256 KiB image
HDRS, STATUSES, TABLES, DATA = 0x8000, 0x9000, 0xA000, 0x10000

pytestmark = pytest.mark.skipif(not native_queue.available(), reason="the C module is not built")


class Plain:
    """The image without submit or native_queue: the Python model, every request in order."""

    def __init__(self, img):
        self._img = img
        self.size, self.readonly = img.size, img.readonly

    def readv(self, offset, bufs):
        return self._img.readv(offset, bufs)

    def writev(self, offset, bufs):
        return self._img.writev(offset, bufs)

    def flush(self):
        self._img.flush()

    def close(self):
        self._img.close()


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _image(path, seed: int = 7) -> str:
    with open(path, "wb") as f:
        f.write(bytes((i * 131 + seed) & 0xFF for i in range(256)) * (SECTORS * 2))
    return str(path)


class Rig:
    """A started VirtioBlock on one 64-entry queue over ``path``; native or Python."""

    def __init__(self, path: str, native: bool, *, readonly: bool = False, features=None, poll_max=b.POLL_MAX):
        self.img = RawImageOpener(native=native).open(path, readonly=readonly, direct=False)
        backend = self.img if native else Plain(self.img)
        self.mem = GuestMemory([(0, bytearray(RAM))])
        self.dev = VirtioBlock(self.mem, backend, queue_size=QSIZE, serial="native-test", poll_max=poll_max)
        self.irqs = 0
        self.drv = MmioDriver(VirtioMmioTransport(self.dev, self._irq))
        self.q = MockQueue(self.mem, QSIZE, 0x1000)
        assert self.drv.start([self.q], features) & r.DRIVER_OK
        self.expected = 0  # used entries the driver waits for

    def _irq(self):
        self.irqs += 1

    def wait(self, timeout: float = 10.0) -> None:
        """Until every posted request is used (or the queue broke), then quiesce (a liveness
        bound, not a timing: the requests run on the image's threads)."""
        end = time.monotonic() + timeout
        while self.q.used_idx() != self.expected & 0xFFFF and not self.dev.broken:
            assert time.monotonic() < end, "requests never completed"
            time.sleep(0.001)
        self.dev.quiesce()

    def close(self):
        self.dev.release()
        self.img.close()


# One request: (kind, segment lengths). Each request has its own header, status byte, disk range
# and data buffers, so the two runs cannot differ by completion order.
KINDS = ["in", "out", "in", "out", "flush", "get_id", "oob", "odd", "indirect", "unknown", "zero", "wide_status"]


def post(rig: Rig, slot: int, kind: str, segs: list[int], disk_at: int, publish: bool = True) -> int:
    """Post request ``slot``; returns the sectors its disk range used."""
    mem, q = rig.mem, rig.q
    hdr, status = HDRS + 16 * slot, STATUSES + 16 * slot
    data = DATA + 0x4000 * slot  # room for 3 x 4096
    rtype = {"in": 0, "oob": 0, "odd": 0, "zero": 0, "wide_status": 0, "indirect": 0, "out": 1, "flush": 4,
             "get_id": 8, "unknown": 99}[kind]
    sector = SECTORS - 1 if kind == "oob" else disk_at
    mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    mem.write(status, b"\xee" * 2)
    writable = rtype != 1
    if kind == "odd":
        segs = [700]
    elif kind == "zero":
        segs = [0]
    elif kind in ("flush", "unknown"):
        segs = []
    elif kind == "get_id":
        segs = [32]
    bufs, at = [(hdr, 16, False)], data
    for n in segs:
        mem.write(at, bytes(((at >> 4) + i) & 0xFF for i in range(n)))
        bufs.append((at, n, writable))
        at += n
    bufs.append((status, 2 if kind == "wide_status" else 1, True))
    if kind == "indirect":
        q.add_indirect(bufs, TABLES + 0x100 * slot, publish)
    else:
        q.add_chain(bufs, publish)
    rig.expected += 1 if publish else 0
    return (sum(segs) + 511) // 512 + 1


requests = st.lists(st.tuples(st.sampled_from(KINDS), st.lists(st.sampled_from([512, 1024, 4096]), min_size=1,
                                                                max_size=3)), min_size=1, max_size=10)


def _outcome(rig: Rig, path: str) -> dict:
    used = [rig.q.used_elem(i) for i in range(rig.q.used_idx())]
    return {"broken": rig.dev.broken, "used": sorted(used), "stats": dict(rig.dev.stats),
            "ram": bytes(rig.mem.read(0x4000, RAM - 0x4000)), "image": _read(path)}


def _run_both(tmp_path, script, *, readonly=False, features=None) -> tuple[dict, dict]:
    outs = []
    for native in (True, False):
        path = _image(tmp_path / f"disk-{int(native)}.img")
        rig = Rig(path, native, readonly=readonly, features=features)
        try:
            script(rig)
            rig.wait()
            outs.append(_outcome(rig, path))
        finally:
            rig.close()
    return outs[0], outs[1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(reqs=requests, one_by_one=st.booleans(), readonly=st.booleans())
def test_native_and_python_paths_give_the_same_results(tmp_path, reqs, one_by_one, readonly):
    def script(rig):
        disk_at = 0
        for slot, (kind, segs) in enumerate(reqs):
            disk_at += post(rig, slot, kind, segs, disk_at)
            if one_by_one:
                rig.drv.notify(0)
                rig.wait()
        rig.drv.notify(0)

    native, python = _run_both(tmp_path, script, readonly=readonly)
    assert native == python


def test_plain_reads_and_writes_are_served_natively(tmp_path):
    """The fast shape never reaches the Python parser (the point of the plane)."""
    path = _image(tmp_path / "disk.img")
    rig = Rig(path, True)
    parsed = []
    real_parse = rig.dev._parse
    rig.dev._parse = lambda chain: parsed.append(chain) or real_parse(chain)
    try:
        for slot in range(8):
            post(rig, slot, "out" if slot % 2 else "in", [4096], slot * 16)
        rig.drv.notify(0)
        rig.wait()
        post(rig, 8, "indirect", [512, 1024], 200)  # as Linux posts them: served too
        post(rig, 9, "flush", [], 0)  # declined: the Python model takes it
        rig.drv.notify(0)
        rig.wait()
        assert len(parsed) == 1
        assert rig.dev.stats["rd_ops"] == 5 and rig.dev.stats["wr_ops"] == 4 and rig.dev.stats["flush_ops"] == 1
        assert all(rig.mem.read(STATUSES + 16 * s, 1) == b"\0" for s in range(10))
    finally:
        rig.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(desc=st.binary(min_size=16 * 8, max_size=16 * 8),
       ring=st.lists(st.integers(0, 9), min_size=8, max_size=8),
       avail_idx=st.integers(0, 10),
       header=st.binary(min_size=16, max_size=16))
def test_hostile_rings_break_the_queue_as_the_python_model_does(tmp_path, desc, ring, avail_idx, header):
    outs = []
    for native in (True, False):
        path = _image(tmp_path / f"fuzz-{int(native)}.img")
        img = RawImageOpener(native=native).open(path, readonly=False, direct=False)
        try:
            dev, drv, q = notify_fuzzed_queue(img if native else Plain(img), desc, ring, avail_idx, header)
            end = time.monotonic() + 10
            while not dev.broken and q.used_idx() != avail_idx:
                assert time.monotonic() < end
                time.sleep(0.001)
            dev.quiesce()
            outs.append((dev.broken, bool(drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET), _read(path),
                         None if dev.broken else q.used_idx()))
            dev.release()
        finally:
            img.close()
    assert outs[0] == outs[1]


# --- the plane on its own ------------------------------------------------------------------------

def _plane(tmp_path, readonly=False):
    path = _image(tmp_path / "plane.img")
    img = RawImageOpener().open(path, readonly=readonly, direct=False)
    mem = GuestMemory([(0, bytearray(RAM))])
    q = MockQueue(mem, 32, 0x1000)
    plane = img.native_queue([(reg.gpa, reg.view) for reg in mem.regions])
    assert plane.bind(q.desc_addr, q.avail_addr, q.used_addr, 32)
    return img, mem, q, plane


def test_serve_reports_what_it_wrote_and_stops_before_what_it_declines(tmp_path):
    img, mem, q, plane = _plane(tmp_path)
    try:
        mem.write(HDRS, struct.pack("<IIQ", 0, 0, 2))
        q.add_chain([(HDRS, 16, False), (DATA, 1024, True), (STATUSES, 1, True)])
        mem.write(HDRS + 16, struct.pack("<IIQ", 4, 0, 0))  # flush: not the plane's
        q.add_chain([(HDRS + 16, 16, False), (STATUSES + 1, 1, True)])
        res = plane.serve(0, 0, None, False, 0.0)
        assert res.reason == SERVE_SIGNAL  # no NO_INTERRUPT flag: the driver wants one
        assert (res.next_avail, res.next_used, res.rd_ops, res.rd_bytes) == (1, 1, 1, 1024)
        assert plane.written() == [(DATA, 1024), (STATUSES, 1)]
        assert mem.read(DATA, 1024) == _read(img.path)[1024:2048]
        assert q.used_elem(0) == (0, 1025)
        res = plane.serve(res.next_avail, res.next_used, res.signalled_used, False, 0.0)
        assert res.reason == SERVE_DECLINE and res.next_avail == 1  # left for the Python model
    finally:
        img.close()


def test_serve_follows_event_idx_and_the_no_interrupt_flag(tmp_path):
    img, mem, q, plane = _plane(tmp_path)
    try:
        q.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
        for i in range(3):
            mem.write(HDRS + 16 * i, struct.pack("<IIQ", 1, 0, i))
            q.add_chain([(HDRS + 16 * i, 16, False), (DATA, 512, False), (STATUSES + i, 1, True)])
        res = plane.serve(0, 0, None, False, 0.0)
        assert (res.reason, res.next_used, res.wr_ops) == (SERVE_IDLE, 3, 3)
        # event idx: the driver wants an interrupt once used passes used_event (here 4)
        q.set_used_event(4)
        for i in range(3, 6):
            mem.write(HDRS + 16 * i, struct.pack("<IIQ", 1, 0, i))
            q.add_chain([(HDRS + 16 * i, 16, False), (DATA, 512, False), (STATUSES + i, 1, True)])
        res = plane.serve(3, 3, 3, True, 0.0)
        assert (res.reason, res.next_used) == (SERVE_SIGNAL, 5)
        res = plane.serve(res.next_avail, res.next_used, res.signalled_used, True, 0.0)
        assert (res.reason, res.next_used) == (SERVE_IDLE, 6)
    finally:
        img.close()


def test_a_polling_serve_stops_when_asked(tmp_path):
    img, _, _, plane = _plane(tmp_path)
    try:
        plane.arm()
        out = []
        t = threading.Thread(target=lambda: out.append(plane.serve(0, 0, None, False, 30.0)))
        t.start()
        time.sleep(0.05)
        plane.request_stop()
        t.join(10)  # liveness: a 30 s poll window must end at the stop request
        assert not t.is_alive() and out[0].reason == SERVE_STOP and not out[0].poll_missed
    finally:
        img.close()


def test_serve_refuses_rings_outside_ram(tmp_path):
    img, _, q, plane = _plane(tmp_path)
    try:
        assert not plane.bind(RAM - 8, q.avail_addr, q.used_addr, 32)
        assert not plane.bind(q.desc_addr, q.avail_addr, q.used_addr, 24)  # not a power of 2
        assert not plane.bind(q.desc_addr + 8, q.avail_addr, q.used_addr, 32)  # misaligned
        assert not plane.bind(q.desc_addr, q.avail_addr, RAM - 16, 32)  # used ring runs off RAM
    finally:
        img.close()


# --- the device around it ------------------------------------------------------------------------

def test_pause_stops_a_polling_serve_and_resume_serves_again(tmp_path):
    path = _image(tmp_path / "disk.img")
    rig = Rig(path, True, poll_max=30.0)  # a window far longer than the test
    try:
        post(rig, 0, "in", [512], 0)
        rig.drv.notify(0)
        end = time.monotonic() + 10
        while rig.q.used_idx() != 1:
            assert time.monotonic() < end
            time.sleep(0.001)
        rig.dev.pause()  # must end the 30 s poll now (liveness: it returns at all)
        post(rig, 1, "out", [512], 4)
        rig.drv.notify(0)  # notifications are back on after the poll ended
        time.sleep(0.01)
        assert rig.q.used_idx() == 1  # paused: nothing taken, the notify remembered
        rig.dev.resume()
        rig.wait()
        assert rig.q.used_idx() == 2
    finally:
        rig.close()


@pytest.mark.parametrize("tracking_starts", ["before", "during a serve"])
def test_device_writes_reach_host_write_tracking(tmp_path, tracking_starts):
    """Before: the request goes through the Python model's views, which report themselves.
    During (a migration starting while the C loop runs): the loop's writes are reported after."""
    path = _image(tmp_path / "disk.img")
    rig = Rig(path, True)
    seen, parsed = [], []
    track = lambda: rig.mem.track_host_writes(lambda gpa, n: seen.append((gpa, n)))
    real_parse, real_serve = rig.dev._parse, rig.dev._native.serve
    rig.dev._parse = lambda chain: parsed.append(chain) or real_parse(chain)

    def serve(*args):
        res = real_serve(*args)
        track()
        return res

    if tracking_starts == "before":
        track()
    else:
        rig.dev._native.serve = serve
    try:
        post(rig, 0, "in", [2048], 0)
        rig.drv.notify(0)
        rig.wait()
        assert (DATA, 2048) in seen and (STATUSES, 1) in seen
        assert len(parsed) == (1 if tracking_starts == "before" else 0)
    finally:
        rig.close()


def test_the_plane_is_built_and_used_for_raw_images(tmp_path):
    path = _image(tmp_path / "disk.img")
    rig = Rig(path, True)
    try:
        assert rig.dev._native is not None and rig.dev._native_ready
    finally:
        rig.close()
    img = RawImageOpener(native=False).open(path, readonly=False, direct=False)
    try:
        assert img.native_queue([]) is None
    finally:
        img.close()


def test_direct_images_fall_back_to_the_buffered_fd_for_unaligned_buffers(tmp_path):
    path = _image(tmp_path / "disk.img")
    try:
        img = RawImageOpener().open(path, readonly=False, direct=True)
    except HostResourceError as e:  # tmpfs has no O_DIRECT
        pytest.skip(f"no O_DIRECT here: {e}")
    mem = GuestMemory([(0, bytearray(RAM))])
    try:
        q = MockQueue(mem, 8, 0x1000)
        plane = img.native_queue([(reg.gpa, reg.view) for reg in mem.regions])
        assert plane.bind(q.desc_addr, q.avail_addr, q.used_addr, 8)
        mem.write(HDRS, struct.pack("<IIQ", 0, 0, 0))
        q.add_chain([(HDRS, 16, False), (DATA + 3, 512, True), (STATUSES, 1, True)])  # not aligned
        res = plane.serve(0, 0, None, False, 0.0)
        assert res.rd_ops == 1 and res.errors == 0
        assert mem.read(DATA + 3, 512) == _read(path)[:512]
    finally:
        img.close()
    assert os.path.exists(path)


def test_a_data_buffer_in_the_wrong_direction_is_declined(tmp_path):
    """An OUT whose data buffer is device-writable: the Python model decides what it is."""
    img, mem, q, plane = _plane(tmp_path)
    try:
        mem.write(HDRS, struct.pack("<IIQ", 1, 0, 0))  # OUT with a device-writable data buffer
        q.write_desc(0, HDRS, 16, VIRTQ_DESC_F_NEXT, 1)
        q.write_desc(1, DATA, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
        q.write_desc(2, STATUSES, 1, VIRTQ_DESC_F_WRITE, 0)
        q.publish(0)
        res = plane.serve(0, 0, None, False, 0.0)
        assert res.reason == SERVE_DECLINE and res.next_avail == 0 and res.next_used == 0
    finally:
        img.close()


def test_a_driver_posting_while_the_plane_runs_loses_no_request(tmp_path):
    """A driver thread keeps 4 writes in flight and notifies only when the device asks for it
    (VRING_USED_F_NO_NOTIFY off), as Linux does, while serves start and end on the image's
    threads: every request completes (a lost wakeup would hang here) and lands on disk."""
    from domain.devices.virtio.device import COMMON_FEATURES, VIRTIO_RING_F_EVENT_IDX

    path = _image(tmp_path / "disk.img")
    rig = Rig(path, True, features=(COMMON_FEATURES & ~VIRTIO_RING_F_EVENT_IDX) | b.VIRTIO_BLK_F_FLUSH,
              poll_max=20e-6)
    n, depth = 1000, 4
    mem, q = rig.mem, rig.q
    try:
        end = time.monotonic() + 60
        for i in range(n):
            while i - q.used_idx() >= depth:  # in-order completions; n < 65536
                assert time.monotonic() < end, f"request {i - depth} never completed"
            slot = i % depth
            hdr, status, data = HDRS + 16 * slot, STATUSES + 16 * slot, DATA + 0x1000 * slot
            mem.write(hdr, struct.pack("<IIQ", 1, 0, i % SECTORS))
            mem.write(status, b"\xee")
            mem.write(data, struct.pack("<I", i) * 128)
            q.add_chain([(hdr, 16, False), (data, 512, False), (status, 1, True)])
            rig.expected += 1
            if not mem.read_u16(q.used_addr) & 1:  # VRING_USED_F_NO_NOTIFY
                rig.drv.notify(0)
        rig.wait(60)
        assert rig.dev.stats["wr_ops"] == n and rig.dev.stats["errors"] == 0
        disk = _read(path)
        for sector in range(SECTORS):
            last = max(i for i in range(n) if i % SECTORS == sector)
            assert disk[sector * 512:sector * 512 + 512] == struct.pack("<I", last) * 128
    finally:
        rig.close()


entries = st.lists(st.tuples(st.sampled_from([0x4000, 0x5000, 0x5003, 0x7FF0, 0x8000, 0x9000, (1 << 64) - 8]),
                             st.sampled_from([0, 1, 16, 512, 1024, 0x1000, 0xFFFFFFFF]),
                             st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                              VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 4, 4 | VIRTQ_DESC_F_NEXT]),
                             st.integers(0, 5)), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(table=entries, table_at=st.sampled_from([0x3000, 0x3008, 0x7FF0]), extra=st.integers(-1, 1),
       rtype=st.sampled_from([0, 1, 4, 99]), sector=st.sampled_from([0, 7, 400, 1 << 60]))
def test_hostile_indirect_tables_are_handled_as_the_python_model_does(tmp_path, table, table_at, extra,
                                                                      rtype, sector):
    """Indirect tables (how Linux posts every request) built from plausible and hostile parts:
    misaligned, running off RAM, a length that is not whole descriptors, nested, looping."""
    outs = []
    for native in (True, False):
        path = _image(tmp_path / f"ind-{int(native)}.img")
        img = RawImageOpener(native=native).open(path, readonly=False, direct=False)
        try:
            mem = GuestMemory([(0, bytearray(0x8000))])
            dev = VirtioBlock(mem, img if native else Plain(img), queue_size=8)
            drv = MmioDriver(VirtioMmioTransport(dev, lambda: None))
            q = MockQueue(mem, 8, 0x100)
            drv.start([q])
            mem.write(0x4000, struct.pack("<IIQ", rtype, 0, sector))
            for i, (addr, length, flags, nxt) in enumerate(table):
                if table_at + 16 * i + 16 <= 0x8000:
                    mem.write(table_at + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
            q.write_desc(0, table_at, 16 * len(table) + extra * 8, 4)  # VIRTQ_DESC_F_INDIRECT
            q.publish(0)
            drv.notify(0)
            end = time.monotonic() + 10
            while not dev.broken and q.used_idx() != 1:
                assert time.monotonic() < end
                time.sleep(0.001)
            dev.quiesce()
            outs.append((dev.broken, q.used_idx(), q.used_elem(0), dict(dev.stats), bytes(mem.read(0x4000, 0x4000)),
                         _read(path)))
            dev.release()
        finally:
            img.close()
    assert outs[0] == outs[1]
