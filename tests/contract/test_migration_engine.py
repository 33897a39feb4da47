"""The snapshot/migration engine against in-test VMs, over real sockets and real files.

The in-test VM implements application.migratable.MigratableVm over bytearray-backed
GuestMemory; a "guest" thread writes pages while the vCPUs run and the VM's dirty log records
them, as the fake and KVM hypervisors do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import random
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from adapters.migration.channels import SocketChannelFactory
from adapters.migration.zero_scan import PagemapZeroScanner
from adapters.storage.snapshot_store import FileSnapshotStore
from application.services.migration import MigrationService, dispatch_migrate
from application.services.snapshot import SnapshotService, load_snapshot
from domain.config import CpuTopology, DeviceConfig, MachineConfig, MemoryConfig, VmConfig
from domain.errors import (
    IncompatibleConfigError,
    InvalidArgumentError,
    InvalidStateError,
    MigrationError,
    SnapshotFormatError,
)
from domain.lifecycle import Lifecycle, RunState
from domain.memory import PAGE_SIZE, GuestMemory
from domain.migration import MigrationState, MigrationStatus, config_fingerprint, memory_digest
from domain import migration_protocol as proto
from domain.snapshot_format import memory_file_regions, nonzero_runs
from tests.stream_proxy import StreamProxy

MiB = 1 << 20
CFG = VmConfig(
    machine=MachineConfig(type="q35"),
    smp=CpuTopology(cpus=2, maxcpus=2, cores=2),
    memory=MemoryConfig(size=16 * MiB),
    devices=(DeviceConfig(driver="virtio-net-pci", id="net0", bus="pcie.0", addr=0x3 << 3,
                          mac="52:54:00:00:00:01"),),
)


def layout_for(size: int) -> list[tuple[int, int]]:
    """Two regions, below and above 4 GiB, as a large x86 guest has."""
    low = size // 2
    return [(0, low), (1 << 32, size - low)]


class InTestVm:
    """MigratableVm over bytearrays (or a given GuestMemory) with dict device state."""

    def __init__(self, config: VmConfig = CFG, *, kind: str = "test", memory: GuestMemory | None = None,
                 state: RunState = RunState.RUNNING, blockers: tuple[str, ...] = ()):
        self.config = config
        self._kind = kind
        self.memory = memory or GuestMemory([(g, bytearray(s)) for g, s in layout_for(config.memory.size)])
        self._life = Lifecycle(state)
        self.devstate = {"machine": (1, os.urandom(16)), "vcpu.0": (2, os.urandom(64)),
                         "vcpu.1": (2, os.urandom(64)), "dev.net0": (1, os.urandom(32))}
        self.vcpus_running = state is RunState.RUNNING
        self._vcpu_lock = threading.Lock()
        self._dirty_lock = threading.Lock()
        self._dirty: set[int] | None = None
        self.blockers = list(blockers)
        self.exit_code: int | None = None
        self.exited = threading.Event()
        self.events: list = []
        self.collected_while_running = False
        self.collected_with_devices_running = False
        self.devices_paused = False
        self.device_calls: list[str] = []

    # --- MigratableVm ---
    @property
    def hypervisor_kind(self) -> str:
        return self._kind

    @property
    def run_state(self) -> RunState:
        return self._life.state

    def set_run_state(self, state: RunState) -> None:
        self._life.transition(state)

    def pause_vcpus(self) -> None:
        with self._vcpu_lock:  # no guest write is in flight once we hold it
            self.vcpus_running = False

    def resume_vcpus(self) -> None:
        with self._vcpu_lock:
            self.vcpus_running = True

    def pause_devices(self) -> None:
        self.device_calls.append("pause")
        self.devices_paused = True

    def resume_devices(self) -> None:
        self.device_calls.append("resume")
        self.devices_paused = False

    def collect_state(self):
        if self.vcpus_running:
            self.collected_while_running = True
        if not self.devices_paused:
            self.collected_with_devices_running = True
        return dict(self.devstate)

    def collect_device_state(self):
        return {k: v for k, v in self.collect_state().items() if k.startswith("dev.")}

    def apply_state(self, records):
        if set(records) != set(self.devstate):
            raise IncompatibleConfigError(f"state records differ: {sorted(records)}")
        self.devstate = dict(records)

    def migration_blockers(self):
        return list(self.blockers)

    def start_dirty_log(self) -> None:
        with self._dirty_lock:
            self._dirty = set()

    def dirty_pages(self):
        with self._dirty_lock:
            assert self._dirty is not None, "dirty log not started"
            out, self._dirty = self._dirty, set()
        return out

    def stop_dirty_log(self) -> None:
        with self._dirty_lock:
            self._dirty = None

    @property
    def dirty_logging(self) -> bool:
        return self._dirty is not None

    def emit(self, event) -> None:
        self.events.append(event)

    def request_exit(self, code: int = 0) -> None:
        self.exit_code = code
        self.exited.set()

    # --- the "guest" ---
    def guest_write(self, gpa: int, data: bytes) -> bool:
        with self._vcpu_lock:
            if not self.vcpus_running:
                return False
            self.memory.write(gpa, data)
            with self._dirty_lock:
                if self._dirty is not None:
                    for page in range(gpa & ~(PAGE_SIZE - 1), gpa + len(data), PAGE_SIZE):
                        self._dirty.add(page)
            return True


def pages_of(vm: InTestVm) -> list[int]:
    return [r.gpa + off for r in vm.memory.regions for off in range(0, r.size, PAGE_SIZE)]


def fill(vm: InTestVm, fraction: float, seed: int = 1) -> None:
    """Random data in a fraction of the pages (the rest stays zero)."""
    rng = random.Random(seed)
    for gpa in pages_of(vm):
        if rng.random() < fraction:
            vm.memory.write(gpa, rng.randbytes(PAGE_SIZE))


class Guest(threading.Thread):
    """Dirties random pages (some back to all-zero) while the vCPUs run."""

    def __init__(self, vm: InTestVm, state: MigrationState | None = None, seed: int = 7):
        super().__init__(daemon=True, name="in-test-guest")
        self.vm, self.state, self.rng = vm, state, random.Random(seed)
        self.stop_ev = threading.Event()
        self.writes = 0
        self.writes_while_active = 0

    def run(self) -> None:
        pages = pages_of(self.vm)
        while not self.stop_ev.is_set():
            gpa = self.rng.choice(pages)
            if self.rng.random() < 0.1:
                data, at = bytes(PAGE_SIZE), gpa
            else:
                data = self.rng.randbytes(64)
                at = gpa + self.rng.randrange(0, PAGE_SIZE - 64)
            if self.vm.guest_write(at, data):
                self.writes += 1
                if self.state is not None and self.state.status is MigrationStatus.ACTIVE:
                    self.writes_while_active += 1
                time.sleep(0.0001)
            else:
                time.sleep(0.001)

    def stop(self) -> None:
        self.stop_ev.set()
        self.join(5)


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log():
    logger = logging.getLogger(f"test.migration.{random.random()}")
    logger.setLevel(logging.INFO)
    h = ListHandler()
    logger.addHandler(h)
    logger.lines = h.lines
    return logger


class Destination:
    def __init__(self, vm: InTestVm, uri: str, log, factory=None, **kw):
        self.vm = vm
        self.state = MigrationState()
        self.svc = MigrationService(vm, factory or SocketChannelFactory(), self.state, log, **kw)
        self.address = self.svc.listen_incoming(uri)
        self.result: list[bool] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.svc.run_incoming()), daemon=True)
        self.thread.start()

    def join(self) -> bool:
        self.thread.join(30)
        assert not self.thread.is_alive(), "destination did not finish"
        return self.result[0]


def source_service(vm, log, factory=None, state=None, **kw) -> tuple[MigrationService, MigrationState]:
    state = state or MigrationState()
    return MigrationService(vm, factory or SocketChannelFactory(), state, log, **kw), state


def finish(svc: MigrationService) -> None:
    assert svc.wait(60), "source migration worker did not finish"


def migrate_once(src, uri: str, log, verify: bool = False, **kw) -> MigrationState:
    """Migrate src to uri with a fresh source service (kw: its options) and wait for its worker."""
    svc, state = source_service(src, log, **kw)
    svc.migrate(uri, verify=verify)
    finish(svc)
    return state


def assert_source_intact(vm: InTestVm, running: bool = True) -> None:
    assert vm.exit_code is None
    assert vm.run_state is (RunState.RUNNING if running else RunState.PAUSED)
    assert vm.vcpus_running is running
    assert not vm.dirty_logging
    assert not vm.devices_paused  # resumed if the final pass had paused them


# =============================================================================================
# Live migration
# =============================================================================================


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_live_migration_with_a_guest_dirtying_pages(tmp_path, log, transport):
    src = InTestVm()
    fill(src, 0.3)
    dst = InTestVm(state=RunState.PRELAUNCH)
    uri = f"unix:{tmp_path}/mig.sock" if transport == "unix" else "tcp:127.0.0.1:0"
    d = Destination(dst, uri, log)
    assert dst.run_state is RunState.INMIGRATE
    # A zero downtime budget never fits: every round up to the cap runs while the guest writes.
    svc, state = source_service(src, log, downtime_limit=0.0, max_rounds=5, batch_bytes=256 << 10)
    guest = Guest(src, state)
    guest.start()
    try:
        assert svc.migrate(d.address) == {}
        finish(svc)
    finally:
        guest.stop()
    info = state.query_migrate_info()
    assert info["status"] == "completed", info
    assert d.join() is True
    assert guest.writes_while_active > 0
    # Source: destroyed after success; parked since the final pass.
    assert src.exit_code == 0 and src.run_state is RunState.POSTMIGRATE and not src.vcpus_running
    assert not src.collected_while_running and not src.dirty_logging
    # Devices paused for the final pass before any state was taken, never resumed there; the
    # destination's restored devices take work once the state is in.
    assert src.device_calls == ["pause"] and not src.collected_with_devices_running
    assert dst.device_calls == ["resume"]
    # Destination: same memory and state, running.
    assert memory_digest(dst.memory) == memory_digest(src.memory)
    assert dst.devstate == src.devstate
    assert dst.run_state is RunState.RUNNING and dst.vcpus_running and dst.exit_code is None
    assert d.state.query_migrate_info() == {"status": "completed"}
    ram = info["ram"]
    # Dirty-log reads: up to max_rounds=5 while converging (the 5th one's pages are carried into
    # the final pass, not sent in a round), then the final read; fewer when a read finds nothing.
    assert 2 <= ram["dirty-sync-count"] <= 6 and ram["remaining"] == 0
    assert ram["normal"] > 0 and ram["duplicate"] > 0 and ram["total"] == CFG.memory.size
    assert ram["transferred"] >= ram["normal"] * PAGE_SIZE
    assert info["downtime"] >= 0 and info["total-time"] >= info["downtime"]
    assert any("migration completed" in line for line in log.lines)


def test_converges_early_when_the_rest_fits_the_budget(tmp_path, log):
    src = InTestVm()
    fill(src, 0.5)
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    state = migrate_once(src, d.address, log, downtime_limit=10.0, max_rounds=30)
    assert d.join() and state.status is MigrationStatus.COMPLETED
    # Idle guest: one dirty-log read shows nothing is left, then the final pass.
    assert state.stats().dirty_sync_count == 2
    assert memory_digest(dst.memory) == memory_digest(src.memory)


def test_migrating_a_paused_vm_leaves_the_destination_paused(tmp_path, log):
    src = InTestVm(state=RunState.PAUSED)
    fill(src, 0.2)
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    state = migrate_once(src, d.address, log)
    assert d.join() and state.status is MigrationStatus.COMPLETED
    assert dst.run_state is RunState.PAUSED and not dst.vcpus_running
    # The final pass pauses the devices (on a real VM this nests in the pause `stop` took).
    assert src.device_calls == ["pause"] and not src.collected_with_devices_running
    # The destination stays paused: its devices are held as `stop` holds them; `cont` lets
    # them go and they look at every queue then.
    assert dst.device_calls == ["pause"]
    assert memory_digest(dst.memory) == memory_digest(src.memory)


def test_stale_destination_memory_is_overwritten_when_not_fresh(tmp_path, log):
    """Zero pages are flags on the wire: a destination whose RAM is not freshly zeroed clears them."""
    src = InTestVm()
    fill(src, 0.2)
    dst = InTestVm(state=RunState.PRELAUNCH)
    fill(dst, 0.5, seed=99)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log, fresh_memory=False)
    migrate_once(src, d.address, log)
    assert d.join()
    assert memory_digest(dst.memory) == memory_digest(src.memory)


def test_verify_checks_the_memory_digest_end_to_end(tmp_path, log):
    src = InTestVm()
    fill(src, 0.3)
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    state = migrate_once(src, d.address, log, verify=True)
    assert d.join() and state.status is MigrationStatus.COMPLETED
    assert any("digest verified" in line for line in log.lines)


def proxy_to(tmp_path, d: Destination, **kw) -> StreamProxy:
    """A started StreamProxy in front of the destination's unix socket."""
    px = StreamProxy.unix(str(tmp_path / f"proxy-{random.randrange(1 << 30)}.sock"),
                          d.address[len("unix:"):], **kw)
    px.start()
    return px


