"""Memory snapshots (`migrate` to file:DIR on a paused VM) and restore (`-incoming file:DIR`).

Save writes DIR/memory (raw pages, zero pages as holes) and DIR/state (the versioned state file,
domain.snapshot_format) through a SnapshotStore. Restore is split so that the composition root
can map the memory file copy-on-write before it builds the VM:

    records, mem_path = load_snapshot(dir, config, kind, store)   # validates, touches nothing
    memory = allocator.allocate(layout, backing_file=mem_path)     # MAP_PRIVATE
    vm = build(config, memory)                                     # vCPUs parked
    SnapshotService(vm, store, state).restore(records)             # apply state, run
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol, Sequence

from application.migratable import MigratableVm
from application.services.jobs import Cancelled, JobRunner, Progress, default_clock, ms
from domain.config import VmConfig
from domain.errors import (
    IncompatibleConfigError,
    InvalidStateError,
    MigrationError,
    SnapshotFormatError,
    VmmError,
)
from domain.events import Resumed
from domain.lifecycle import RunState
from domain.memory import PAGE_SIZE, GuestMemory
from domain.migration import (
    KIND_INCOMING,
    KIND_SNAPSHOT,
    MigrationState,
    MigrationStatus,
    check_compatible,
    config_fingerprint,
    merge_blockers,
    snapshot_blockers,
)
from domain.snapshot_format import (
    Records,
    SnapshotHeader,
    decode_state_file,
    encode_state_file,
    memory_file_size,
)

_log = logging.getLogger("pystrato.snapshot")


class SnapshotStore(Protocol):
    """Where snapshots live (adapters/storage/snapshot_store.py: DIR/memory + DIR/state)."""

    def check_target(self, directory: str) -> None:
        """Cheap checks that DIR can take a snapshot (exists, is a directory, writable); OSError."""

    def save(self, directory: str, state: bytes, memory: GuestMemory, *,
             progress: Callable[[int, int], None] | None = None,
             publish: Callable[[], None] | None = None) -> None:
        """Write both files so that a failure leaves neither a half file nor a stale pair.
        ``progress(data_bytes, done_bytes)`` is called between chunks of memory (non-zero bytes
        written, bytes of RAM dealt with so far) and ``publish()`` just before the files take
        their final names; an exception from either abandons the save (no file left behind)
        and propagates. Raises OSError (ENOENT, EACCES, ENOSPC, ...)."""

    def read_state(self, directory: str) -> bytes:
        """The state file's bytes. MigrationError when it cannot be read, SnapshotFormatError
        when it is foreign or larger than the format allows (checked before reading it all)."""

    def memory_file(self, directory: str) -> tuple[str, int]:
        """(path, size) of the memory file; MigrationError when missing."""


def memory_layout(memory: GuestMemory) -> tuple[tuple[int, int], ...]:
    return tuple((r.gpa, r.size) for r in memory.regions)


def load_snapshot(directory: str, config: VmConfig, kind: str, store: SnapshotStore,
                  layout: Sequence[tuple[int, int]] | None = None) -> tuple[Records, str]:
    """Validate DIR before anything is built: the state file (magic, version, arch, kind, caps,
    checksum), the configuration (same smp, memory, devices, addresses, MACs), the layout when
    given, and the memory file's size (a short file would SIGBUS the guest later).
    Returns (state records, memory file path) for the allocator and VM.apply_state."""
    blockers = snapshot_blockers(config)
    if blockers:
        raise MigrationError("cannot restore a snapshot with " + ", ".join(blockers))
    header, records = decode_state_file(store.read_state(directory), expected_kind=kind)
    check_compatible(header.fingerprint, config_fingerprint(config, kind))
    if layout is not None and tuple(map(tuple, layout)) != header.layout:
        raise IncompatibleConfigError(
            f"memory layout differs: snapshot {_fmt_layout(header.layout)}, this VM {_fmt_layout(layout)}")
    path, size = store.memory_file(directory)
    need = memory_file_size(header.layout)
    if size != need:
        raise SnapshotFormatError(
            f"snapshot memory file {path} has {size} bytes, the state file expects {need}")
    return records, path


def _fmt_layout(layout) -> str:
    return ",".join(f"{gpa:#x}+{size:#x}" for gpa, size in layout)


class SnapshotService:
    def __init__(self, vm: MigratableVm, store: SnapshotStore, state: MigrationState,
                 log: logging.Logger | None = None, *, jobs: JobRunner | None = None,
                 clock: Callable[[], float] = default_clock, progress_interval: float = 1.0):
        """``jobs``: the VM's one background job slot, shared with the live migration."""
        self._vm = vm
        self._store = store
        self._state = state
        self._log = log or _log
        self._jobs = jobs or JobRunner(state, self._log)
        self._clock = clock
        self._progress_interval = progress_interval

    def save(self, directory: str) -> dict:
        """`migrate` with file:DIR: checks, then writes on a worker and returns {} at once.
        query-migrate follows it (setup, active with figures, then completed, failed with the
        reason, or cancelled after migrate_cancel). The run state is save-vm meanwhile, so
        `cont`, `stop` and hot-plug are refused and nothing changes memory or devices under
        the writer; it is paused again before the job's final status shows."""
        self._state.check_idle()
        vm = self._vm
        if vm.run_state is not RunState.PAUSED:
            raise InvalidStateError("VM must be paused (run 'stop') before taking a snapshot")
        blockers = merge_blockers(snapshot_blockers(vm.config), vm.migration_blockers())
        if blockers:
            raise MigrationError("snapshot is not possible with " + ", ".join(blockers))
        self._jobs.start(KIND_SNAPSHOT, "snapshot", lambda: self._write(directory),
                         prepare=lambda: self._prepare(directory))
        return {}

    def wait(self, timeout: float | None = None) -> bool:
        """Join the writer (tests, shutdown). True when none is running."""
        return self._jobs.wait(timeout)

    def _prepare(self, directory: str) -> None:
        vm = self._vm
        vm.set_run_state(RunState.SAVE_VM)
        try:
            self._store.check_target(directory)
        except OSError as e:
            vm.set_run_state(RunState.PAUSED)
            reason = f"cannot write snapshot to {directory}: {e.strerror or e}"
            self._log.error("%s", reason)
            raise MigrationError(reason) from None

    def _write(self, directory: str) -> None:
        vm, state = self._vm, self._state
        c = Progress(state, self._clock, self._log, self._progress_interval, what="snapshot")
        reason: str | None = None
        cancelled = False
        devices_paused = False
        try:
            # The vCPUs are parked, but devices still take notifications given before the
            # stop and tap/chardev input: none may write RAM or move after the state is taken.
            vm.pause_devices()
            devices_paused = True
            kind = vm.hypervisor_kind
            header = SnapshotHeader(kind, memory_layout(vm.memory), config_fingerprint(vm.config, kind))
            data = encode_state_file(header, vm.collect_state())
            if not state.activate():
                raise Cancelled()
            size = vm.memory.size
            c.activated(size)
            c.remaining = size
            c.push()
            self._log.info("snapshot to %s started (%d MiB of guest RAM)", directory, size >> 20)

            def progress(data_bytes: int, done_bytes: int) -> None:
                c.transferred = data_bytes
                c.normal = data_bytes // PAGE_SIZE
                c.duplicate = (done_bytes - data_bytes) // PAGE_SIZE
                c.remaining = size - done_bytes
                c.push()
                self._jobs.check_cancel()

            def publish() -> None:
                if not state.commit():  # a cancel won: the old files stay as they were
                    raise Cancelled()

            self._store.save(directory, data, vm.memory, progress=progress, publish=publish)
        except Cancelled:
            cancelled = True
        except OSError as e:
            reason = f"cannot write snapshot to {directory}: {e.strerror or e}"
        except (VmmError, ValueError) as e:
            reason = f"snapshot failed: {e}"
        finally:
            if devices_paused:
                vm.resume_devices()
            # Paused again before the final status shows: a client that sees it may 'cont'.
            if vm.run_state is RunState.SAVE_VM:
                vm.set_run_state(RunState.PAUSED)
        if cancelled or (reason is not None and state.cancel_requested):
            state.transition(MigrationStatus.CANCELLED)
            self._log.info("snapshot to %s cancelled; nothing was written there", directory)
        elif reason is not None:
            state.fail(reason)
            self._log.error("%s", reason)
        else:
            state.update(total_time=ms(self._clock() - c.t_start))
            state.transition(MigrationStatus.COMPLETED)
            self._log.info("snapshot written to %s (%d MiB of data, %d ms)", directory,
                           c.transferred >> 20, ms(self._clock() - c.t_start))

    def restore(self, records: Records, *, start: bool = True) -> None:
        """Apply the records of load_snapshot to a VM built from the same configuration over the
        snapshot's memory, then run it (or leave it paused). Raises on records that do not fit."""
        vm = self._vm
        self._state.begin(KIND_INCOMING)
        self._state.transition(MigrationStatus.ACTIVE)
        vm.set_run_state(RunState.RESTORE_VM)
        try:
            vm.apply_state(records)
        except VmmError as e:
            self._state.fail(str(e))
            vm.set_run_state(RunState.INTERNAL_ERROR)
            raise
        # The saved devices were paused, maybe with notifications not processed: the restored
        # ones look at every active queue.
        vm.resume_devices()
        if start:
            vm.set_run_state(RunState.RUNNING)
            vm.resume_vcpus()
            vm.emit(Resumed())
        else:
            vm.set_run_state(RunState.PAUSED)
        self._state.transition(MigrationStatus.COMPLETED)
