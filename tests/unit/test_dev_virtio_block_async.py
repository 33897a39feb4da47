"""virtio-blk with a threaded backend (``submit``): several requests in flight, completed in any
order, notifications off while anything is in flight, reset/snapshot waiting for them. The
backend's "threads" here are a list of jobs the test runs when and in the order it likes."""

import struct
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.devices.virtio import block as b
from domain.devices.virtio import mmio as r
from domain.devices.virtio.queue import VRING_USED_F_NO_NOTIFY
from tests.unit.virtio_blk_rig import DISK, RAM, BlockRig, MemDisk, notify_fuzzed_queue

HDRS = 0x20000
DATA = 0x30000
STATUSES = 0x2F000
VIRTIO_F_VERSION_1 = 1 << 32


class JobDisk(MemDisk):
    """MemDisk whose submit() parks the job; the test runs the parked jobs itself."""

    def __init__(self, size=DISK, readonly=False):
        super().__init__(size, readonly)
        self.jobs = []
        self.ops = []

    def submit(self, fn, arg):
        self.jobs.append((fn, arg))

    def run(self, i=0):
        fn, arg = self.jobs.pop(i)
        fn(arg)

    def run_all(self):
        while self.jobs:
            self.run()

    def writev(self, offset, bufs):
        self.ops.append(("w", offset))
        return super().writev(offset, bufs)

    def readv(self, offset, bufs):
        self.ops.append(("r", offset))
        return super().readv(offset, bufs)


class Rig(BlockRig):
    def __init__(self, features=None, disk=None, **device_kwargs):
        device_kwargs.setdefault("poll_max", 0)  # the idle poll has its own tests below
        super().__init__(disk or JobDisk(), features, **device_kwargs)

    def post(self, slot, rtype, sector, length=512):
        """Request in slot (own header, data and status); returns its head."""
        hdr, data, status = HDRS + 16 * slot, DATA + 0x1000 * slot, STATUSES + slot
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(status, b"\xff")
        bufs = [(hdr, 16, False)]
        if length:
            bufs.append((data, length, rtype == b.VIRTIO_BLK_T_IN))
        return self.q.add_chain(bufs + [(status, 1, True)])

    def status(self, slot):
        return self.mem.read(STATUSES + slot, 1)[0]

    def used_flags(self):
        return self.mem.read_u16(self.q.used_addr)


def test_a_batch_runs_in_parallel_and_completes_in_any_order():
    rig = Rig()
    for slot in range(3):
        rig.mem.write(DATA + 0x1000 * slot, bytes([0x41 + slot]) * 512)
    heads = [rig.post(slot, b.VIRTIO_BLK_T_OUT, 2 * slot) for slot in range(3)]
    rig.drv.notify(0)
    # The last request ran on the notifying thread; the first two wait on backend threads.
    assert rig.disk.ops == [("w", 4 * 512)] and len(rig.disk.jobs) == 2
    assert rig.q.take_used() == [(heads[2], 1)]
    rig.disk.run(1)
    rig.disk.run(0)
    assert rig.q.take_used() == [(heads[1], 1), (heads[0], 1)]
    assert [rig.status(s) for s in range(3)] == [b.VIRTIO_BLK_S_OK] * 3
    for slot in range(3):
        assert rig.disk.data[2 * slot * 512:(2 * slot + 1) * 512] == bytes([0x41 + slot]) * 512
    assert rig.dev.stats["wr_ops"] == 3


def test_notifications_stay_off_while_requests_are_in_flight():
    rig = Rig(features=VIRTIO_F_VERSION_1 | b.VIRTIO_BLK_F_FLUSH)  # no EVENT_IDX: the flags word
    rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.post(1, b.VIRTIO_BLK_T_IN, 1)
    rig.drv.notify(0)
    assert len(rig.disk.jobs) == 1
    assert rig.used_flags() & VRING_USED_F_NO_NOTIFY
    rig.disk.run_all()
    assert not rig.used_flags() & VRING_USED_F_NO_NOTIFY  # idle: the driver must notify again
    assert len(rig.q.take_used()) == 2


def test_a_completion_takes_requests_posted_without_a_notify():
    rig = Rig()
    h0 = rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    h1 = rig.post(1, b.VIRTIO_BLK_T_IN, 1)
    rig.drv.notify(0)
    h2 = rig.post(2, b.VIRTIO_BLK_T_IN, 2)  # the device asked not to be notified
    rig.disk.run_all()  # h0's completion pops h2 and runs it on the same thread
    assert sorted(rig.q.take_used()) == sorted([(h0, 513), (h1, 513), (h2, 513)])
    assert rig.mem.read(DATA + 0x2000, 512) == bytes(rig.disk.data[1024:1536])