def test_verify_detects_corruption_in_transit(tmp_path, log):
    src = InTestVm()
    for r in src.memory.regions:  # every page non-zero: the first PAGES batch is one run
        r.view[:] = random.Random(3).randbytes(r.size)
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    hello = proto.encode(proto.Hello("test", tuple(layout_for(CFG.memory.size)), config_fingerprint(CFG, "test")))
    flip = len(hello) + proto.FRAME_HEADER_SIZE + 4 + proto.RUN_SIZE + 1000  # inside page data
    px = proxy_to(tmp_path, d, flip_at=flip)
    state = migrate_once(src, px.uri, log, verify=True)
    assert d.join() is False and dst.exit_code == 1
    assert state.status is MigrationStatus.FAILED
    assert "digest differs" in state.error
    assert_source_intact(src)


def _stream_length(tmp_path, log) -> int:
    src = InTestVm()
    fill(src, 0.1, seed=11)
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/measure.sock", log)
    px = proxy_to(tmp_path, d)
    state = migrate_once(src, px.uri, log)
    assert d.join() and state.status is MigrationStatus.COMPLETED
    px.join(5)
    return px.forwarded


def test_connection_cut_at_random_points_fails_and_leaves_the_source_intact(tmp_path, log):
    total = _stream_length(tmp_path, log)
    rng = random.Random(2024)
    cuts = [0, 1, 4, 5, 60, total - 1, total - 40] + [rng.randrange(total) for _ in range(8)]
    for i, cut in enumerate(cuts):
        src = InTestVm()
        fill(src, 0.1, seed=11)
        before = memory_digest(src.memory), dict(src.devstate)
        dst = InTestVm(state=RunState.PRELAUNCH)
        d = Destination(dst, f"unix:{tmp_path}/cut{i}.sock", log, io_timeout=10)
        px = proxy_to(tmp_path, d, limit=cut)
        state = migrate_once(src, px.uri, log, io_timeout=10)
        assert state.status is MigrationStatus.FAILED, (cut, state.query_migrate_info())
        assert state.query_migrate_info()["error-desc"]
        assert_source_intact(src)
        assert (memory_digest(src.memory), src.devstate) == before
        assert d.join() is False, cut
        assert dst.exit_code == 1 and d.state.status is MigrationStatus.FAILED
        assert dst.run_state is RunState.INMIGRATE and not dst.vcpus_running


