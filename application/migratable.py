"""What the snapshot and migration services need from a running VM.

The VM aggregate (application/vm.py) implements this; the snapshot/migration engine
(application/services/snapshot.py, migration.py) only talks to it through this Protocol, so the
engine is hypervisor-independent: the fake and KVM plug in their own vCPU/irqchip/device state.
"""

from __future__ import annotations

import threading
from typing import Iterable, Protocol

from domain.config import VmConfig
from domain.devices.virtio.queue import used_ring_size
from domain.events import DomainEvent
from domain.lifecycle import RunState
from domain.memory import PAGE_SIZE, GuestMemory


class MigratableVm(Protocol):
    config: VmConfig
    memory: GuestMemory

    @property
    def hypervisor_kind(self) -> str:
        """"kvm" or "test"; a snapshot or stream from another kind is refused."""

    @property
    def run_state(self) -> RunState: ...

    def set_run_state(self, state: RunState) -> None:
        """Lifecycle transition without touching vCPUs (e.g. inmigrate -> running bookkeeping)."""

    def pause_vcpus(self) -> None:
        """Park every vCPU out of the hypervisor (no STOP event: migration's own pause)."""

    def resume_vcpus(self) -> None: ...

    def pause_devices(self) -> None:
        """No device starts new work and none has a request in flight (notifications arriving
        meanwhile are kept): guest RAM and device state hold still for a final pass or a
        snapshot."""

    def resume_devices(self) -> None:
        """Undo pause_devices, processing what was notified while paused (a restored VM looks
        at every active queue)."""

    def collect_state(self) -> dict[str, tuple[int, bytes]]:
        """Every component's state, vCPUs paused: name -> (record version, payload bytes).
        Names: "machine", "vm" (irqchip/pit/clock), "vcpu.N", "dev.<id>"."""

    def collect_device_state(self) -> dict[str, tuple[int, bytes]]:
        """The "dev.<id>" records of collect_state alone (the final pass's settle check takes
        them again to prove the paused devices hold still)."""

    def apply_state(self, records: dict[str, tuple[int, bytes]]) -> None:
        """Inverse of collect_state on a VM built from the same configuration. Raises
        IncompatibleConfigError / SnapshotFormatError on anything that does not fit."""

    def migration_blockers(self) -> list[str]:
        """Devices/features in use that forbid snapshot and migration (the manual's list:
        vhost-net, vhost-user-net, vfio, balloon, huge pages, mem-share, mem-path), each as a
        short name such as "balloon device 'balloon0'". Empty when allowed."""

    def start_dirty_log(self) -> None: ...

    def dirty_pages(self) -> Iterable[int]:
        """Guest-physical addresses of pages written since the previous call (or since
        start_dirty_log), clearing the log: by the guest and by the VMM's devices (once
        collect_state quiesced them, their last writes included)."""

    def stop_dirty_log(self) -> None: ...

    def emit(self, event: DomainEvent) -> None: ...

    def request_exit(self, code: int = 0) -> None:
        """End the VMM process cleanly (source after a completed migration)."""


class HostWriteLog:
    """Guest pages the VMM itself may write while a live migration runs.

    KVM's dirty log sees only the guest's own writes. Devices write guest RAM from the host
    side (data of reads, status bytes, used rings), and a page they write after it was sent
    would reach the destination stale: a guest whose used ring went back in time reaps
    requests that never completed. While it is installed, GuestMemory reports every range it
    hands out for writing (track_host_writes). The virtqueue rings are views taken once at
    activation, so their pages are added from the device state (add_rings).

    A view is recorded when it is handed out, but written when its request completes, maybe
    after a round read the log. So the pages of every view stay suspect until the devices are
    quiesced: after final(), take() returns every page recorded since the start.
    """

    def __init__(self, memory: GuestMemory):
        self._memory = memory
        self._lock = threading.Lock()
        self._pages: set[int] = set()  # recorded since the last take()
        self._all: set[int] = set()  # recorded since the start
        self._final = False  # the next take() returns _all
        self._finalised = False
        memory.track_host_writes(self.add)

    def add(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first, last = gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE
        pages = range(first * PAGE_SIZE, (last + 1) * PAGE_SIZE, PAGE_SIZE)
        with self._lock:
            self._pages.update(pages)
            self._all.update(pages)

    def add_rings(self, state: object) -> None:
        """Every virtqueue found in a device state tree (dicts with used, size, ready)."""
        if isinstance(state, dict):
            if {"used", "size", "ready"} <= state.keys() and state.get("ready"):
                self.add(state["used"], used_ring_size(state["size"]))
            for v in state.values():
                self.add_rings(v)
        elif isinstance(state, (list, tuple)):
            for v in state:
                self.add_rings(v)

    def final(self) -> None:
        """The devices are quiesced: the next take() returns every page recorded so far (not
        again after that: later collections only add what devices did since)."""
        with self._lock:
            if not self._finalised:
                self._final = self._finalised = True

    def take(self) -> set[int]:
        """Pages recorded since the previous take; the first one after final(): all of them."""
        with self._lock:
            if self._final:
                self._final = False
                self._pages = set(self._all)
            pages, self._pages = self._pages, set()
        return pages

    def close(self) -> None:
        self._memory.track_host_writes(None)
