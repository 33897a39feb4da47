"""CPU topology and device topology: which ids exist, where each device sits, what is free.

microvm (StratoVirt's lightweight machine): a fixed set of replaceable virtio-mmio slots,
MICROVM_MAX_BLK for virtio-blk and MICROVM_MAX_NET for virtio-net. Slot ``addr`` 0x0 maps to
vda (eth0 for NICs), 0x1 to vdb, and so on; ``lun`` N is slot N+1 (the manual: lun=0 is vdb).
Command-line devices take the lowest free slots first, so the boot disk is vda.

q35 (StratoVirt's standard machine): the root bus pcie.0 plus the pcie-root-port devices given on
the command line; a hot-plugged device goes into a root port at addr 0x0, one device per port.
"""

from __future__ import annotations

import threading

from domain.config import MICROVM, MICROVM_MAX_BLK, MICROVM_MAX_NET, CpuTopology
from domain.errors import (
    DeviceNotFoundError,
    DuplicateIdError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from domain.record import field, record

# ---------------------------------------------------------------------------------------------
# CPUs
# ---------------------------------------------------------------------------------------------


@record(frozen=True)
class CpuSlot:
    index: int
    socket_id: int
    die_id: int
    cluster_id: int
    core_id: int
    thread_id: int
    online: bool

    @property
    def apic_id(self) -> int:
        return self.index

    @property
    def qom_path(self) -> str:
        return f"/machine/unattached/device[{self.index}]"

    def props(self) -> dict:
        return {"core-id": self.core_id, "socket-id": self.socket_id, "thread-id": self.thread_id}


def cpu_slots(smp: CpuTopology) -> list[CpuSlot]:
    """Every possible vCPU (maxcpus of them); the first ``cpus`` are online at start."""
    slots = []
    for i in range(smp.maxcpus):
        thread = i % smp.threads
        core = (i // smp.threads) % smp.cores
        cluster = (i // (smp.threads * smp.cores)) % smp.clusters
        die = (i // (smp.threads * smp.cores * smp.clusters)) % smp.dies
        socket = i // (smp.threads * smp.cores * smp.clusters * smp.dies)
        slots.append(CpuSlot(i, socket, die, cluster, core, thread, online=i < smp.cpus))
    return slots


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

BLK = "blk"
NET = "net"


def parse_addr(value) -> int:
    """QMP/command-line ``addr``: an int or a string "0x1", "1", "0x1.0x0" (slot.function)."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"invalid addr {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"invalid addr {value}")
        return value
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"invalid addr {value!r}")
    slot_s, _, func_s = value.partition(".")
    try:
        slot = int(slot_s, 0)
        func = int(func_s, 0) if func_s else 0
    except ValueError:
        raise InvalidArgumentError(f"invalid addr '{value}'") from None
    if slot < 0 or not 0 <= func <= 7:
        raise InvalidArgumentError(f"invalid addr '{value}'")
    return slot << 3 | func if func_s else slot


@record
class Placement:
    """Where a device sits. microvm: kind + slot; q35: bus id + addr."""

    device_id: str
    driver: str
    kind: str | None = None  # microvm slot kind: BLK / NET
    slot: int | None = None
    bus: str | None = None
    addr: int | None = None
    hotplugged: bool = False
    pending_removal: bool = False


@record
class DeviceTopology:
    """Registry of devices and their places; thread-safe (QMP and guest-ack threads use it)."""

    machine: str
    root_ports: dict[str, int] = field(default_factory=dict)  # port id -> port number
    _devices: dict[str, Placement] = field(default_factory=dict)
    _slots: dict[str, list[str | None]] = field(default_factory=dict)
    _ports_used: dict[str, str] = field(default_factory=dict)  # bus -> device id
    _root_addrs: dict[int, str] = field(default_factory=dict)  # pcie.0 addr -> device id
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self):
        self._slots = {BLK: [None] * MICROVM_MAX_BLK, NET: [None] * MICROVM_MAX_NET}

    @property
    def is_microvm(self) -> bool:
        return self.machine == MICROVM

    def get(self, device_id: str) -> Placement:
        with self._lock:
            p = self._devices.get(device_id)
            if p is None:
                raise DeviceNotFoundError(f"Device '{device_id}' not found")
            return p

    def find(self, device_id: str) -> Placement | None:
        return self._devices.get(device_id)

    def ids(self) -> list[str]:
        return list(self._devices)

    def placements(self) -> list[Placement]:
        return list(self._devices.values())

    # --- microvm slots ---------------------------------------------------------------------

    def slot_count(self, kind: str) -> int:
        return len(self._slots[kind])

    def place_in_slot(self, device_id: str, driver: str, kind: str, slot: int | None,
                      hotplugged: bool) -> Placement:
        with self._lock:
            self._check_new_id(device_id)
            slots = self._slots[kind]
            what = "virtio-blk disks" if kind == BLK else "virtio-net NICs"
            if slot is None:
                free = [i for i, d in enumerate(slots) if d is None]
                if not free:
                    raise ResourceExhaustedError(f"no free slot: microvm supports at most {len(slots)} {what}")
                slot = free[0]
            if not 0 <= slot < len(slots):
                raise InvalidArgumentError(
                    f"addr {slot:#x} out of range: microvm supports at most {len(slots)} {what} (addr 0x0-{len(slots) - 1:#x})")
            if slots[slot] is not None:
                raise DuplicateIdError(f"addr {slot:#x} is already used by device '{slots[slot]}'")
            slots[slot] = device_id
            p = Placement(device_id, driver, kind=kind, slot=slot, hotplugged=hotplugged)
            self._devices[device_id] = p
            return p

    # --- q35 buses ---------------------------------------------------------------------------

    def add_root_port(self, port_id: str, port: int, addr: int | None) -> Placement:
        with self._lock:
            self._check_new_id(port_id)
            if addr is not None:
                self._claim_root_addr(port_id, addr)
            self.root_ports[port_id] = port
            p = Placement(port_id, "pcie-root-port", bus="pcie.0", addr=addr)
            self._devices[port_id] = p
            return p

    def place_on_bus(self, device_id: str, driver: str, bus: str, addr: int | None,
                     hotplugged: bool) -> Placement:
        with self._lock:
            self._check_new_id(device_id)
            if bus == "pcie.0":
                if hotplugged:
                    raise InvalidArgumentError("hot-plug is only supported into a pcie-root-port, not pcie.0")
                if addr is not None:
                    self._claim_root_addr(device_id, addr)
            elif bus in self.root_ports:
                if addr not in (None, 0):
                    raise InvalidArgumentError(f"addr must be 0x0 on root port '{bus}'")
                addr = 0
                if bus in self._ports_used:
                    raise DuplicateIdError(f"bus '{bus}' is already used by device '{self._ports_used[bus]}'")
                self._ports_used[bus] = device_id
            else:
                raise DeviceNotFoundError(f"Bus '{bus}' not found")
            p = Placement(device_id, driver, bus=bus, addr=addr, hotplugged=hotplugged)
            self._devices[device_id] = p
            return p

    def _claim_root_addr(self, device_id: str, addr: int) -> None:
        # addr 0 on pcie.0 is the host bridge.
        if addr == 0 or (addr >> 3) == 0:
            raise InvalidArgumentError(f"addr {addr >> 3:#x} on pcie.0 is the host bridge")
        if addr in self._root_addrs:
            raise DuplicateIdError(f"addr {addr >> 3:#x}.{addr & 7} on pcie.0 is already used by '{self._root_addrs[addr]}'")
        self._root_addrs[addr] = device_id

    # --- removal -----------------------------------------------------------------------------

    def mark_pending_removal(self, device_id: str) -> Placement:
        with self._lock:
            p = self.get(device_id)
            if p.pending_removal:
                raise DuplicateIdError(f"device '{device_id}' is already being removed")
            p.pending_removal = True
            return p

    def remove(self, device_id: str) -> Placement:
        with self._lock:
            p = self.get(device_id)
            del self._devices[device_id]
            if p.kind is not None and p.slot is not None:
                self._slots[p.kind][p.slot] = None
            if p.bus in self._ports_used and self._ports_used[p.bus] == device_id:
                del self._ports_used[p.bus]
            if p.bus == "pcie.0" and p.addr in self._root_addrs:
                del self._root_addrs[p.addr]
            return p

    def _check_new_id(self, device_id: str) -> None:
        if device_id in self._devices:
            raise DuplicateIdError(f"Duplicate ID '{device_id}' for device")


@record
class NamedRegistry:
    """Backend ids (blockdev node-names, netdev ids): unique, and pinned while a device uses them."""

    what: str
    _items: dict[str, object] = field(default_factory=dict)
    _users: dict[str, str] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def add(self, name: str, item: object) -> None:
        with self._lock:
            if name in self._items:
                raise DuplicateIdError(f"{self.what} '{name}' already exists")
            self._items[name] = item

    def get(self, name: str) -> object:
        item = self._items.get(name)
        if item is None:
            raise DeviceNotFoundError(f"{self.what} '{name}' not found")
        return item

    def has(self, name: str) -> bool:
        return name in self._items

    def attach(self, name: str, device_id: str) -> object:
        with self._lock:
            item = self.get(name)
            user = self._users.get(name)
            if user is not None:
                raise DuplicateIdError(f"{self.what} '{name}' is already in use by device '{user}'")
            self._users[name] = device_id
            return item

    def detach(self, name: str) -> None:
        with self._lock:
            self._users.pop(name, None)

    def user(self, name: str) -> str | None:
        return self._users.get(name)

    def remove(self, name: str) -> object:
        with self._lock:
            item = self.get(name)
            user = self._users.get(name)
            if user is not None:
                raise DuplicateIdError(f"{self.what} '{name}' is in use by device '{user}'")
            del self._items[name]
            return item

    def names(self) -> list[str]:
        return list(self._items)