def test_destination_refuses_a_mismatched_configuration(tmp_path, log):
    src = InTestVm()
    dst_cfg = VmConfig(machine=CFG.machine, smp=CFG.smp, memory=MemoryConfig(size=8 * MiB),
                       devices=CFG.devices)
    dst = InTestVm(dst_cfg, state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    state = migrate_once(src, d.address, log)
    assert d.join() is False and dst.exit_code == 1
    assert state.status is MigrationStatus.FAILED
    assert state.error == ("destination refused the migration: "
                           "memory size differs: source 16777216, destination 8388608")
    assert any("refused" in line and "memory size differs" in line for line in log.lines)
    assert_source_intact(src)


@pytest.mark.parametrize("dst_kw, expected", [
    ({"kind": "kvm"}, "hypervisor differs: source test, destination kvm"),
    ({"config": VmConfig(machine=CFG.machine, smp=CFG.smp, memory=CFG.memory, devices=(
        DeviceConfig(driver="virtio-net-pci", id="net0", bus="pcie.0", addr=0x3 << 3,
                     mac="52:54:00:00:00:02"),))},
     "device 'net0' mac differs: source 52:54:00:00:00:01, destination 52:54:00:00:00:02"),
    ({"config": VmConfig(machine=CFG.machine, smp=CFG.smp, memory=CFG.memory, devices=(
        DeviceConfig(driver="virtio-net-pci", id="net0", bus="pcie.0", addr=0x4 << 3,
                     mac="52:54:00:00:00:01"),))},
     "device 'net0' addr differs: source 0x3.0, destination 0x4.0"),
    ({"config": VmConfig(machine=CFG.machine, smp=CpuTopology(), memory=CFG.memory, devices=CFG.devices)},
     "smp differs"),
    ({"blockers": ("shared backend storage 'disk0'",)},
     "destination cannot take a migration with shared backend storage 'disk0'"),
])
def test_each_compatibility_rule_is_refused_by_the_destination(tmp_path, log, dst_kw, expected):
    src = InTestVm()
    cfg = dst_kw.pop("config", CFG)
    dst = InTestVm(cfg, state=RunState.PRELAUNCH, **dst_kw)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    state = migrate_once(src, d.address, log)
    assert d.join() is False and dst.exit_code == 1
    assert state.status is MigrationStatus.FAILED and expected in state.error
    assert_source_intact(src)


def test_exclusion_rules_refuse_migrate_before_anything_starts(log):
    cfg = VmConfig(machine=CFG.machine, memory=CFG.memory,
                   devices=(DeviceConfig(driver="virtio-balloon-pci", id="balloon0"),))
    svc, state = source_service(InTestVm(cfg), log)
    with pytest.raises(MigrationError, match="live migration is not possible with balloon device 'balloon0'"):
        svc.migrate("unix:/nonexistent.sock")
    svc2, state2 = source_service(InTestVm(blockers=("vhost-user-net device 'vu0'",)), log)
    with pytest.raises(MigrationError, match="vhost-user-net device 'vu0'"):
        svc2.migrate("tcp:127.0.0.1:1")
    assert state.status is MigrationStatus.NONE and state2.status is MigrationStatus.NONE


def test_migrate_refuses_bad_uris_and_states(log):
    svc, _ = source_service(InTestVm(), log)
    with pytest.raises(InvalidArgumentError):
        svc.migrate("file:/tmp/x")
    with pytest.raises(InvalidArgumentError):
        svc.migrate("exec:cat")
    svc2, _ = source_service(InTestVm(state=RunState.PRELAUNCH), log)
    with pytest.raises(InvalidStateError, match="prelaunch"):
        svc2.migrate("unix:/x")


def test_unreachable_destination_fails_and_source_keeps_running(tmp_path, log):
    src = InTestVm()
    state = migrate_once(src, f"unix:{tmp_path}/nobody.sock", log)
    assert state.status is MigrationStatus.FAILED
    assert state.error.startswith(f"cannot connect to unix:{tmp_path}/nobody.sock")
    assert_source_intact(src)


def test_second_migrate_while_one_runs_is_refused(tmp_path, log):
    src = InTestVm()
    fill(src, 1.0)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts, never answers HELLO
    srv.bind(str(tmp_path / "silent.sock"))
    srv.listen(1)
    svc, state = source_service(src, log, cancel_grace=0.2)
    svc.migrate(f"unix:{tmp_path}/silent.sock")
    with pytest.raises(InvalidStateError, match="already in progress"):
        svc.migrate(f"unix:{tmp_path}/silent.sock")
    assert svc.migrate_cancel() == {}
    finish(svc)
    assert state.status is MigrationStatus.CANCELLED
    assert_source_intact(src)
    srv.close()


# --- cancel -----------------------------------------------------------------------------------


class GatedFactory(SocketChannelFactory):
    """Channels that stop at the first send whose frame type is ``gate_type`` (after ``skip``
    such sends) until released."""

    def __init__(self, gate_type: int, skip: int = 0):
        self.gate_type, self.skip = gate_type, skip
        self.reached, self.release = threading.Event(), threading.Event()

    def connect(self, uri, timeout):
        ch = super().connect(uri, timeout)
        factory = self
        real_send = ch.send

        def send(buffers):
            first = bytes(memoryview(buffers[0])[:1])
            if first and first[0] == factory.gate_type and not factory.reached.is_set():
                if factory.skip:
                    factory.skip -= 1
                else:
                    factory.reached.set()
                    assert factory.release.wait(30)
            real_send(buffers)

        ch.send = send
        return ch


def _cancel_at(tmp_path, log, gate: GatedFactory, src: InTestVm):
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    svc, state = source_service(src, log, factory=gate, downtime_limit=0.0, max_rounds=3)
    svc.migrate(d.address)
    assert gate.reached.wait(30)
    assert svc.migrate_cancel() == {}
    gate.release.set()
    finish(svc)
    return svc, state, d, dst


def test_cancel_mid_transfer(tmp_path, log):
    src = InTestVm()
    fill(src, 1.0)
    guest = Guest(src)
    guest.start()
    try:
        _, state, d, dst = _cancel_at(tmp_path, log, GatedFactory(proto.PAGES, skip=3), src)
        assert state.status is MigrationStatus.CANCELLED
        assert state.query_migrate_info() == {"status": "cancelled"}
        assert_source_intact(src)
        writes = guest.writes
        time.sleep(0.05)
        assert guest.writes > writes  # the guest still runs
    finally:
        guest.stop()
    assert d.join() is False
    assert dst.exit_code == 0 and d.state.status is MigrationStatus.CANCELLED
    assert "migration cancelled by source" in log.lines


def test_cancel_during_the_final_pass_resumes_the_source(tmp_path, log):
    src = InTestVm()
    fill(src, 0.2)
    _, state, d, dst = _cancel_at(tmp_path, log, GatedFactory(proto.STATE), src)
    assert state.status is MigrationStatus.CANCELLED
    assert_source_intact(src)  # it had been paused for the final pass
    assert src.device_calls == ["pause", "resume"]
    assert d.join() is False and dst.exit_code == 0


def test_cancel_after_the_point_of_no_return_is_a_no_op(tmp_path, log):
    src = InTestVm()
    fill(src, 0.2)
    _, state, d, dst = _cancel_at(tmp_path, log, GatedFactory(proto.COMPLETE), src)
    assert state.status is MigrationStatus.COMPLETED and src.exit_code == 0
    assert d.join() is True and dst.run_state is RunState.RUNNING


def test_cancel_when_the_destination_stops_reading(tmp_path, log):
    src = InTestVm()
    fill(src, 1.0)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / "stuck.sock"))
    srv.listen(1)

    def stuck():
        conn, _ = srv.accept()
        hdr = conn.recv(proto.FRAME_HEADER_SIZE, socket.MSG_WAITALL)
        _, n = proto.decode_frame_header(hdr)
        conn.recv(n, socket.MSG_WAITALL)
        conn.sendall(proto.encode(proto.Accept()))
        time.sleep(10)  # reads nothing more: the source blocks in send
        conn.close()

    threading.Thread(target=stuck, daemon=True).start()
    svc, state = source_service(src, log, cancel_grace=0.2)
    svc.migrate(f"unix:{tmp_path}/stuck.sock")
    deadline = time.monotonic() + 10
    while state.stats().transferred < 2 * MiB and time.monotonic() < deadline:
        time.sleep(0.01)
    svc.migrate_cancel()
    finish(svc)
    assert state.status is MigrationStatus.CANCELLED
    assert_source_intact(src)
    srv.close()


