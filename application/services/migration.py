"""Live migration over tcp:/unix: (pre-copy) and the destination side of `-incoming`.

Source (`migrate`): a worker thread connects, introduces the VM (HELLO: fingerprint, layout,
hypervisor), and once accepted sends every non-zero page while the guest runs, then rounds of
the pages the guest dirtied meanwhile until what is left fits the downtime budget at the
measured bandwidth (or the round cap is hit), then parks the vCPUs, sends the last dirty pages
and the device/vCPU state, COMPLETE, and waits for the destination's ACK. Success ends the
source process (the manual: the source VM is destroyed); cancel, a refusal or a lost
connection leave the source running as it was.

Destination (`-incoming`): listens, accepts one connection, refuses a HELLO that does not match
its own configuration, receives pages straight into guest memory, applies the state on
COMPLETE, ACKs and runs. A cancel or a broken stream ends the process.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator, Protocol, Sequence

from application.migratable import MigratableVm
from application.services.jobs import Cancelled, JobRunner, Progress, ms
from application.services.snapshot import SnapshotService, memory_layout
from domain.errors import (
    InvalidArgumentError,
    InvalidStateError,
    MigrationError,
    SnapshotFormatError,
    VmmError,
)
from domain.events import Resumed
from domain.lifecycle import RunState
from domain.memory import PAGE_SIZE
from domain.migration import (
    KIND_INCOMING,
    KIND_MIGRATION,
    ConfigFingerprint,
    MigrationState,
    MigrationStatus,
    MigrationUri,
    compatibility_differences,
    config_fingerprint,
    memory_digest,
    merge_blockers,
    migration_blockers,
    parse_migration_uri,
)
from domain import migration_protocol as proto
from domain.snapshot_format import (
    ARCH,
    MAX_RECORDS,
    MAX_STATE_FILE,
    nonzero_runs,
    page_runs,
)

_log = logging.getLogger("pystrato.migration")
_SETTLE_PASSES = 8


def _devices(records: dict) -> dict:
    return {k: v for k, v in records.items() if k.startswith("dev.")}

ZeroScanner = Callable[[memoryview], list[tuple[int, int]]]


class MigrationChannel(Protocol):
    """One connected byte stream (adapters/migration/channels.py)."""

    def send(self, buffers: Sequence) -> None:
        """Write every buffer completely, in order, or raise OSError/TimeoutError."""

    def recv_into(self, buf: memoryview) -> int:
        """Read at least one byte into buf; 0 at end of stream. Raises TimeoutError/OSError."""

    def set_timeout(self, seconds: float | None) -> None: ...

    def abort(self) -> None:
        """Thread-safe: cut the connection so a send/recv blocked in another thread fails now."""

    def close(self) -> None: ...


class MigrationListener(Protocol):
    address: str  # the URI actually bound (tcp port 0 resolved)

    def accept(self) -> MigrationChannel:
        """Block until one peer connects; OSError once closed."""

    def close(self) -> None: ...


class ChannelFactory(Protocol):
    def connect(self, uri: MigrationUri, timeout: float) -> MigrationChannel: ...

    def listen(self, uri: MigrationUri) -> MigrationListener:
        """Bind and listen now, so an unusable address fails at start-up."""


class MigrationService:
    def __init__(self, vm: MigratableVm, channel_factory: ChannelFactory, state: MigrationState,
                 log: logging.Logger | None = None, *,
                 downtime_limit: float = 0.3, max_rounds: int = 30, io_timeout: float = 30.0,
                 batch_bytes: int = 1 << 20, zero_scanner: ZeroScanner | None = None,
                 clock: Callable[[], float] = time.monotonic, cancel_grace: float = 2.0,
                 progress_interval: float = 1.0, fresh_memory: bool = True,
                 jobs: JobRunner | None = None):
        """``downtime_limit`` (s): the pause the final pass may cost (QEMU's default, 300 ms).
        ``zero_scanner``: finds the non-zero runs of a region (an adapter can skip pages the
        host never populated). ``fresh_memory``: the destination's RAM is newly allocated
        (all zero), so zero pages of the first pass need no work there. ``jobs``: the VM's
        one background job slot, shared with the snapshot service."""
        self._vm = vm
        self._factory = channel_factory
        self._state = state
        self._log = log or _log
        self._downtime_limit = downtime_limit
        self._max_rounds = max_rounds
        self._io_timeout = io_timeout
        self._batch_pages = max(1, min(batch_bytes, proto.MAX_PAGES_DATA) // PAGE_SIZE)
        self._scan = zero_scanner or nonzero_runs
        self._clock = clock
        self._cancel_grace = cancel_grace
        self._progress_interval = progress_interval
        self._fresh_memory = fresh_memory
        self._lock = threading.Lock()
        self._channel: MigrationChannel | None = None
        self._listener: MigrationListener | None = None
        self._jobs = jobs or JobRunner(state, self._log)
        self._closing = False

    # -----------------------------------------------------------------------------------------
    # Source
    # -----------------------------------------------------------------------------------------

    def migrate(self, uri: str, verify: bool = False) -> dict:
        """Start a live migration to tcp:HOST:PORT or unix:PATH in the background; {} at once.
        ``verify``: send a SHA-256 of guest memory taken at pause time for the destination to
        check (costs a pass over memory inside the downtime)."""
        u = parse_migration_uri(uri)
        if u.scheme not in ("tcp", "unix"):
            raise InvalidArgumentError(f"live migration needs a tcp: or unix: URI, not '{uri}'")
        self._state.check_idle()
        vm = self._vm
        rs = vm.run_state
        if rs not in (RunState.RUNNING, RunState.PAUSED):
            raise InvalidStateError(f"cannot migrate a VM in state '{rs.value}'")
        blockers = merge_blockers(migration_blockers(vm.config), vm.migration_blockers())
        if blockers:
            raise MigrationError("live migration is not possible with " + ", ".join(blockers))
        self._jobs.start(KIND_MIGRATION, "migration-out", lambda: self._outgoing(u, verify))
        return {}

    def migrate_cancel(self) -> dict:
        """Ask the running job (live migration or snapshot write) to stop; the worker notices it
        between two batches (a migration then sends CANCEL). A migration stuck in the network
        has its connection cut after a grace period."""
        if self._state.request_cancel():
            self._log.info("migration: cancel requested")
            timer = threading.Timer(self._cancel_grace, self._abort_stuck_cancel)
            timer.daemon = True
            timer.start()
        return {}

    def wait(self, timeout: float | None = None) -> bool:
        """Join the source worker (tests, shutdown). True when no worker is running."""
        return self._jobs.wait(timeout)

    def _abort_stuck_cancel(self) -> None:
        with self._lock:
            ch = self._channel
        if ch is not None and self._state.cancel_requested:
            ch.abort()

    def _check_cancel(self) -> None:
        self._jobs.check_cancel()

    def _outgoing(self, uri: MigrationUri, verify: bool) -> None:
        import domain.state_codec  # noqa: F401 (the final pass encodes with it: imported now, not in the downtime)

        vm, state = self._vm, self._state
        c = Progress(state, self._clock, self._log, self._progress_interval)
        ch: MigrationChannel | None = None
        dirty_log = False
        paused_by_us = False
        devices_paused = False
        try:
            try:
                ch = self._factory.connect(uri, self._io_timeout)
            except OSError as e:
                raise MigrationError(f"cannot connect to {uri}: {e.strerror or e}") from None
            with self._lock:
                self._channel = ch
            ch.set_timeout(self._io_timeout)
            self._check_cancel()
            kind = vm.hypervisor_kind
            layout = memory_layout(vm.memory)
            ch.send([proto.encode(proto.Hello(kind, layout, config_fingerprint(vm.config, kind)))])
            reply = self._read_message(ch, "destination")
            if isinstance(reply, proto.Reject):
                raise MigrationError(f"destination refused the migration: {reply.reason}")
            if not isinstance(reply, proto.Accept):
                raise SnapshotFormatError(f"unexpected {type(reply).__name__} from the destination")
            if not state.activate():
                raise Cancelled()
            c.activated(vm.memory.size)
            self._log.info("migration to %s started (%d MiB of guest RAM)", uri, vm.memory.size >> 20)

            vm.start_dirty_log()
            dirty_log = True
            self._send_full_pass(ch, c)
            pending = self._converge(ch, c)

            # Final pass: park the guest, send what is left and the device state. The downtime
            # counts from here, before the vCPUs are parked, as QEMU's does from vm_stop.
            self._check_cancel()
            t_pause = self._clock()
            was_running = vm.run_state is RunState.RUNNING
            vm.set_run_state(RunState.FINISH_MIGRATE)
            if was_running:
                vm.pause_vcpus()
                paused_by_us = True
            # Then the devices (also on a VM the user paused: its devices still run): a
            # notification the guest gave just before the pause is kept for resume, not
            # handled after the last memory read, and the requests in flight complete now. Their
            # last writes to guest RAM (used rings, data, status bytes) are in the final read.
            vm.pause_devices()
            devices_paused = True
            records = vm.collect_state()
            final = page_runs(list(pending) + list(vm.dirty_pages()))
            c.rounds += 1
            c.remaining = sum(n for _, n in final) * PAGE_SIZE
            self._send_runs(ch, c, final)
            records = self._settle_devices(ch, c, records)
            # The records leave in one send (one system call, not one per record); a cancel is
            # still taken until COMPLETE, the point of no return.
            frames = [proto.encode(proto.StateRecord(name, version, payload))
                      for name, (version, payload) in records.items()]
            ch.send(frames)
            c.transferred += sum(len(f) for f in frames)
            digest = memory_digest(vm.memory) if verify else None
            if not state.commit():
                raise Cancelled()
            ch.send([proto.encode(proto.Complete(run=was_running, digest=digest))])
            t_sent = self._clock()  # QEMU's downtime ends here; ours at the ACK (state applied there)
            reply = self._read_message(ch, "destination")
            if isinstance(reply, proto.Error):
                raise MigrationError(f"destination could not load the migration: {reply.reason}")
            if not isinstance(reply, proto.Ack):
                raise SnapshotFormatError(f"unexpected {type(reply).__name__} from the destination")
            now = self._clock()
            vm.stop_dirty_log()
            dirty_log = False
            vm.set_run_state(RunState.POSTMIGRATE)
            c.remaining = 0
            c.push()
            state.update(downtime=ms(now - t_pause), total_time=ms(now - c.t_start))
            state.transition(MigrationStatus.COMPLETED)
            self._log.info("migration completed: %d MiB sent in %d rounds, %d ms total, %d ms downtime "
                           "(%.1f ms of it until the last byte was sent)", c.transferred >> 20, c.rounds,
                           ms(now - c.t_start), ms(now - t_pause), (t_sent - t_pause) * 1000)
            self._close_channel(ch)
            ch = None
            vm.request_exit(0)
        except Cancelled:
            self._send_quietly(ch, proto.Cancel())
            self._recover(dirty_log, paused_by_us, devices_paused)
            state.transition(MigrationStatus.CANCELLED)
            self._log.info("migration cancelled; the VM keeps running here")
        except Exception as e:  # the worker must always end the job with a status
            reason = self._describe(e)
            self._send_quietly(ch, proto.Error(reason))
            self._recover(dirty_log, paused_by_us, devices_paused)
            if state.cancel_requested:
                state.transition(MigrationStatus.CANCELLED)
                self._log.info("migration cancelled (%s); the VM keeps running here", reason)
            else:
                state.fail(reason)
                self._log.error("migration failed: %s; the VM keeps running here", reason)
        finally:
            if ch is not None:
                self._close_channel(ch)

    def _settle_devices(self, ch: MigrationChannel, c: Progress, records: dict) -> dict:
        """A safety check: with the vCPUs parked and the devices paused, nothing should move,
        and the first collection agrees. Should a device still move (host-side work the pause
        does not cover), collect the devices again and resend what was written until two
        collections agree; a few passes at most. The vCPU and VM records are the first
        collection's, taken closest to the pause."""
        vm = self._vm
        for _ in range(_SETTLE_PASSES):
            again = vm.collect_device_state()
            late = page_runs(list(vm.dirty_pages()))
            c.remaining = sum(n for _, n in late) * PAGE_SIZE
            self._send_runs(ch, c, late)
            if again == _devices(records):
                return records
            self._log.info("migration: a device moved during the final pass; collecting again")
            records = {k: v for k, v in records.items() if not k.startswith("dev.")} | again
        raise MigrationError("device state did not settle with the vCPUs stopped")

    @staticmethod
    def _describe(e: BaseException) -> str:
        if isinstance(e, VmmError):
            return str(e)
        if isinstance(e, TimeoutError):
            return "the migration connection timed out"
        if isinstance(e, OSError):
            return f"migration connection lost: {e.strerror or e}"
        return f"internal error: {type(e).__name__}: {e}"

    def _recover(self, dirty_log: bool, paused_by_us: bool, devices_paused: bool = False) -> None:
        """Put the source back as it was: dirty log off, devices taking work again (the queues
        notified during the final pass first), vCPUs running if we parked them."""
        vm = self._vm
        if devices_paused:
            try:
                vm.resume_devices()
            except Exception as e:  # the vCPUs must run again whatever a device does
                self._log.error("could not resume the devices: %s", e)
        if dirty_log:
            try:
                vm.stop_dirty_log()
            except VmmError as e:
                self._log.warning("could not stop the dirty log: %s", e)
        if vm.run_state is RunState.FINISH_MIGRATE:
            if paused_by_us:
                vm.resume_vcpus()
                vm.set_run_state(RunState.RUNNING)
            else:
                vm.set_run_state(RunState.PAUSED)

    def _send_quietly(self, ch: MigrationChannel | None, msg: proto.Message) -> None:
        if ch is None:
            return
        try:
            ch.set_timeout(1.0)
            ch.send([proto.encode(msg)])
        except OSError:
            pass

    def _close_channel(self, ch: MigrationChannel) -> None:
        with self._lock:
            if self._channel is ch:
                self._channel = None
        ch.close()

    def _send_full_pass(self, ch: MigrationChannel, c: Progress) -> None:
        """Every page once, zero pages as flags; the dirty log catches what changes meanwhile."""
        c.remaining = self._vm.memory.size
        for region in self._vm.memory.regions:
            runs: list[tuple[int, int, bool]] = []
            pos = 0
            for off, length in self._scan(region.view):
                if off > pos:
                    runs.append((region.gpa + pos, (off - pos) // PAGE_SIZE, True))
                runs.append((region.gpa + off, length // PAGE_SIZE, False))
                pos = off + length
            if pos < region.size:
                runs.append((region.gpa + pos, (region.size - pos) // PAGE_SIZE, True))
            self._send_batches(ch, c, runs)
        self._end_round(ch, c, 0)

    def _end_round(self, ch: MigrationChannel, c: Progress, rnd: int) -> None:
        """ITERATION_END: after it, zero pages are real changes the destination must apply
        (during the first pass its fresh RAM is already zero)."""
        frame = proto.encode(proto.IterationEnd(rnd))
        ch.send([frame])
        c.transferred += len(frame)
        c.push()

    def _converge(self, ch: MigrationChannel, c: Progress) -> list[int]:
        """Dirty rounds until the rest fits the downtime budget; returns the pages still to send."""
        vm = self._vm
        t_round = c.t_active
        rnd = 1
        while True:
            self._check_cancel()
            dirty = list(vm.dirty_pages())
            now = self._clock()
            c.rounds += 1
            c.dirty_rate = int(len(dirty) / (now - t_round)) if now > t_round else 0
            t_round = now
            c.remaining = len(dirty) * PAGE_SIZE
            expected = c.remaining / c.bandwidth()
            c.expected_downtime = ms(expected)
            c.push()
            if expected <= self._downtime_limit or rnd >= self._max_rounds:
                if rnd >= self._max_rounds and expected > self._downtime_limit:
                    self._log.warning("migration: not converging after %d rounds; forcing the final pass "
                                      "(%d MiB left)", rnd, c.remaining >> 20)
                return dirty
            self._send_runs(ch, c, page_runs(dirty))
            self._end_round(ch, c, rnd)
            rnd += 1

    def _send_runs(self, ch: MigrationChannel, c: Progress, runs: list[tuple[int, int]]) -> None:
        """Dirty (gpa, npages) runs: split by region and by zero/non-zero content."""
        mem = self._vm.memory
        items: list[tuple[int, int, bool]] = []
        for gpa, npages in self._split_by_region(runs):
            view = mem.read_view(gpa, npages * PAGE_SIZE)
            pos = 0
            for off, length in self._scan(view):
                if off > pos:
                    items.append((gpa + pos, (off - pos) // PAGE_SIZE, True))
                items.append((gpa + off, length // PAGE_SIZE, False))
                pos = off + length
            if pos < len(view):
                items.append((gpa + pos, (len(view) - pos) // PAGE_SIZE, True))
        self._send_batches(ch, c, items)

    def _split_by_region(self, runs: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        regions = self._vm.memory.regions
        for gpa, npages in runs:
            end = gpa + npages * PAGE_SIZE
            while gpa < end:
                r = next((r for r in regions if r.gpa <= gpa < r.end), None)
                if r is None:
                    raise MigrationError(f"dirty log reported page {gpa:#x} outside guest RAM")
                stop = min(end, r.end)
                yield gpa, (stop - gpa) // PAGE_SIZE
                gpa = stop

    def _send_batches(self, ch: MigrationChannel, c: Progress, items: list[tuple[int, int, bool]]) -> None:
        """PAGES messages of at most batch_pages pages of data and MAX_RUNS runs each, the data
        written straight from guest memory."""
        mem = self._vm.memory
        batch: list[tuple[int, int, bool]] = []
        views: list[memoryview] = []
        data_pages = 0

        def flush() -> None:
            nonlocal batch, views, data_pages
            if not batch:
                return
            self._check_cancel()
            hdr = proto.pages_header(batch)
            ch.send([hdr, *views])
            c.transferred += len(hdr) + data_pages * PAGE_SIZE
            covered = sum(n for _, n, _ in batch) * PAGE_SIZE
            c.remaining = max(0, c.remaining - covered)
            c.push()
            batch, views, data_pages = [], [], 0

        for gpa, npages, zero in items:
            if zero:
                c.duplicate += npages
                batch.append((gpa, npages, True))
                if len(batch) >= proto.MAX_RUNS:
                    flush()
                continue
            while npages:
                take = min(npages, self._batch_pages - data_pages)
                batch.append((gpa, take, False))
                views.append(mem.read_view(gpa, take * PAGE_SIZE))
                data_pages += take
                c.normal += take
                gpa += take * PAGE_SIZE
                npages -= take
                if data_pages >= self._batch_pages or len(batch) >= proto.MAX_RUNS:
                    flush()
        flush()

    # -----------------------------------------------------------------------------------------
    # Reading messages (both sides)
    # -----------------------------------------------------------------------------------------

    def _recv_exact(self, ch: MigrationChannel, view: memoryview, peer: str) -> None:
        got = 0
        n = len(view)
        while got < n:
            k = ch.recv_into(view[got:])
            if k == 0:
                raise MigrationError(f"the {peer} closed the migration connection")
            got += k

    def _read_header(self, ch: MigrationChannel, peer: str) -> tuple[int, int]:
        hdr = bytearray(proto.FRAME_HEADER_SIZE)
        self._recv_exact(ch, memoryview(hdr), peer)
        return proto.decode_frame_header(hdr)

    def _read_payload(self, ch: MigrationChannel, length: int, peer: str) -> memoryview:
        buf = memoryview(bytearray(length))
        self._recv_exact(ch, buf, peer)
        return buf

    def _read_message(self, ch: MigrationChannel, peer: str) -> proto.Message:
        msg_type, length = self._read_header(ch, peer)
        return proto.decode_payload(msg_type, self._read_payload(ch, length, peer))

    # -----------------------------------------------------------------------------------------
    # Destination
    # -----------------------------------------------------------------------------------------

    def listen_incoming(self, uri: str) -> str:
        """Bind the -incoming address now (so a bad address fails at start-up); returns the
        address actually bound. Then call run_incoming() (in a thread, QMP keeps serving)."""
        u = parse_migration_uri(uri)
        if u.scheme not in ("tcp", "unix"):
            raise InvalidArgumentError(f"-incoming for live migration needs tcp: or unix:, not '{uri}'")
        try:
            listener = self._factory.listen(u)
        except OSError as e:
            raise MigrationError(f"cannot listen on {uri}: {e.strerror or e}") from None
        with self._lock:
            self._listener = listener
        if self._vm.run_state is RunState.PRELAUNCH:
            self._vm.set_run_state(RunState.INMIGRATE)
        self._log.info("waiting for an incoming migration on %s", listener.address)
        return listener.address

    def incoming(self, uri: str) -> bool:
        self.listen_incoming(uri)
        return self.run_incoming()

    def shutdown(self) -> None:
        """Stop waiting for / receiving a migration (the process is quitting)."""
        with self._lock:
            self._closing = True
            listener, ch = self._listener, self._channel
        if listener is not None:
            listener.close()
        if ch is not None:
            ch.abort()

    def run_incoming(self) -> bool:
        """Accept ONE connection and receive the VM. True once it runs here; False after a
        refusal, a cancel or an error, having asked the process to exit."""
        with self._lock:
            listener = self._listener
        if listener is None:
            raise InvalidStateError("listen_incoming() was not called")
        try:
            ch = listener.accept()
        except OSError as e:
            listener.close()
            if self._closing:
                return False
            return self._incoming_failed(None, f"accepting the migration connection failed: {e.strerror or e}")
        finally:
            with self._lock:
                self._listener = None
        listener.close()
        with self._lock:
            self._channel = ch
        self._state.begin(KIND_INCOMING)
        try:
            ch.set_timeout(self._io_timeout)
            return self._receive(ch)
        except Exception as e:  # any failure ends the destination with a clear line
            if self._closing:
                return False
            return self._incoming_failed(ch, self._describe(e))
        finally:
            self._close_channel(ch)

    def _incoming_failed(self, ch: MigrationChannel | None, reason: str, code: int = 1) -> bool:
        self._send_quietly(ch, proto.Error(reason))
        self._state.fail(reason)
        self._log.error("incoming migration failed: %s", reason)
        self._vm.request_exit(code)
        return False

    def _hello_problem(self, hello: proto.Hello) -> str | None:
        vm = self._vm
        kind = vm.hypervisor_kind
        problems: list[str] = []
        if hello.arch != ARCH:
            problems.append(f"architecture differs: source {hello.arch}, destination {ARCH}")
        if hello.page_size != PAGE_SIZE:
            problems.append(f"page size differs: source {hello.page_size}, destination {PAGE_SIZE}")
        mine: ConfigFingerprint = config_fingerprint(vm.config, kind)
        problems += compatibility_differences(hello.fingerprint, mine)
        layout = memory_layout(vm.memory)
        if not problems and tuple(hello.layout) != layout:
            problems.append("memory layout differs")
        blockers = merge_blockers(migration_blockers(vm.config), vm.migration_blockers())
        if blockers:
            problems.append("destination cannot take a migration with " + ", ".join(blockers))
        return "; ".join(problems) or None

    def _receive(self, ch: MigrationChannel) -> bool:
        import domain.state_codec  # noqa: F401 (decoding the state is part of the downtime: import it now)

        vm, state = self._vm, self._state
        first = self._read_message(ch, "source")
        if not isinstance(first, proto.Hello):
            raise SnapshotFormatError(f"migration stream does not start with HELLO ({type(first).__name__})")
        problem = self._hello_problem(first)
        if problem:
            self._send_quietly(ch, proto.Reject(problem))
            state.fail(problem)
            self._log.error("incoming migration refused: %s", problem)
            vm.request_exit(1)
            return False
        ch.send([proto.encode(proto.Accept())])
        state.transition(MigrationStatus.ACTIVE)
        self._log.info("incoming migration accepted")
        mem = vm.memory
        records: dict[str, tuple[int, bytes]] = {}
        record_bytes = 0
        first_pass = True
        while True:
            msg_type, length = self._read_header(ch, "source")
            if msg_type == proto.PAGES:
                count = bytearray(4)
                self._recv_exact(ch, memoryview(count), "source")
                table = bytearray(4 + proto.pages_table_size(count))
                table[:4] = count
                self._recv_exact(ch, memoryview(table)[4:], "source")
                for run in proto.decode_pages_table(table, length):
                    if not mem.contains(run.gpa, run.npages * PAGE_SIZE):
                        raise SnapshotFormatError(
                            f"migration stream: page run {run.gpa:#x}+{run.npages} pages is outside guest RAM")
                    view = mem.view(run.gpa, run.npages * PAGE_SIZE)
                    if not run.zero:
                        self._recv_exact(ch, view, "source")
                    elif not (first_pass and self._fresh_memory):
                        for off, n in self._scan(view):
                            view[off : off + n] = bytes(n)
                continue
            msg = proto.decode_payload(msg_type, self._read_payload(ch, length, "source"))
            if isinstance(msg, proto.IterationEnd):
                first_pass = False
            elif isinstance(msg, proto.StateRecord):
                record_bytes += len(msg.payload)
                if msg.name in records or len(records) >= MAX_RECORDS or record_bytes > MAX_STATE_FILE:
                    raise SnapshotFormatError("migration stream: too many, too large or duplicate state records")
                records[msg.name] = (msg.version, msg.payload)
            elif isinstance(msg, proto.Complete):
                return self._complete(ch, msg, records)
            elif isinstance(msg, proto.Cancel):
                self._log.warning("migration cancelled by source")
                if state.request_cancel():
                    state.transition(MigrationStatus.CANCELLED)
                vm.request_exit(0)
                return False
            elif isinstance(msg, proto.Error):
                raise MigrationError(f"the source reported: {msg.reason}")
            else:
                raise SnapshotFormatError(f"unexpected {type(msg).__name__} in the migration stream")

    def _complete(self, ch: MigrationChannel, msg: proto.Complete, records: dict) -> bool:
        vm, state = self._vm, self._state
        if msg.digest is not None and memory_digest(vm.memory) != msg.digest:
            return self._incoming_failed(ch, "guest memory digest differs from the source's")
        try:
            vm.apply_state(records)
        except VmmError as e:
            return self._incoming_failed(ch, f"cannot apply the VM state: {e}")
        ch.send([proto.encode(proto.Ack())])
        # The source paused its devices with notifications maybe not processed: the restored
        # devices look at every active queue once they run — now, or at `cont` for a VM that
        # was stopped on the source (held, as `stop` holds them).
        if msg.run:
            vm.resume_devices()
            vm.set_run_state(RunState.RUNNING)
            vm.resume_vcpus()
            vm.emit(Resumed())
        else:
            vm.pause_devices()
            vm.set_run_state(RunState.PAUSED)
        state.transition(MigrationStatus.COMPLETED)
        self._log.info("incoming migration completed; the VM runs here%s",
                       " (memory digest verified)" if msg.digest else "")
        return True


def dispatch_migrate(uri: str, extra: dict, *, snapshot: SnapshotService,
                     migration: MigrationService) -> dict:
    """The QMP `migrate` command: file: -> snapshot, tcp:/unix: -> live migration.
    ``extra``: further arguments; "verify" (bool) asks for the end-to-end memory digest."""
    u = parse_migration_uri(uri)
    verify = extra.get("verify", False)
    if not isinstance(verify, bool):
        raise InvalidArgumentError("'verify' must be a boolean")
    if u.scheme == "file":
        return snapshot.save(u.path)
    return migration.migrate(uri, verify=verify)


class MigrationFacade:
    """One VM's snapshot and migration entry points, as the management API and the composition
    root use them. The adapters are injected (this module may not import them):

        MigrationFacade(vm, store=FileSnapshotStore(PagemapZeroScanner()),
                        channels=SocketChannelFactory(), zero_scanner=PagemapZeroScanner())
    """

    def __init__(self, vm: MigratableVm, *, store, channels: ChannelFactory,
                 log: logging.Logger | None = None, state: MigrationState | None = None,
                 **migration_options):
        self.state = state or MigrationState()
        # One job slot: a snapshot write and an outgoing migration run the same way, one at a time.
        self.jobs = JobRunner(self.state, log)
        self.snapshots = SnapshotService(vm, store, self.state, log, jobs=self.jobs)
        self.migration = MigrationService(vm, channels, self.state, log, jobs=self.jobs,
                                          **migration_options)
        self._incoming: threading.Thread | None = None

    def query(self) -> dict:
        """query-migrate."""
        return self.state.query_migrate_info()

    def migrate(self, uri: str, **extra) -> dict:
        """`migrate`: file:DIR (snapshot) or tcp:/unix: (live migration), both in the background."""
        extra.pop("detach", None)  # QEMU's legacy flag: migration always runs detached
        for flag in ("blk", "inc", "resume"):  # QEMU's flags: accepted when off
            if extra.pop(flag, False):
                raise InvalidArgumentError(f"migrate: '{flag}' is not supported by pystrato")
        unknown = sorted(set(extra) - {"verify"})
        if unknown:
            raise InvalidArgumentError(f"unexpected migrate argument(s): {', '.join(unknown)}")
        return dispatch_migrate(uri, extra, snapshot=self.snapshots, migration=self.migration)

    def cancel(self) -> dict:
        """`migrate_cancel`: the running snapshot write or outgoing migration."""
        return self.migration.migrate_cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Join the running job (tests, shutdown). True when none is running."""
        return self.jobs.wait(timeout)

    def incoming(self, uri: str) -> str:
        """-incoming tcp:/unix:. Binds now (MigrationError if it cannot: exit non-zero), then
        receives in a background thread; the VM must be built with its vCPUs parked (inmigrate).
        On failure or cancel the thread calls vm.request_exit(code). Returns the bound address."""
        address = self.migration.listen_incoming(uri)
        t = threading.Thread(target=self.migration.run_incoming, name="migration-in", daemon=True)
        self._incoming = t
        t.start()
        return address

    def shutdown(self, timeout: float = 10.0) -> None:
        """The process is quitting: stop waiting for/receiving an incoming migration, cancel a
        snapshot write or outgoing migration and wait for its worker, which reads guest RAM
        that the teardown is about to free."""
        if self.state.kind != KIND_INCOMING:
            self.state.request_cancel()
        self.migration.shutdown()
        if not self.jobs.wait(timeout):
            _log.warning("the snapshot/migration worker did not stop within %.0f s", timeout)
