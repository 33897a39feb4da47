"""virtio-blk (virtio 1.1 §5.2): one request queue, 512-byte sectors, data moved by the backend's
readv/writev straight into/out of guest memory views.

A request is a readable 16-byte header (type, reserved, sector), data buffers, and a writable
status byte at the very end. Malformed requests complete with an error status (or, without room
for a status byte, with used length 0); only broken queues make the device need a reset.

Requests in flight: ring work (pop, parse, used ring, interrupt) happens under the device lock;
data I/O happens outside it. A backend with ``submit(fn, arg)`` runs ``fn(arg)`` on one of its
own threads (QEMU's aio=threads): every request popped in one go but the last goes there, the
last one runs on the calling thread, so a lone request costs no thread hand-off and a batch
overlaps in the host kernel. Requests complete in whatever order they finish (virtio allows it).
The thread that completes a request looks for new ones; notifications stay off while anything
is in flight (a completion will look at the ring anyway) and, when the device goes idle, for a
short poll window more (QEMU's iothreads poll the same way, poll-max-ns): a driver that posts
its next request within it costs neither a notify exit nor a thread wake-up. Only then are
they switched back on, with a re-check. The window adapts: it halves after a miss and grows
again when a notify comes soon after the device went idle. Reset, release and snapshot wait
for the requests in flight (and a poll) first (``quiesce``); a paused device (``pause``) pops
nothing, and a completion or notify that would have looked at the ring marks it for
``resume``. Without ``submit`` every request runs under the lock, in order.

A backend with ``native_queue(regions)`` gives a BlockDataPlane: plain reads and writes served in
native code (the Python path per request costs as much as a 64 KiB copy from the host page
cache). The model hands it the ring whenever nothing else is in flight and takes the queue
state back when it returns; it declines, before popping, every request it does not serve, and
this model pops that one. While it runs, nothing here pops; a quiesce asks it to stop; the ranges
it wrote are reported to GuestMemory's host-write tracking, and while that tracking is on (a
live migration) requests go through the views here instead.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Callable

from domain.devices.virtio import iov
from domain.devices.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice
from domain.devices.virtio.queue import DescriptorChain
from domain.errors import VmmError
from domain.memory import GuestMemory
from domain.ports import SERVE_DECLINE, SERVE_IDLE, SERVE_SIGNAL, BlockBackend

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
QUEUE_SIZE = 256
SIZE_MAX = 1 << 20  # largest single data segment we advertise
POLL_MAX = 64e-6  # longest idle poll (s); QEMU's iothread default is 32 us, this host's exits cost more
POLL_MIN = 4e-6  # below this a window is not worth starting: polling stops until a notify comes soon
_POLL = object()  # _collect's answer "idle, notifications still off: poll the ring a while"
_NATIVE = object()  # _collect's answer "let the native data plane serve the ring"


class VirtioBlock(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK

    def __init__(self, mem: GuestMemory, backend: BlockBackend, *, readonly: bool | None = None,
                 serial: str = "", queue_size: int = QUEUE_SIZE, poll_max: float = POLL_MAX,
                 clock: Callable[[], float] = time.perf_counter):
        self.backend = backend
        self.readonly = backend.readonly if readonly is None else readonly
        self.serial = serial.encode("ascii", "replace")[:ID_BYTES]
        features = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if self.readonly:
            features |= VIRTIO_BLK_F_RO
        super().__init__(mem, [queue_size], features)
        self.capacity = backend.size // SECTOR_SIZE  # in 512-byte sectors
        self.seg_max = queue_size - 2  # room for header and status in a full-size chain
        self.stats = {"rd_ops": 0, "wr_ops": 0, "flush_ops": 0, "rd_bytes": 0, "wr_bytes": 0, "errors": 0}
        self._submit = getattr(backend, "submit", None)
        self._in_flight = 0  # requests handed to data I/O and not completed yet
        self._quiescing = 0  # > 0: pop nothing new (a reset, release or snapshot is waiting)
        self._unsignalled = False  # used entries added since the last interrupt decision
        self._idle = threading.Condition(self.lock)
        self._poll_max = poll_max
        self._poll = poll_max  # current idle poll window (s); 0 = none
        self._idle_since = 0.0  # when notifications were last switched back on
        self._clock = clock
        factory = getattr(backend, "native_queue", None)
        self._native = factory([(r.gpa, r.view) for r in mem.regions]) if factory is not None else None
        self._native_ready = False  # bound to the active queue's rings
        self._native_on = False  # a serve is running (counted in _in_flight): nothing else pops
        self._native_poll = 0.0  # the poll window the next serve gets

    def on_activate(self) -> None:
        q = self.queues[0]
        self._native_ready = (self._native is not None and q.active
                              and self._native.bind(q.desc_addr, q.avail_addr, q.used_addr, q.size))

    def on_reset(self) -> None:
        self._native_ready = False

    def bind(self, interrupt, lock) -> None:
        super().bind(interrupt, lock)
        self._idle = threading.Condition(lock)

    def config_bytes(self) -> bytes:
        # capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size
        return struct.pack("<QIIHBBI", self.capacity, SIZE_MAX, self.seg_max, 0, 0, 0, SECTOR_SIZE)

    # --- queue processing ----------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        """The driver notified: take what it posted. The data I/O of the last request runs here;
        what the ring holds after it goes to the backend's threads (and so does the idle poll),
        so the notifying thread (the I/O thread every device shares) is back for the others
        after one request."""
        if index != 0:
            return
        with self.lock:
            self._notified()
            req = self.guarded(self._collect)
            self._signal()
        if req is None:
            return
        if req is _NATIVE:
            req = self._serve_native(1)  # one request here, as below; the rest and the poll go on
        else:
            result = self._execute(req)
            with self.lock:
                req = self.guarded(self._complete_and_collect, req, result)
                self._signal()
        if req is not None and self._submit is not None:
            self._submit(self._drive, req)
        else:
            self._drive(req)

    def _drive(self, req) -> None:
        """Run ``req`` and whatever the ring holds when it completes, polling it a while when
        the device goes idle (no lock held on entry)."""
        while req is not None:
            if req is _POLL:
                req = self._idle_poll()
                continue
            if req is _NATIVE:
                req = self._serve_native()
                continue
            result = self._execute(req)
            with self.lock:
                req = self.guarded(self._complete_and_collect, req, result)
                self._signal()

    def _idle_poll(self):
        """Watch the avail index for the poll window, notifications off (counted in flight, so
        a quiesce waits for it and the views it reads stay valid); then collect as usual, which
        switches notifications on when nothing came."""
        q = self.queues[0]
        clock = self._clock
        deadline = clock() + self._poll
        missed = False
        try:
            while not (self.paused or self._quiescing) and not q.has_available():
                if clock() >= deadline:
                    missed = True
                    break
        finally:
            with self.lock:
                if missed:
                    self._shrink_poll()
                self._in_flight -= 1
                if not self._in_flight and self._quiescing:
                    self._idle.notify_all()
                req = self.guarded(self._collect)
                self._signal()
        return req

    def _serve_native(self, budget: int = 0):
        """Run the native data plane on the ring (no lock held; _collect counted it in flight),
        then take the queue state back and collect what is left: what it declined goes through
        this model (``native`` off for that pass)."""
        q = self.queues[0]
        plane = self._native
        window = self._native_poll  # set with _native_on, which keeps every other _collect out
        try:
            res = plane.serve(q.next_avail, q.next_used, q.signalled_used, q.event_idx, window, budget)
        except BaseException:
            with self.lock:
                self._end_native()
            raise
        with self.lock:
            self._end_native()
            self._take_back(res, plane)
            # After an idle return notifications go back on, unless it served requests without
            # a poll window (the notified thread's one): then a poll comes next.
            served = res.rd_ops + res.wr_ops + res.errors > 0
            poll = res.reason != SERVE_IDLE or (served and not window)
            req = self.guarded(self._collect, poll, res.reason != SERVE_DECLINE)
            self._signal()
        return req

    def _end_native(self) -> None:
        self._native_on = False
        self._in_flight -= 1
        if not self._in_flight and self._quiescing:
            self._idle.notify_all()

    def _take_back(self, res, plane) -> None:
        """The queue state, counts and effects of a serve (lock held)."""
        q = self.queues[0]
        q.next_avail, q.next_used, q.signalled_used = res.next_avail, res.next_used, res.signalled_used
        stats = self.stats
        stats["rd_ops"] += res.rd_ops
        stats["rd_bytes"] += res.rd_bytes
        stats["wr_ops"] += res.wr_ops
        stats["wr_bytes"] += res.wr_bytes
        stats["errors"] += res.errors
        if self.mem.tracks_host_writes:  # switched on while it ran
            for gpa, length in plane.written():
                self.mem.note_host_write(gpa, length)
        if res.poll_missed:
            self._shrink_poll()
        if res.reason == SERVE_SIGNAL:
            self.interrupt.signal_queue(0)

    def _shrink_poll(self) -> None:
        """A poll window ran out (lock held): the driver is slower than it, so halve it."""
        self._poll = self._poll / 2 if self._poll >= 2 * POLL_MIN else 0.0

    def _notified(self) -> None:
        """A notify (lock held): one that comes soon after the device went idle means a poll
        window would have caught it, so the window grows back."""
        if self._poll < self._poll_max and self._clock() - self._idle_since < self._poll_max:
            self._poll = min(self._poll_max, max(2 * self._poll, POLL_MIN))

    def _collect(self, poll: bool = False, native: bool = True):
        """Pop every available request (lock held). Requests without data I/O complete at once;
        with a threaded backend all data requests but the last are submitted to it. Returns the
        request left for the calling thread to run, _POLL when the device went idle and the
        caller should poll (``poll`` and a window open), _NATIVE when the native data plane is
        to serve the ring (``native``, nothing else in flight: see _serve_native), or None."""
        q = self.queues[0]
        if not self.activated or not q.active:
            return None
        if self.paused:  # resume() looks at the ring (notifications may be off)
            self._kicked.add(0)
            return None
        if self._quiescing or self._native_on:  # a running serve sees the ring, and returns here
            return None
        submit = self._submit
        held = None
        native = native and self._native_ready and not self.mem.tracks_host_writes
        try:
            while True:
                q.disable_notification()
                if native and not self._in_flight and (q.has_available() or (poll and self._poll)):
                    self._in_flight += 1
                    self._native_on = True
                    self._native_poll = self._poll if poll else 0.0
                    self._native.arm()
                    return _NATIVE
                while (chain := q.pop()) is not None:
                    req = self._parse(chain)
                    if req.__class__ is int:
                        q.add_used(chain.head, req)
                        self._unsignalled = True
                        continue
                    self._in_flight += 1
                    if submit is None:
                        return req  # in order: the caller runs it, completes it and comes back
                    if held is not None:
                        submit(self._drive, held)
                    held = req
                if held is not None or self._in_flight:
                    return held  # notifications stay off: a completion looks at the ring again
                if poll and self._poll:
                    self._in_flight += 1  # the poll, until _idle_poll ends it
                    return _POLL
                self._idle_since = self._clock()
                if not q.enable_notification():
                    return None
        except BaseException:
            if held is not None:  # counted in flight: it must still run and complete
                submit(self._drive, held)
            raise

    def _complete_and_collect(self, req, result: int):
        self._complete(req, result)
        return self._collect(poll=True)

    def _signal(self) -> None:
        """One interrupt decision for everything added to the used ring since the last one."""
        if self._unsignalled:
            self._unsignalled = False
            self.signal_used(0)

    def quiesce(self) -> None:
        """Wait until no request is in flight (their data views die with them). The caller may
        hold the lock; it is let go while waiting."""
        with self.lock:
            if not self._in_flight:
                return
            if self._native_on:
                self._native.request_stop()
            self._quiescing += 1
            try:
                self._idle.wait_for(lambda: not self._in_flight)
            finally:
                self._quiescing -= 1
            if not self._quiescing:
                self._rearm()

    def _rearm(self) -> None:
        """Completions during a quiesce left the ring alone, notifications off: switch them on,
        and if the driver posted meanwhile, a backend thread takes it once the lock is free
        (after the caller's snapshot, say, so the saved indices are the ones waited for)."""
        q = self.queues[0]
        if self.activated and self.broken is None and q.active and q.enable_notification():
            if self.paused or self._submit is None:
                self._kicked.add(0)  # resume() takes it (no thread to hand it to without submit)
            else:
                self._submit(self.process_queue, 0)

    # --- requests ------------------------------------------------------------------------------

    def _parse(self, chain: DescriptorChain):
        """A data request (head, type, byte offset, buffers, length, status view), or the used
        length of a request finished here (errors, GET_ID)."""
        mem = self.mem
        descs = chain.descs
        if len(descs) == 3:
            # The usual shape, header / data / status (Linux, the test guests): the general
            # path below gives the same answer for it, in about twice the time.
            (h_addr, h_len, h_w), (d_addr, d_len, d_w), (s_addr, s_len, s_w) = descs
            if h_len == HEADER.size and not h_w and s_len == 1 and s_w and d_len:
                rtype, _, sector = HEADER.unpack_from(mem.read_view(h_addr, HEADER.size))
                if (rtype == VIRTIO_BLK_T_IN and d_w) or (rtype == VIRTIO_BLK_T_OUT and not d_w
                                                          and not self.readonly):
                    status = mem.view(s_addr, 1)
                    if not self._in_range(sector, d_len):
                        return self._done(status, VIRTIO_BLK_S_IOERR)
                    return (chain.head, rtype, sector * SECTOR_SIZE, [mem.view(d_addr, d_len)], d_len, status)
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        in_total = out_total = 0
        for addr, length, w in chain.descs:
            if w:
                writable.append((addr, length))
                out_total += length
            elif writable:
                return self._done(None, VIRTIO_BLK_S_IOERR)  # readable after writable: malformed
            else:
                readable.append((addr, length))
                in_total += length
        while writable and writable[-1][1] == 0:
            writable.pop()
        if not writable:
            return self._done(None, VIRTIO_BLK_S_IOERR)  # nowhere to put the status byte
        addr, length = writable[-1]
        status = mem.view(addr + length - 1, 1)
        out_len = out_total - 1  # device-writable data bytes before the status byte
        if in_total < HEADER.size:
            return self._done(status, VIRTIO_BLK_S_IOERR)
        addr, length = readable[0]
        if length >= HEADER.size:
            rtype, _, sector = HEADER.unpack_from(mem.view(addr, HEADER.size))
        else:
            rtype, _, sector = HEADER.unpack(iov.gather(mem, readable, 0, HEADER.size))
        if rtype == VIRTIO_BLK_T_IN:
            if not self._in_range(sector, out_len):
                return self._done(status, VIRTIO_BLK_S_IOERR)
            return (chain.head, rtype, sector * SECTOR_SIZE, iov.views(mem, writable, 0, out_len), out_len, status)
        if rtype == VIRTIO_BLK_T_OUT:
            in_len = in_total - HEADER.size  # driver-supplied data bytes after the header
            if self.readonly or not self._in_range(sector, in_len):
                return self._done(status, VIRTIO_BLK_S_IOERR)
            return (chain.head, rtype, sector * SECTOR_SIZE, iov.views(mem, readable, HEADER.size, in_len),
                    in_len, status)
        if rtype == VIRTIO_BLK_T_FLUSH:
            return (chain.head, rtype, 0, None, 0, status)
        if rtype == VIRTIO_BLK_T_GET_ID:
            n = min(ID_BYTES, out_len)
            iov.scatter(mem, writable, 0, self.serial.ljust(ID_BYTES, b"\0")[:n])
            return self._done(status, VIRTIO_BLK_S_OK, n)
        return self._done(status, VIRTIO_BLK_S_UNSUPP)

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + length <= self.capacity * SECTOR_SIZE

    def _execute(self, req) -> int:
        """The data I/O of one request, no lock held: bytes moved, or -1 on a backend error."""
        _, rtype, offset, bufs, length, _ = req
        backend = self.backend
        try:
            if rtype == VIRTIO_BLK_T_IN:
                return backend.readv(offset, bufs) if length else 0
            if rtype == VIRTIO_BLK_T_OUT:
                return backend.writev(offset, bufs) if length else 0
            backend.flush()
            return 0
        except (OSError, VmmError):
            return -1

    def _complete(self, req, result: int) -> None:
        """Status byte (after the data), stats, used entry (lock held)."""
        head, rtype, _, _, length, status = req
        try:
            if result != length:
                used = self._done(status, VIRTIO_BLK_S_IOERR)
            else:
                stats = self.stats
                if rtype == VIRTIO_BLK_T_IN:
                    stats["rd_ops"] += 1
                    stats["rd_bytes"] += length
                    used = self._done(status, VIRTIO_BLK_S_OK, length)
                elif rtype == VIRTIO_BLK_T_OUT:
                    stats["wr_ops"] += 1
                    stats["wr_bytes"] += length
                    used = self._done(status, VIRTIO_BLK_S_OK)
                else:
                    stats["flush_ops"] += 1
                    used = self._done(status, VIRTIO_BLK_S_OK)
            q = self.queues[0]
            if self.activated and q.active:
                q.add_used(head, used)
                self._unsignalled = True
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._quiescing:  # only a quiesce waits on it
                self._idle.notify_all()

    def _done(self, status: memoryview | None, code: int, data_len: int = 0) -> int:
        """Write the status byte (last, after any data); returns the used length."""
        if code != VIRTIO_BLK_S_OK:
            self.stats["errors"] += 1
        if status is None:
            return 0
        status[0] = code
        return data_len + 1

    def save_device_state(self) -> dict:
        return {"capacity": self.capacity}

    def restore_device_state(self, state: dict) -> None:
        pass  # capacity comes from the backend opened on the destination