def test_migrate_cancel_without_a_migration_is_a_no_op(log):
    svc, state = source_service(InTestVm(), log)
    assert svc.migrate_cancel() == {}
    assert state.status is MigrationStatus.NONE


def test_destination_quits_while_waiting(tmp_path, log):
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    d.svc.shutdown()
    assert d.join() is False
    assert dst.exit_code is None  # quitting already; no second exit request
    assert not os.path.exists(tmp_path / "m.sock")


def test_destination_refuses_garbage(tmp_path, log):
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(tmp_path / "m.sock"))
    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    assert d.join() is False and dst.exit_code == 1
    assert "unknown message type" in d.state.error
    s.close()


def test_incoming_on_a_busy_address_fails_at_start_up(tmp_path, log):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    svc, _ = source_service(InTestVm(state=RunState.PRELAUNCH), log)
    with pytest.raises(MigrationError, match=f"cannot listen on tcp:127.0.0.1:{port}"):
        svc.listen_incoming(f"tcp:127.0.0.1:{port}")
    srv.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MigrationError, match="not a socket"):
        svc.listen_incoming(f"unix:{tmp_path}/file")


# =============================================================================================
# Snapshots
# =============================================================================================


def map_private(path: str, layout) -> tuple[GuestMemory, list[mmap.mmap]]:
    """What the host memory allocator does with backing_file: MAP_PRIVATE, regions in order."""
    fd = os.open(path, os.O_RDONLY)
    try:
        maps = [mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=off) for _, size, off in memory_file_regions(tuple(layout))]
    finally:
        os.close(fd)
    return GuestMemory([(gpa, m) for (gpa, _), m in zip(layout, maps)]), maps


def release(memory: GuestMemory, maps) -> None:
    memory.release()
    for m in maps:
        m.close()


def paused_vm(fraction=0.1, **kw) -> InTestVm:
    vm = InTestVm(state=RunState.PAUSED, **kw)
    fill(vm, fraction)
    return vm


def save(vm: InTestVm, directory, store=None) -> tuple[SnapshotService, MigrationState]:
    """Start the snapshot (it runs on a worker) and wait for its end."""
    state = MigrationState()
    svc = SnapshotService(vm, store or FileSnapshotStore(), state)
    assert svc.save(str(directory)) == {}
    assert svc.wait(30)
    return svc, state


def test_snapshot_round_trip(tmp_path):
    src = paused_vm()
    _, state = save(src, tmp_path)
    assert state.query_migrate_info() == {"status": "completed"}
    assert src.run_state is RunState.PAUSED
    # Devices paused while the state and memory were taken, resumed after.
    assert src.device_calls == ["pause", "resume"] and not src.collected_with_devices_running
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]
    st = os.stat(tmp_path / "memory")
    assert st.st_size == CFG.memory.size
    assert st.st_blocks * 512 < CFG.memory.size // 2  # zero pages are holes

    records, mem_path = load_snapshot(str(tmp_path), CFG, "test", FileSnapshotStore(),
                                      layout=layout_for(CFG.memory.size))
    assert mem_path == str(tmp_path / "memory")
    memory, maps = map_private(mem_path, layout_for(CFG.memory.size))
    dst = InTestVm(memory=memory, state=RunState.PRELAUNCH)
    dst_state = MigrationState()
    SnapshotService(dst, FileSnapshotStore(), dst_state).restore(records)
    assert dst.run_state is RunState.RUNNING and dst.vcpus_running
    assert dst.devstate == src.devstate
    assert dst.device_calls == ["resume"]  # restored queues are looked at
    assert memory_digest(dst.memory) == memory_digest(src.memory)
    assert [type(e).__name__ for e in dst.events] == ["Resumed"]
    assert dst_state.status is MigrationStatus.COMPLETED
    # copy-on-write: the guest's writes never reach the template
    dst.guest_write(0, b"\xAA" * 64)
    with open(mem_path, "rb") as f:
        assert f.read(64) == bytes(src.memory.read(0, 64))
    release(dst.memory, maps)