def test_the_notifying_thread_runs_one_request_and_hands_on_the_rest():
    rig = Rig()
    posted = []
    readv = rig.disk.readv

    def guest_posts_meanwhile(offset, bufs):
        if not posted:  # the guest keeps the queue busy while the first request runs
            posted.append(rig.post(1, b.VIRTIO_BLK_T_IN, 1))
        return readv(offset, bufs)

    rig.disk.readv = guest_posts_meanwhile
    h0 = rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.drv.notify(0)  # returns after h0: the shared I/O thread has other devices to serve
    assert rig.q.take_used() == [(h0, 513)]
    assert len(rig.disk.jobs) == 1
    rig.disk.run_all()
    assert rig.q.take_used() == [(posted[0], 513)]


def test_one_interrupt_decision_per_completion_pass():
    rig = Rig(features=VIRTIO_F_VERSION_1)  # no EVENT_IDX, no NO_INTERRUPT: every pass signals
    for slot in range(4):
        rig.post(slot, b.VIRTIO_BLK_T_IN, slot)
    rig.drv.notify(0)
    assert rig.irqs == 1  # the inline request's completion
    rig.disk.run_all()
    assert rig.irqs == 4
    rig.q.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT: a polling driver
    rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.post(1, b.VIRTIO_BLK_T_IN, 1)
    rig.drv.notify(0)
    rig.disk.run_all()
    assert rig.irqs == 4 and len(rig.q.take_used()) == 6


