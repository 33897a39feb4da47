"""The VM aggregate: memory, the hypervisor VM, vCPU runners, devices and the run state.

It owns the lifecycle transitions and the events they emit; the services (application/services)
are thin use cases over it. Implements application.migratable.MigratableVm.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterable, Iterator

from domain.config import VmConfig
from domain.cpu_state import VcpuSetup
from domain.errors import HypervisorError, InvalidStateError
from domain.events import DomainEvent, Resumed, ShutdownEvent, Stopped
from domain.lifecycle import Lifecycle, RunState
from domain.memory import GuestMemory, bitmap_pages
from domain.ports import EventSink, Hypervisor, HvVm, MemoryAllocator
from domain.topology import cpu_slots

from application.devices import DeviceManager
from application.vcpu import VcpuRunner

log = logging.getLogger("pystrato.vm")


class VirtualMachine:
    def __init__(self, config: VmConfig, *, hypervisor: Hypervisor, allocator: MemoryAllocator,
                 events: EventSink, devices: DeviceManager,
                 request_exit: Callable[[int], None], memory_file: str | None = None):
        self.config = config
        self._hypervisor = hypervisor
        self._allocator = allocator
        self._events = events
        self.devices = devices
        self._request_exit = request_exit
        self._memory_file = memory_file
        self.lifecycle = Lifecycle()
        self.cpus = cpu_slots(config.smp)
        self.memory: GuestMemory | None = None
        self.hv_vm: HvVm | None = None
        self.runners: list[VcpuRunner] = []
        self._lock = threading.RLock()  # serialises lifecycle operations
        self._dirty_logging = False
        self._host_writes = None  # HostWriteLog while a live migration runs
        self._shutting_down = False

    # --- construction ----------------------------------------------------------------------------

    @property
    def hypervisor_kind(self) -> str:
        return self._hypervisor.kind

    def build(self) -> None:
        from domain.boot.layout import ram_layout

        cfg = self.config
        online = [c for c in self.cpus if c.online]
        if len(online) > self._hypervisor.max_vcpus():
            raise HypervisorError(f"-smp: {len(online)} vCPUs requested, the hypervisor allows {self._hypervisor.max_vcpus()}")
        self.memory = self._allocator.allocate(ram_layout(cfg.memory.size), self._memory_file, cfg.memory)
        self.hv_vm = self._hypervisor.create_vm()
        for r in self.memory.regions:
            self.hv_vm.set_memory_region(r.slot, r.gpa, r.view)
        self.hv_vm.create_irqchip()
        self.devices.realize(self.memory, self.hv_vm, self)
        topo = cfg.smp
        for slot in online:
            vcpu = self.hv_vm.create_vcpu(slot.index)
            vcpu.setup(VcpuSetup(
                index=slot.index, apic_id=slot.apic_id, nr_vcpus=len(online),
                threads_per_core=topo.threads, cores_per_socket=topo.cores * topo.clusters * topo.dies,
                hidden_features=cfg.machine.hidden_cpu_features))
            self.runners.append(VcpuRunner(
                vcpu, self.devices.pio, self.devices.mmio,
                on_reset=self._guest_reset, on_poweroff=self._guest_poweroff,
                on_error=self._internal_error))
        if self._memory_file is None and cfg.incoming is None:
            self.devices.load_guest(self.memory, [r.vcpu for r in self.runners], len(online))

    def start(self, initial: RunState | None = RunState.RUNNING) -> None:
        """Start vCPU threads, parked; they run once the state is running. ``None`` leaves the
        state to the caller (incoming migration, snapshot restore)."""
        for r in self.runners:
            r.start()
        self.devices.start()
        if initial is None:
            return
        self.lifecycle.transition(initial)
        if initial is RunState.RUNNING:
            for r in self.runners:
                r.resume()

    # --- lifecycle (QMP) --------------------------------------------------------------------------

    @property
    def run_state(self) -> RunState:
        return self.lifecycle.state

    def set_run_state(self, state: RunState) -> None:
        with self._lock:
            self.lifecycle.transition(state)

    def stop(self) -> None:
        with self._lock:
            st = self.lifecycle.state
            # As QEMU: stopping vCPUs that do not run is a no-op (a snapshot being written, a
            # migration's final pass), not an error.
            if st in (RunState.PAUSED, RunState.SAVE_VM, RunState.FINISH_MIGRATE):
                return
            if st is not RunState.RUNNING:
                raise InvalidStateError(f"VM is not running (state '{st.value}')")
            self.pause_vcpus()
            # As QEMU stops its device emulation: no request in flight or newly taken writes
            # guest RAM while the VM is stopped (pmemsave, a snapshot see a still guest).
            self.pause_devices()
            self.lifecycle.transition(RunState.PAUSED)
            self.emit(Stopped())

    def cont(self) -> None:
        with self._lock:
            st = self.lifecycle.state
            if st is RunState.RUNNING:
                return
            if st is RunState.INMIGRATE:
                raise InvalidStateError("Migration is not complete: the VM cannot be resumed yet")
            if st not in (RunState.PAUSED, RunState.PRELAUNCH, RunState.POSTMIGRATE):
                raise InvalidStateError(f"VM cannot be resumed from state '{st.value}'")
            if st is RunState.PAUSED and self.devices.devices_paused:
                self.resume_devices()  # the pause `stop` took
            self.lifecycle.transition(RunState.RUNNING)
            self.emit(Resumed())
            self.resume_vcpus()

    @contextlib.contextmanager
    def guest_running(self) -> Iterator[None]:
        """Hold the lifecycle lock while the guest runs: what the fake guest does on request
        (x-guest-touch) cannot overlap a pause (stop, or migration's final pass), just as a
        paused guest cannot write its memory."""
        with self._lock:
            st = self.lifecycle.state
            if st is not RunState.RUNNING:
                raise InvalidStateError(f"the guest is not running (state '{st.value}')")
            yield

    def pause_vcpus(self, timeout: float = 5.0) -> None:
        # Kick them all, then wait: the vCPUs leave the hypervisor together, not one by one.
        for r in self.runners:
            r.request_pause()
        deadline = time.monotonic() + timeout
        stuck = [r.index for r in self.runners
                 if not r.wait_parked(max(0.0, deadline - time.monotonic()))]
        if stuck:
            raise HypervisorError(f"vCPU(s) {stuck} did not stop")

    def resume_vcpus(self) -> None:
        for r in self.runners:
            r.resume()

    def pause_devices(self) -> None:
        """Devices start no new work and finish what is in flight (after pause_vcpus: nothing
        then writes guest RAM or changes device state until resume_devices)."""
        self.devices.pause_devices()

    def resume_devices(self) -> None:
        """Devices take work again, first the queues notified while paused (after apply_state:
        every active queue)."""
        self.devices.resume_devices()

    def shutdown(self, *, guest: bool, reason: str, code: int = 0) -> None:
        """Tear down and end the process; SHUTDOWN is the last event clients see."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
        log.info("shutdown: guest=%s reason=%s", guest, reason)
        me = threading.current_thread()
        for r in self.runners:
            if r._thread is not me:
                r.stop()
        try:
            self.lifecycle.transition(RunState.SHUTDOWN)
        except InvalidStateError:
            pass
        self.emit(ShutdownEvent(guest=guest, reason=reason))
        self._request_exit(code)

    def release(self) -> None:
        """Free host resources after shutdown (backends, memory, hypervisor VM)."""
        self.devices.close()
        if self.hv_vm is not None:
            self.hv_vm.close()
        if self.memory is not None:
            self._allocator.free(self.memory)
            self.memory = None

    def _guest_reset(self) -> None:
        threading.Thread(target=self.shutdown, kwargs=dict(guest=True, reason="guest-reset"),
                         daemon=True).start()

    def _guest_poweroff(self) -> None:
        threading.Thread(target=self.shutdown, kwargs=dict(guest=True, reason="guest-shutdown"),
                         daemon=True).start()

    def _internal_error(self, why: str) -> None:
        log.error("internal error: %s", why)
        try:
            self.lifecycle.transition(RunState.INTERNAL_ERROR)
        except InvalidStateError:
            pass

    # --- events ----------------------------------------------------------------------------------

    def emit(self, event: DomainEvent) -> None:
        self._events.emit(event)

    def request_exit(self, code: int = 0) -> None:
        self._request_exit(code)

    # --- snapshot / migration (application.migratable.MigratableVm) ------------------------------

    def collect_state(self) -> dict[str, tuple[int, bytes]]:
        from domain.state_codec import encode_state

        records: dict[str, tuple[int, bytes]] = {}
        records["vm"] = (1, encode_state(self.hv_vm.save_state()))
        for r in self.runners:
            records[f"vcpu.{r.index}"] = (1, encode_state(r.vcpu.save_state()))
        records.update(self.collect_device_state())
        return records

    def collect_device_state(self) -> dict[str, tuple[int, bytes]]:
        from domain.state_codec import encode_state

        records: dict[str, tuple[int, bytes]] = {}
        host_writes = self._host_writes
        for name, (version, state) in self.devices.save_states().items():
            if host_writes is not None:  # the rings the quiesced devices last wrote
                host_writes.add_rings(state)
            records[f"dev.{name}"] = (version, encode_state(state))
        if host_writes is not None:
            host_writes.final()
        return records

    def apply_state(self, records: dict[str, tuple[int, bytes]]) -> None:
        from domain.state_codec import decode_state
        from domain.errors import IncompatibleConfigError

        want = {"vm"} | {f"vcpu.{r.index}" for r in self.runners}
        missing = sorted(want - records.keys())
        if missing:
            raise IncompatibleConfigError(f"state lacks records {missing}")
        vcpus_in_state = {k for k in records if k.startswith("vcpu.")}
        extra = sorted(vcpus_in_state - want)
        if extra:
            raise IncompatibleConfigError(f"state has vCPUs this VM lacks: {extra}")
        self.hv_vm.restore_state(decode_state(records["vm"][1]))
        for r in self.runners:
            r.vcpu.restore_state(decode_state(records[f"vcpu.{r.index}"][1]))
        devs = {k[4:]: (v, decode_state(p)) for k, (v, p) in records.items() if k.startswith("dev.")}
        self.devices.restore_states(devs)

    def migration_blockers(self) -> list[str]:
        return self.devices.migration_blockers()

    def start_dirty_log(self) -> None:
        from application.migratable import HostWriteLog

        self._host_writes = HostWriteLog(self.memory)
        for r in self.memory.regions:
            self.hv_vm.set_memory_region(r.slot, r.gpa, r.view, log_dirty=True)
        self._dirty_logging = True

    def dirty_pages(self) -> Iterable[int]:
        # Host writes first: a page a device writes after this read is caught by the next one.
        host = self._host_writes.take() if self._host_writes is not None else set()
        pages: list[int] = []
        for r in self.memory.regions:
            pages += bitmap_pages(self.hv_vm.get_dirty_log(r.slot), r.gpa)
        if host:
            host.update(pages)
            return sorted(host)
        return pages

    def stop_dirty_log(self) -> None:
        if self._host_writes is not None:
            self._host_writes.close()
            self._host_writes = None
        if self._dirty_logging:
            for r in self.memory.regions:
                self.hv_vm.set_memory_region(r.slot, r.gpa, r.view, log_dirty=False)
            self._dirty_logging = False

    # --- queries ---------------------------------------------------------------------------------

    def vcpu_info(self) -> list[dict]:
        by_index = {r.index: r for r in self.runners}
        out = []
        for c in self.cpus:
            if not c.online:
                continue
            r = by_index.get(c.index)
            tid = (r.native_id or r.vcpu.thread_id()) if r else None
            out.append({
                "CPU": c.index, "arch": "x86", "current": True,
                "halted": bool(r.halted) if r else False,
                "props": c.props(), "qom_path": c.qom_path,
                "thread_id": tid if tid is not None else 0,
            })
        return out