def test_restore_paused(tmp_path):
    src = paused_vm()
    save(src, tmp_path)
    records, mem_path = load_snapshot(str(tmp_path), CFG, "test", FileSnapshotStore())
    memory, maps = map_private(mem_path, layout_for(CFG.memory.size))
    dst = InTestVm(memory=memory, state=RunState.PRELAUNCH)
    SnapshotService(dst, FileSnapshotStore(), MigrationState()).restore(records, start=False)
    assert dst.run_state is RunState.PAUSED and not dst.vcpus_running
    release(dst.memory, maps)


def test_five_vms_from_one_template_at_once(tmp_path):
    src = paused_vm(0.3)
    save(src, tmp_path)
    want = memory_digest(src.memory)
    results: list = []

    def start(i: int) -> None:
        records, mem_path = load_snapshot(str(tmp_path), CFG, "test", FileSnapshotStore())
        memory, maps = map_private(mem_path, layout_for(CFG.memory.size))
        vm = InTestVm(memory=memory, state=RunState.PRELAUNCH)
        SnapshotService(vm, FileSnapshotStore(), MigrationState()).restore(records)
        same = memory_digest(vm.memory) == want and vm.devstate == src.devstate
        vm.guest_write(PAGE_SIZE * i, bytes([i + 1]) * 64)  # private to this VM
        results.append((i, same, vm, maps))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted((i, same) for i, same, _, _ in results) == [(i, True) for i in range(5)]
    for i, _, vm, maps in results:
        for j in range(5):
            expect = bytes([j + 1]) * 64 if i == j else bytes(src.memory.read(PAGE_SIZE * j, 64))
            assert vm.memory.read(PAGE_SIZE * j, 64) == expect
        release(vm.memory, maps)


def test_snapshot_of_a_running_vm_is_refused(tmp_path):
    vm = InTestVm()
    state = MigrationState()
    with pytest.raises(InvalidStateError) as ei:
        SnapshotService(vm, FileSnapshotStore(), state).save(str(tmp_path))
    assert str(ei.value) == "VM must be paused (run 'stop') before taking a snapshot"
    assert state.status is MigrationStatus.NONE and os.listdir(tmp_path) == []


@pytest.mark.parametrize("cfg, blocker", [
    (VmConfig(machine=CFG.machine, memory=MemoryConfig(size=16 * MiB, hugepages=True)), "huge pages"),
    (VmConfig(machine=CFG.machine, memory=MemoryConfig(size=16 * MiB, mem_share=True)), "shared memory"),
    (VmConfig(machine=CFG.machine, memory=MemoryConfig(size=16 * MiB, mem_path="/dev/hugepages")), "mem-path"),
    (VmConfig(machine=CFG.machine, memory=CFG.memory,
              devices=(DeviceConfig(driver="vfio-pci", id="vf0", host="0000:00:01.0"),)), "vfio device 'vf0'"),
])
def test_snapshot_exclusion_rules(tmp_path, cfg, blocker):
    vm = InTestVm(cfg, state=RunState.PAUSED)
    state = MigrationState()
    with pytest.raises(MigrationError, match="snapshot is not possible with") as ei:
        SnapshotService(vm, FileSnapshotStore(), state).save(str(tmp_path))
    assert blocker in str(ei.value)
    assert state.status is MigrationStatus.NONE and os.listdir(tmp_path) == []
    with pytest.raises(MigrationError, match="cannot restore a snapshot with"):
        load_snapshot(str(tmp_path), cfg, "test", FileSnapshotStore())


def _assert_failed_intact(vm: InTestVm, state: MigrationState, before, directory, reason: str) -> None:
    assert state.status is MigrationStatus.FAILED
    assert reason in state.query_migrate_info()["error-desc"]
    assert vm.run_state is RunState.PAUSED and not vm.vcpus_running
    assert (memory_digest(vm.memory), vm.devstate) == before
    if os.path.isdir(directory):
        assert not [n for n in os.listdir(directory) if ".tmp-" in n]


def _failing_save(vm: InTestVm, directory) -> MigrationState:
    """A target that cannot take a snapshot at all: refused at once by `migrate`, failed."""
    state = MigrationState()
    with pytest.raises(MigrationError, match=f"cannot write snapshot to {directory}"):
        SnapshotService(vm, FileSnapshotStore(), state).save(str(directory))
    return state


def _failing_write(vm: InTestVm, directory) -> MigrationState:
    """A write that fails on the worker: `migrate` returned {}, the job ends failed."""
    state = MigrationState()
    svc = SnapshotService(vm, FileSnapshotStore(), state)
    assert svc.save(str(directory)) == {}
    assert svc.wait(30)
    assert f"cannot write snapshot to {directory}" in state.error
    return state


def test_snapshot_to_a_missing_directory_fails_and_keeps_the_vm(tmp_path):
    vm = paused_vm()
    before = memory_digest(vm.memory), dict(vm.devstate)
    state = _failing_save(vm, tmp_path / "missing")
    _assert_failed_intact(vm, state, before, tmp_path / "missing", "No such file or directory")


def test_snapshot_without_permission_fails_and_keeps_the_vm(tmp_path):
    vm = paused_vm()
    before = memory_digest(vm.memory), dict(vm.devstate)
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    if os.geteuid() != 0:
        state = _failing_save(vm, target)
        _assert_failed_intact(vm, state, before, target, "Permission denied")
        return
    # root ignores permission bits: try the save in a child that drops to 'nobody'.
    tmp_path.chmod(0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            state = MigrationState()
            try:
                SnapshotService(vm, FileSnapshotStore(), state).save(str(target))
            except MigrationError as e:
                ok = ("Permission denied" in str(e) and state.status is MigrationStatus.FAILED
                      and vm.run_state is RunState.PAUSED
                      and (memory_digest(vm.memory), vm.devstate) == before)
                code = 0 if ok else 2
            os.write(w, str(state.query_migrate_info()).encode())
        finally:
            os._exit(code)
    os.close(w)
    report = os.read(r, 4096).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert "Permission denied" in report
    assert os.listdir(target) == []


@contextlib.contextmanager
def tiny_tmpfs(path, size: str):
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here: {e}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_snapshot_on_a_full_disk_fails_and_keeps_the_vm_and_the_old_snapshot(tmp_path):
    with tiny_tmpfs(tmp_path / "small", "4m") as small:
        first = paused_vm(0.05)
        save(first, small)
        old = (small / "state").read_bytes(), (small / "memory").read_bytes()
        vm = paused_vm(1.0)  # 16 MiB of data cannot fit
        before = memory_digest(vm.memory), dict(vm.devstate)
        state = _failing_write(vm, small)
        _assert_failed_intact(vm, state, before, small, "No space left on device")
        assert sorted(os.listdir(small)) == ["memory", "state"]
        assert ((small / "state").read_bytes(), (small / "memory").read_bytes()) == old
        records, _ = load_snapshot(str(small), CFG, "test", FileSnapshotStore())
        assert records == first.devstate


def test_snapshot_write_error_injected_mid_memory(tmp_path, monkeypatch):
    """Any OSError of the store (here EIO on the 3rd write) ends failed, leaving no file."""
    import adapters.storage.snapshot_store as store_mod
    calls = {"n": 0}
    real = os.pwrite

    def flaky(fd, data, off):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, data, off)

    monkeypatch.setattr(store_mod.os, "pwrite", flaky)
    vm = paused_vm(0.5)
    before = memory_digest(vm.memory), dict(vm.devstate)
    state = _failing_write(vm, tmp_path)
    _assert_failed_intact(vm, state, before, tmp_path, "Input/output error")
    assert os.listdir(tmp_path) == []


