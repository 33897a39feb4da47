"""What the snapshot and migration services need from a running VM.

The VM aggregate (application/vm.py) implements this; the snapshot/migration engine
(application/services/snapshot.py, migration.py) only talks to it through this Protocol, so the
engine is hypervisor-independent: the fake and KVM plug in their own vCPU/irqchip/device state.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from domain.config import VmConfig
from domain.events import DomainEvent
from domain.lifecycle import RunState
from domain.memory import GuestMemory


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

    def collect_state(self) -> dict[str, tuple[int, bytes]]:
        """Every component's state, vCPUs paused: name -> (record version, payload bytes).
        Names: "machine", "vm" (irqchip/pit/clock), "vcpu.N", "dev.<id>"."""

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
        start_dirty_log), clearing the log."""

    def stop_dirty_log(self) -> None: ...

    def emit(self, event: DomainEvent) -> None: ...

    def request_exit(self, code: int = 0) -> None:
        """End the VMM process cleanly (source after a completed migration)."""