def test_flush_and_errors_through_the_backend_threads():
    rig = Rig()
    rig.post(2, b.VIRTIO_BLK_T_OUT, 0)  # parked
    rig.post(1, b.VIRTIO_BLK_T_IN, DISK // 512)  # out of range: answered at once
    rig.post(0, b.VIRTIO_BLK_T_FLUSH, 0, length=0)  # runs on the notifying thread
    rig.drv.notify(0)
    assert rig.status(1) == b.VIRTIO_BLK_S_IOERR
    rig.disk.fail = True
    rig.disk.run_all()
    assert rig.status(0) == b.VIRTIO_BLK_S_OK and rig.disk.flushes == 1
    assert rig.status(2) == b.VIRTIO_BLK_S_IOERR
    assert len(rig.q.take_used()) == 3 and rig.dev.stats["errors"] == 2


def test_readonly_write_is_ioerr_without_reaching_the_backend():
    rig = Rig(disk=JobDisk(readonly=True))
    rig.post(0, b.VIRTIO_BLK_T_OUT, 0)
    rig.post(1, b.VIRTIO_BLK_T_OUT, 1)
    rig.drv.notify(0)
    assert rig.disk.jobs == [] and rig.disk.ops == []
    assert [rig.status(0), rig.status(1)] == [b.VIRTIO_BLK_S_IOERR] * 2


def test_a_hostile_chain_behind_good_requests_still_lets_them_finish():
    rig = Rig()
    rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.post(1, b.VIRTIO_BLK_T_IN, 1)
    rig.q.add_chain([(RAM - 8, 16, True)])  # outside guest RAM: the queue breaks
    rig.drv.notify(0)
    assert rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    rig.disk.run_all()  # both good requests were handed out before the bad chain; they end
    assert rig.status(0) == rig.status(1) == b.VIRTIO_BLK_S_OK
    rig.dev.quiesce()  # nothing left in flight: returns at once
    rig.drv.write32(r.STATUS, 0)  # the driver resets; the device comes back
    assert rig.drv.read32(r.STATUS) == 0


def test_reset_and_snapshot_wait_for_requests_in_flight():
    rig = Rig()
    rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.post(1, b.VIRTIO_BLK_T_IN, 1)
    rig.drv.notify(0)
    order = []
    saved = {}

    def snapshot_then_reset():
        saved["state"] = rig.t.save_state()
        order.append("snapshot")
        rig.drv.write32(r.STATUS, 0)
        order.append("reset")

    other = threading.Thread(target=snapshot_then_reset)
    other.start()
    other.join(0.2)  # it waits for the parked request
    order.append("io")
    rig.disk.run_all()
    other.join(10)
    assert order == ["io", "snapshot", "reset"]
    queue_state = saved["state"]["device"]["queues"][0]
    assert queue_state["next_avail"] == queue_state["next_used"] == 2


def test_requests_posted_during_a_snapshot_wait_are_taken_afterwards():
    rig = Rig(features=VIRTIO_F_VERSION_1 | b.VIRTIO_BLK_F_FLUSH)  # no EVENT_IDX: the flags word
    h0 = rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    h1 = rig.post(1, b.VIRTIO_BLK_T_IN, 1)
    rig.drv.notify(0)
    fn, arg = rig.disk.jobs.pop()  # h0, parked
    saved = {}
    with rig.dev.lock:  # the snapshot holds the device: h0's completion must wait for it
        job = threading.Thread(target=fn, args=(arg,))
        h2 = rig.post(2, b.VIRTIO_BLK_T_IN, 2)  # no notify: the device asked for none
        job.start()
        saved["state"] = rig.dev.save_state()  # waits for h0, pops nothing new
    job.join(10)
    queue_state = saved["state"]["queues"][0]
    assert queue_state["next_avail"] == queue_state["next_used"] == 2
    assert rig.disk.jobs  # h2 goes to a backend thread once the snapshot let go
    rig.disk.run_all()
    assert sorted(rig.q.take_used()) == sorted([(h0, 513), (h1, 513), (h2, 513)])
    assert not rig.used_flags() & VRING_USED_F_NO_NOTIFY


class StepClock:
    """A clock that moves `step` seconds per reading and runs hooks[n] at its n-th reading (the
    guest acting while the device polls)."""

    def __init__(self, step=1e-6):
        self.t, self.step, self.calls, self.hooks = 0.0, step, 0, {}

    def __call__(self):
        self.calls += 1
        hook = self.hooks.pop(self.calls, None)
        if hook:
            hook()
        self.t += self.step
        return self.t


NO_EVENT_IDX = VIRTIO_F_VERSION_1 | b.VIRTIO_BLK_F_FLUSH  # notifications by the used flags word


def test_an_idle_device_polls_the_ring_before_asking_for_notifications():
    clock = StepClock()
    rig = Rig(features=NO_EVENT_IDX, poll_max=64e-6, clock=clock)
    h0 = rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.drv.notify(0)
    assert rig.q.take_used() == [(h0, 513)]
    # Idle now, but the poll (a backend job) is still to come: notifications stay off.
    assert len(rig.disk.jobs) == 1 and rig.used_flags() & VRING_USED_F_NO_NOTIFY
    posted = []
    clock.hooks[clock.calls + 5] = lambda: posted.append(rig.post(1, b.VIRTIO_BLK_T_IN, 1))  # no notify
    rig.disk.run_all()
    assert rig.q.take_used() == [(posted[0], 513)]  # taken by the poll, no notify needed
    # The poll after it ran out (a miss): the window halves, notifications are back on.
    assert not rig.used_flags() & VRING_USED_F_NO_NOTIFY
    assert rig.dev._poll == 32e-6 and not rig.disk.jobs


def test_missed_polls_close_the_window_and_a_quick_notify_reopens_it():
    clock = StepClock()
    rig = Rig(features=NO_EVENT_IDX, poll_max=64e-6, clock=clock)
    windows = []
    for slot in range(6):
        rig.post(slot % 4, b.VIRTIO_BLK_T_IN, slot)
        clock.t += 1.0  # the guest is slow: the notify comes long after the device went idle
        rig.drv.notify(0)
        rig.disk.run_all()
        windows.append(rig.dev._poll)
    assert windows == [32e-6, 16e-6, 8e-6, 4e-6, 0.0, 0.0]
    assert not rig.used_flags() & VRING_USED_F_NO_NOTIFY  # no poll: notifications on at once
    rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.drv.notify(0)  # soon after the device went idle: a window would have caught it
    assert rig.dev._poll == b.POLL_MIN
    assert len(rig.q.take_used()) == 7


def test_a_hostile_avail_index_seen_by_the_poll_needs_a_reset_and_nothing_hangs():
    clock = StepClock()
    rig = Rig(features=NO_EVENT_IDX, poll_max=64e-6, clock=clock)
    rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.drv.notify(0)
    clock.hooks[clock.calls + 3] = lambda: rig.q.set_avail_idx(rig.q.used_idx() + 100)  # > queue size
    rig.disk.run_all()  # the poll sees "available", the pop refuses the index
    assert rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    assert rig.dev._in_flight == 0  # the poll ended: a reset does not wait for ever
    rig.drv.write32(r.STATUS, 0)
    assert rig.drv.read32(r.STATUS) == 0


def test_pause_ends_a_poll_and_resume_takes_what_came_meanwhile():
    rig = Rig(features=NO_EVENT_IDX, poll_max=30.0)  # a window far longer than the test
    rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    rig.drv.notify(0)
    poll = threading.Thread(target=rig.disk.run_all)
    poll.start()
    rig.dev.pause()  # waits for the poll, which sees the pause and stops
    poll.join(10)
    assert not poll.is_alive()
    h1 = rig.post(1, b.VIRTIO_BLK_T_IN, 1)  # the device is paused: nothing may take it now
    assert rig.q.take_used() != [] and not rig.disk.jobs
    rig.dev.resume()
    assert rig.q.take_used() == [(h1, 513)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(desc=st.binary(min_size=16 * 8, max_size=16 * 8),
       ring=st.lists(st.integers(0, 9), min_size=8, max_size=8),
       avail_idx=st.integers(0, 10),
       header=st.binary(min_size=16, max_size=16),
       order=st.randoms(use_true_random=False))
def test_fuzz_with_requests_in_flight(desc, ring, avail_idx, header, order):
    disk = JobDisk()
    dev, drv, q = notify_fuzzed_queue(disk, desc, ring, avail_idx, header)  # must never raise
    while disk.jobs:
        disk.run(order.randrange(len(disk.jobs)))
    assert dev._in_flight == 0
    dev.quiesce()
    if dev.broken:
        assert drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    else:
        assert q.used_idx() == avail_idx