class GatedStore(FileSnapshotStore):
    """The real store, held at a chosen point of the write until the test opens the gate:
    at="progress" after the first chunk of memory, at="publish" just before the renames."""

    def __init__(self, at: str = "progress"):
        super().__init__(durable=False)
        self.at = at
        self.reached = threading.Event()
        self.gate = threading.Event()

    def _hold(self) -> None:
        self.reached.set()
        assert self.gate.wait(30)

    def save(self, directory, state, memory, *, progress=None, publish=None):
        held = []

        def gated_progress(data, done):
            if self.at == "progress" and data and not held:
                held.append(1)
                progress(data, done)  # the figures the QMP side sees while held
                self._hold()
            progress(data, done)

        def gated_publish():
            if self.at == "publish":
                self._hold()
            publish()

        super().save(directory, state, memory, progress=gated_progress, publish=gated_publish)


def gated_save(vm, directory, at="progress"):
    store = GatedStore(at)
    state = MigrationState()
    svc = SnapshotService(vm, store, state)
    assert svc.save(str(directory)) == {}
    assert store.reached.wait(30)
    return svc, state, store


def test_snapshot_is_written_in_the_background_with_progress(tmp_path, monkeypatch):
    import adapters.storage.snapshot_store as store_mod

    monkeypatch.setattr(store_mod, "CHUNK", 1 << 20)
    vm = paused_vm(1.0)
    svc, state, store = gated_save(vm, tmp_path)
    try:
        # save() returned while the writer is held after its first chunk
        info = state.query_migrate_info()
        assert info["status"] == "active"
        assert info["ram"]["total"] == CFG.memory.size
        assert 0 < info["ram"]["transferred"] < CFG.memory.size
        assert info["ram"]["remaining"] == CFG.memory.size - info["ram"]["transferred"]
        assert vm.run_state is RunState.SAVE_VM
        with pytest.raises(InvalidStateError, match="already in progress"):
            svc.save(str(tmp_path))
        with pytest.raises(InvalidStateError, match="cannot go from state 'save-vm' to 'running'"):
            vm.set_run_state(RunState.RUNNING)
        assert not [n for n in os.listdir(tmp_path) if not n.startswith(".")]
    finally:
        store.gate.set()
    assert svc.wait(30)
    assert state.query_migrate_info() == {"status": "completed"}
    assert vm.run_state is RunState.PAUSED
    records, _ = load_snapshot(str(tmp_path), CFG, "test", FileSnapshotStore())
    assert records == vm.devstate


@pytest.mark.parametrize("at", ["progress", "publish"])
def test_cancelled_snapshot_leaves_the_old_one_and_the_vm(tmp_path, at):
    first = paused_vm(0.2)
    save(first, tmp_path)
    old = (tmp_path / "state").read_bytes(), (tmp_path / "memory").read_bytes()
    vm = paused_vm(0.5)
    before = memory_digest(vm.memory), dict(vm.devstate)
    svc, state, store = gated_save(vm, tmp_path, at)
    mig = MigrationService(vm, SocketChannelFactory(), state)
    assert mig.migrate_cancel() == {}
    assert state.status is MigrationStatus.CANCELLING
    store.gate.set()
    assert svc.wait(30)
    assert state.query_migrate_info() == {"status": "cancelled"}
    assert vm.run_state is RunState.PAUSED and (memory_digest(vm.memory), vm.devstate) == before
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]  # no temporary file left
    assert ((tmp_path / "state").read_bytes(), (tmp_path / "memory").read_bytes()) == old


def test_cancel_after_the_point_of_no_return_is_ignored(tmp_path):
    vm = paused_vm(0.2)
    store = GatedStore("publish")
    state = MigrationState()
    svc = SnapshotService(vm, store, state)
    real_publish = []

    def late_cancel(self, directory, st, memory, *, progress=None, publish=None):
        def publish_then_cancel():
            publish()
            real_publish.append(state.request_cancel())
        return FileSnapshotStore.save(self, directory, st, memory, progress=progress,
                                      publish=publish_then_cancel)

    store.save = late_cancel.__get__(store)
    assert svc.save(str(tmp_path)) == {}
    assert svc.wait(30)
    assert real_publish == [False]
    assert state.query_migrate_info() == {"status": "completed"}
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]


def test_facade_shutdown_cancels_and_joins_the_snapshot_writer(tmp_path, log):
    from application.services.migration import MigrationFacade

    vm = paused_vm(0.5)
    store = GatedStore()
    f = MigrationFacade(vm, store=store, channels=SocketChannelFactory(), log=log)
    assert f.migrate(f"file:{tmp_path}") == {}
    assert store.reached.wait(30)
    with pytest.raises(InvalidStateError, match="already in progress"):
        f.migrate(f"unix:{tmp_path}/m.sock")
    vm.set_run_state(RunState.SHUTDOWN)  # quit
    threading.Timer(0.05, store.gate.set).start()
    f.shutdown()
    assert f.wait(0)  # joined
    assert f.query() == {"status": "cancelled"}
    assert os.listdir(tmp_path) == []


def test_snapshot_again_after_completion_and_after_failure(tmp_path):
    vm = paused_vm()
    (tmp_path / "a").mkdir()
    svc, state = save(vm, tmp_path / "a")
    with pytest.raises(MigrationError):
        svc.save(str(tmp_path / "missing"))
    assert state.status is MigrationStatus.FAILED
    (tmp_path / "b").mkdir()
    assert svc.save(str(tmp_path / "b")) == {}
    assert svc.wait(30)
    assert state.status is MigrationStatus.COMPLETED


def test_dispatch_routes_file_and_sockets(tmp_path, log):
    vm = paused_vm()
    state = MigrationState()
    snap = SnapshotService(vm, FileSnapshotStore(), state)
    mig = MigrationService(vm, SocketChannelFactory(), state, log)
    assert dispatch_migrate(f"file:{tmp_path}", {}, snapshot=snap, migration=mig) == {}
    assert snap.wait(30)
    assert state.status is MigrationStatus.COMPLETED and (tmp_path / "state").exists()
    with pytest.raises(InvalidArgumentError, match="verify"):
        dispatch_migrate(f"unix:{tmp_path}/x", {"verify": "yes"}, snapshot=snap, migration=mig)
    with pytest.raises(InvalidArgumentError):
        dispatch_migrate("ftp:x", {}, snapshot=snap, migration=mig)


# --- refused restores -------------------------------------------------------------------------


@pytest.fixture
def template(tmp_path):
    src = paused_vm()
    save(src, tmp_path)
    return tmp_path


def _load(directory, cfg=CFG, kind="test", layout=None):
    return load_snapshot(str(directory), cfg, kind, FileSnapshotStore(), layout=layout)


def test_restore_refuses_a_corrupt_state_file(template):
    data = bytearray((template / "state").read_bytes())
    data[len(data) // 2] ^= 0x40
    (template / "state").write_bytes(bytes(data))
    with pytest.raises(SnapshotFormatError, match="checksum mismatch"):
        _load(template)


def test_restore_refuses_a_truncated_state_file(template):
    data = (template / "state").read_bytes()
    (template / "state").write_bytes(data[:-7])
    with pytest.raises(SnapshotFormatError, match="truncated"):
        _load(template)


def test_restore_refuses_a_foreign_state_file(template):
    (template / "state").write_bytes(b"QEVM" + bytes(1000))
    with pytest.raises(SnapshotFormatError, match="bad magic"):
        _load(template)


def test_restore_refuses_an_oversized_state_file_without_reading_it(template):
    with open(template / "state", "r+b") as f:
        f.truncate(65 << 20)  # sparse: nothing is read
    with pytest.raises(SnapshotFormatError, match="at most"):
        _load(template)


def test_restore_refuses_a_truncated_memory_file(template):
    os.truncate(template / "memory", CFG.memory.size - PAGE_SIZE)
    with pytest.raises(SnapshotFormatError, match="memory file .* has 16773120 bytes, the state file expects 16777216"):
        _load(template)


def test_restore_refuses_missing_files(template, tmp_path):
    with pytest.raises(MigrationError, match="No such file or directory"):
        _load(tmp_path / "nowhere")
    os.unlink(template / "memory")
    with pytest.raises(MigrationError, match="memory file"):
        _load(template)


def test_restore_refuses_another_configuration(template):
    other = VmConfig(machine=CFG.machine, smp=CFG.smp, memory=MemoryConfig(size=32 * MiB), devices=CFG.devices)
    with pytest.raises(IncompatibleConfigError, match="memory size differs: source 16777216, destination 33554432"):
        _load(template, cfg=other)


def test_restore_refuses_another_hypervisor(template):
    with pytest.raises(SnapshotFormatError, match="hypervisor 'test', this VM uses 'kvm'"):
        _load(template, kind="kvm")


def test_restore_refuses_another_layout(template):
    with pytest.raises(IncompatibleConfigError, match="memory layout differs"):
        _load(template, layout=[(0, CFG.memory.size)])


def test_restore_refuses_records_that_do_not_fit(template):
    records, mem_path = _load(template)
    memory, maps = map_private(mem_path, layout_for(CFG.memory.size))
    vm = InTestVm(memory=memory, state=RunState.PRELAUNCH)
    state = MigrationState()
    del records["vcpu.1"]
    with pytest.raises(IncompatibleConfigError):
        SnapshotService(vm, FileSnapshotStore(), state).restore(records)
    assert state.status is MigrationStatus.FAILED and not vm.vcpus_running
    release(vm.memory, maps)


# =============================================================================================
# Adapters
# =============================================================================================


def anon(size: int) -> mmap.mmap:
    """Guest RAM as the host allocator maps it: private anonymous (mmap(-1) alone is shared)."""
    return mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def test_pagemap_scanner_matches_the_pure_scan_and_skips_untouched_pages():
    size = 8 * MiB
    m = anon(size)
    view = memoryview(m)
    rng = random.Random(4)
    for _ in range(100):
        off = rng.randrange(size)
        m[off] = rng.randrange(1, 256)
    m[3 * PAGE_SIZE: 4 * PAGE_SIZE]  # noqa: B018 - a read maps the zero page (present, zero)
    view[5 * PAGE_SIZE] = 0  # written zero: populated but zero
    scanner = PagemapZeroScanner()
    try:
        populated = scanner.populated_runs(view)
        if populated is None and not os.path.exists("/proc/self/pagemap"):
            pytest.skip("/proc/self/pagemap is missing")
        assert populated is not None
        assert sum(n for _, n in populated) < size // 4
        assert scanner(view) == nonzero_runs(view)
        small = view[:PAGE_SIZE * 4]
        assert scanner.populated_runs(small) is None and scanner(small) == nonzero_runs(small)
        small.release()
        shared = mmap.mmap(-1, size)  # shared anonymous: absent pages may sit in swap
        assert scanner.populated_runs(memoryview(shared)) is None
        shared.close()
    finally:
        scanner.close()
        view.release()
        m.close()


def test_pagemap_scanner_falls_back_for_file_backed_memory(tmp_path):
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(3 * MiB)
        f.write(b"\x01")
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 4 * MiB, flags=mmap.MAP_PRIVATE)
    os.close(fd)
    view = memoryview(m)
    scanner = PagemapZeroScanner()
    try:
        assert scanner.populated_runs(view) is None  # not anonymous: pages may hold file data
        assert scanner(view) == [(3 * MiB, PAGE_SIZE)]
    finally:
        scanner.close()
        view.release()
        m.close()


def test_snapshot_store_with_the_pagemap_scanner(tmp_path):
    size = 8 * MiB
    maps = [anon(size // 2), anon(size // 2)]
    memory = GuestMemory([(0, maps[0]), (1 << 32, maps[1])])
    memory.write(12345, b"hello")
    memory.write((1 << 32) + 3 * MiB, b"world")
    cfg = VmConfig(machine=CFG.machine, smp=CFG.smp, memory=MemoryConfig(size=size), devices=CFG.devices)
    vm = InTestVm(cfg, memory=memory, state=RunState.PAUSED)
    scanner = PagemapZeroScanner()
    save(vm, tmp_path, FileSnapshotStore(scanner))
    data = (tmp_path / "memory").read_bytes()
    assert data[12345:12350] == b"hello" and data[size // 2 + 3 * MiB: size // 2 + 3 * MiB + 5] == b"world"
    assert data.count(0) == len(data) - 10
    scanner.close()
    memory.release()
    for m in maps:
        m.close()


def test_channel_sends_more_buffers_than_iov_max(tmp_path):
    a, b = socket.socketpair()
    from adapters.migration.channels import SocketChannel
    ch = SocketChannel(a)
    bufs = [bytes([i % 251]) * (i % 7 + 1) for i in range(3000)]
    want = b"".join(bufs)
    got = bytearray()

    def reader():
        while len(got) < len(want):
            chunk = b.recv(65536)
            if not chunk:
                break
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    ch.send(bufs)
    t.join(10)
    assert bytes(got) == want
    ch.abort()
    ch.close()
    ch.close()
    b.close()


def test_facade_drives_snapshot_migration_and_incoming(tmp_path, log):
    from application.services.migration import MigrationFacade

    src = InTestVm(state=RunState.PAUSED)
    fill(src, 0.2)
    f = MigrationFacade(src, store=FileSnapshotStore(), channels=SocketChannelFactory(), log=log)
    assert f.query() == {"status": "none"}
    assert f.migrate(f"file:{tmp_path}") == {}
    assert f.wait(30)
    assert f.query() == {"status": "completed"}
    with pytest.raises(InvalidArgumentError, match="'blk' is not supported"):
        f.migrate(f"file:{tmp_path}", blk=True)
    with pytest.raises(InvalidArgumentError, match="unexpected migrate argument"):
        f.migrate(f"file:{tmp_path}", bogus=True)
    assert f.migrate(f"file:{tmp_path}", blk=False, inc=False, resume=False) == {}  # QEMU's flags, off
    assert f.wait(30) and f.query() == {"status": "completed"}

    dst = InTestVm(state=RunState.PRELAUNCH)
    g = MigrationFacade(dst, store=FileSnapshotStore(), channels=SocketChannelFactory(), log=log)
    address = g.incoming("tcp:127.0.0.1:0")
    assert address.startswith("tcp:127.0.0.1:") and not address.endswith(":0")
    src.set_run_state(RunState.RUNNING)
    src.resume_vcpus()
    assert f.migrate(address, verify=True, detach=True) == {}
    assert f.migration.wait(30)
    assert f.query()["status"] == "completed"
    g._incoming.join(30)
    assert g.query() == {"status": "completed"} and dst.run_state is RunState.RUNNING
    assert memory_digest(dst.memory) == memory_digest(src.memory)
    assert f.cancel() == {}  # nothing to cancel any more


def test_progress_is_logged_during_transfers(tmp_path, log):
    src = InTestVm()
    fill(src, 0.5)
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    migrate_once(src, d.address, log, progress_interval=0.0, batch_bytes=256 << 10)
    assert d.join()
    progress = [line for line in log.lines if line.startswith("migration: round")]
    assert len(progress) >= 8 and "MiB sent" in progress[-1] and "Mbps" in progress[-1]


class FailingStateVm(InTestVm):
    def collect_state(self):
        from domain.errors import HypervisorError
        raise HypervisorError("KVM_GET_LAPIC failed: Input/output error")


def migrate_filled(src, tmp_path, log):
    """Write a tenth of src's RAM and migrate it to a fresh destination over a unix socket:
    (the source's MigrationState, the Destination, its VM)."""
    fill(src, 0.1)
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    return migrate_once(src, d.address, log), d, dst


def test_failure_after_the_pause_resumes_the_source(tmp_path, log):
    src = FailingStateVm()
    state, d, dst = migrate_filled(src, tmp_path, log)
    assert state.status is MigrationStatus.FAILED and "KVM_GET_LAPIC" in state.error
    assert_source_intact(src)
    assert src.device_calls == ["pause", "resume"]
    assert d.join() is False and dst.exit_code == 1
    assert "KVM_GET_LAPIC" in d.state.error  # the source told the destination why


class MovingDeviceVm(InTestVm):
    """A device whose state still changes after the pause, `moves` times (then it holds)."""

    def __init__(self, moves, **kw):
        super().__init__(**kw)
        self.moves = moves
        self.collections = 0

    def collect_device_state(self):
        self.collections += 1
        if self.moves:
            self.moves -= 1
            self.devstate["dev.net0"] = (1, os.urandom(32))
        return super().collect_device_state()


def test_a_device_that_moves_after_the_pause_is_collected_again(tmp_path, log):
    src = MovingDeviceVm(moves=2)
    state, d, dst = migrate_filled(src, tmp_path, log)
    assert state.status is MigrationStatus.COMPLETED, state.error
    assert d.join() is True
    assert src.collections == 3  # moved, moved, held
    assert dst.devstate == src.devstate  # the last device state, the first vCPU records
    assert sum("a device moved during the final pass" in line for line in log.lines) == 2


def test_a_device_that_never_holds_still_fails_the_migration(tmp_path, log):
    src = MovingDeviceVm(moves=1000)
    state, d, dst = migrate_filled(src, tmp_path, log)
    assert state.status is MigrationStatus.FAILED and "did not settle" in state.error
    assert_source_intact(src)
    assert d.join() is False and dst.exit_code == 1


class BadDirtyLogVm(InTestVm):
    def dirty_pages(self):
        super().dirty_pages()
        return [1 << 40]


def test_a_dirty_page_outside_guest_ram_fails_the_migration(tmp_path, log):
    src = BadDirtyLogVm()
    dst = InTestVm(state=RunState.PRELAUNCH)
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    state = migrate_once(src, d.address, log, downtime_limit=0.0, max_rounds=2)
    assert state.status is MigrationStatus.FAILED and "outside guest RAM" in state.error
    assert_source_intact(src)
    assert d.join() is False


def test_destination_refuses_state_that_does_not_fit(tmp_path, log):
    src = InTestVm()
    dst = InTestVm(state=RunState.PRELAUNCH)
    dst.devstate["vcpu.2"] = (2, b"")  # the destination expects a record the source lacks
    d = Destination(dst, f"unix:{tmp_path}/m.sock", log)
    state = migrate_once(src, d.address, log)
    assert state.status is MigrationStatus.FAILED
    assert state.error.startswith("destination could not load the migration: cannot apply the VM state")
    assert_source_intact(src)
    assert d.join() is False and dst.exit_code == 1 and dst.run_state is RunState.INMIGRATE


def test_incoming_on_every_address(log):
    svc, _ = source_service(InTestVm(state=RunState.PRELAUNCH), log)
    address = svc.listen_incoming("tcp::0")
    assert address.startswith("tcp:0.0.0.0:") or address.startswith("tcp:[::]:")
    svc.shutdown()


def test_the_memory_digest_reads_no_page_the_host_never_populated():
    """x-query-memory-digest hashes unpopulated pages as zeros without reading them: a read
    would map the zero page there, which a later snapshot or migration must then scan."""
    import hashlib

    from adapters.host.memory import MmapAllocator
    from application.guest_test_control import GuestTestControl

    alloc = MmapAllocator()
    mem = alloc.allocate([(0, 8 * MiB), (1 << 32, 4 * MiB)])
    scanner = PagemapZeroScanner()
    try:
        rng = random.Random(5)
        for r in mem.regions:
            for _ in range(20):
                off = rng.randrange(r.size // PAGE_SIZE) * PAGE_SIZE
                r.view[off:off + 64] = rng.randbytes(64)
        before = [scanner.populated_runs(r.view) for r in mem.regions]
        if before[0] is None:
            pytest.skip("/proc/self/pagemap is not readable here")
        ctl = GuestTestControl(SimpleNamespace(memory=mem), populated_runs=scanner.populated_runs)
        digest = ctl.memory_digest()["sha256"]
        assert [scanner.populated_runs(r.view) for r in mem.regions] == before  # nothing mapped
        plain = hashlib.sha256()
        for r in mem.regions:
            plain.update(r.view)
        assert digest == plain.hexdigest()
        # Without the scanner (or where it cannot tell), every page is read: the same digest.
        assert GuestTestControl(SimpleNamespace(memory=mem)).memory_digest()["sha256"] == digest
    finally:
        scanner.close()
        alloc.free(mem)
