"""Ports: what the domain and the application need from the outside world.

Adapters implement these Protocols: KVM and the in-memory fake implement the hypervisor port;
storage, net, memory and host adapters implement the rest. The contract suite in tests/contract
pins the behaviour every hypervisor implementation must share.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence, runtime_checkable

from domain.config import ChardevConfig, MemoryConfig
from domain.cpu_state import Regs, Sregs, VcpuSetup
from domain.memory import GuestMemory
from domain.record import record
from domain.vcpu_exit import VcpuExit

# ---------------------------------------------------------------------------------------------
# Hypervisor
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class HvVcpu(Protocol):
    index: int

    def setup(self, cfg: VcpuSetup) -> None:
        """CPUID (hypervisor-supported set, per-vCPU APIC id/topology, hidden features), MSRs,
        FPU defaults and LAPIC LINT0=ExtINT / LINT1=NMI."""

    def run(self) -> VcpuExit:
        """Run until the next exit the VMM must handle. Called only from this vCPU's thread."""

    def kick(self) -> None:
        """Thread-safe: make the current run() return Interrupted soon, or the next one at once."""

    def clear_kick(self) -> None:
        """Called by the vCPU thread before it runs again after a kick was handled."""

    def thread_id(self) -> int | None:
        """Native id of the thread that last called run(), None before the first run."""

    def get_regs(self) -> Regs: ...

    def set_regs(self, regs: Regs) -> None: ...

    def get_sregs(self) -> Sregs: ...

    def set_sregs(self, sregs: Sregs) -> None: ...

    def save_state(self) -> dict[str, Any]:
        """Complete, versionable vCPU state as plain data (ints, bytes, lists, dicts)."""

    def restore_state(self, state: dict[str, Any]) -> None:
        """Inverse of save_state; the state is untrusted and validated."""


@runtime_checkable
class HvVm(Protocol):
    def set_memory_region(
        self, slot: int, gpa: int, view: memoryview, *, readonly: bool = False, log_dirty: bool = False
    ) -> None:
        """Map host memory at gpa. An overlapping range or a busy slot raises HypervisorError
        (errno EEXIST, as KVM answers)."""

    def remove_memory_region(self, slot: int) -> None: ...

    def get_dirty_log(self, slot: int) -> bytes:
        """Bitmap (bit n = page n of the slot, little-endian bytes) of pages written since the
        last call; reading clears it. The slot must have been set with log_dirty=True."""

    def create_irqchip(self) -> None:
        """In-kernel PIC/IOAPIC/LAPIC and PIT (KVM_CREATE_IRQCHIP + KVM_CREATE_PIT2)."""

    def set_irq_line(self, gsi: int, level: bool) -> None: ...

    def signal_msi(self, address: int, data: int) -> bool:
        """Inject a message-signalled interrupt (KVM_SIGNAL_MSI). True when a LAPIC took it,
        False when the guest blocked it or no LAPIC matched. Needs the in-kernel irqchip
        (HypervisorError EINVAL without it)."""

    def register_irqfd(self, fd: int, gsi: int) -> None: ...

    def unregister_irqfd(self, fd: int, gsi: int) -> None: ...

    def register_ioevent(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool) -> None: ...

    def unregister_ioevent(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool) -> None: ...

    def create_vcpu(self, index: int) -> HvVcpu: ...

    def save_state(self) -> dict[str, Any]:
        """VM-wide state: irqchip, PIT, clock."""

    def restore_state(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Hypervisor(Protocol):
    kind: str  # "kvm" or "test": recorded in snapshots, refused if it does not match

    def max_vcpus(self) -> int: ...

    def create_vm(self) -> HvVm: ...


# ---------------------------------------------------------------------------------------------
# Memory, host resources, backends
# ---------------------------------------------------------------------------------------------


class MemoryAllocator(Protocol):
    def allocate(self, layout: Sequence[tuple[int, int]], backing_file: str | None = None,
                 backend: MemoryConfig | None = None) -> GuestMemory:
        """Allocate RAM for (gpa, size) ranges. With backing_file, map it copy-on-write
        (MAP_PRIVATE) so start-up does not read it; offsets in the file follow the layout.
        backend applies the memory options: mem-path (file or directory), mem-share, prealloc,
        dump-guest-core."""

    def free(self, memory: GuestMemory) -> None: ...


class BlockBackend(Protocol):
    size: int
    readonly: bool

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int: ...

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    # Optional: ``submit(fn, arg)`` (run on the backend's own threads) and
    # ``native_queue(regions) -> BlockDataPlane | None``; the device looks them up with getattr.


class NativeServe(NamedTuple):
    """What one BlockDataPlane.serve call did: why it returned (a SERVE_* code below), the queue's
    indices after it, and its counts."""

    reason: int
    next_avail: int
    next_used: int
    signalled_used: int | None
    rd_ops: int
    rd_bytes: int
    wr_ops: int
    wr_bytes: int
    errors: int
    poll_missed: bool


SERVE_IDLE = 0  # the ring is empty (after the poll window, if one was given)
SERVE_SIGNAL = 1  # a completion wants an interrupt: the caller raises it
SERVE_DECLINE = 2  # the request at the head is not a plain read/write: the caller pops it
SERVE_STOP = 3  # request_stop() was called
SERVE_BUDGET = 4  # served its maximum per call: the caller looks at pause, quiesce, tracking


class BlockDataPlane(Protocol):
    """A virtio-blk request queue's plain reads and writes served natively (virtio 1.1 §5.2: a
    16-byte header, data buffers in one direction, a 1-byte status), data straight between the
    image and guest RAM. Anything else is declined before it is popped. The device model owns
    the queue state: serve() takes it and gives it back; notifications stay as the model left
    them."""

    def bind(self, desc: int, avail: int, used: int, size: int) -> bool:
        """Point at an activated queue's rings (guest addresses); False if it cannot serve them."""

    def arm(self) -> None:
        """Clear an earlier stop request (lock held, before serve)."""

    def request_stop(self) -> None:
        """Make a running or the next serve() return SERVE_STOP after its current request."""

    def serve(self, next_avail: int, next_used: int, signalled_used: int | None, event_idx: bool,
              poll: float, budget: int = 0) -> NativeServe:
        """Serve at most ``budget`` requests (0: the plane's maximum) until a SERVE_* reason;
        ``poll`` seconds of watching the ring when it is empty."""

    def written(self) -> list[tuple[int, int]]:
        """Guest ranges (gpa, length) the last serve() wrote."""


class BlockOpener(Protocol):
    def open(self, path: str, *, readonly: bool, direct: bool) -> BlockBackend:
        """Raises HostResourceError with a clear reason when the image cannot be used."""


class NetBackend(Protocol):
    fd: int

    def recv_into(self, buf: memoryview) -> int: ...

    def sendv(self, bufs: Sequence[memoryview]) -> int: ...

    def close(self) -> None: ...


class NetOpener(Protocol):
    def open_tap(self, ifname: str) -> NetBackend:
        """Raises HostResourceError when the tap cannot be opened."""


class CharBackend(Protocol):
    """A -chardev: the host end of a guest console's byte stream.

    Input flows with back-pressure: ``start(receive)`` hands every input chunk to
    ``receive(data)``, which returns how many bytes the guest took. The backend keeps the rest,
    stops reading, and offers the kept bytes again after ``input_ready()``.
    """

    def start(self, receive: Callable[[bytes], int]) -> None:
        """Begin delivering input (at most one consumer)."""

    def input_ready(self) -> None:
        """The consumer has room again. Thread-safe, never blocks; may be called while the
        consumer holds its own lock (so it must not call ``receive`` itself)."""

    def write(self, data: bytes | memoryview) -> None:
        """Guest output. Never blocks the caller: with nobody connected the bytes are dropped.
        ``data`` is only valid during the call (it may be a view of guest memory)."""

    def close(self) -> None: ...


class CharBackendOpener(Protocol):
    def open(self, config: ChardevConfig) -> CharBackend:
        """Raises ConfigError or HostResourceError with one line when it cannot be opened."""


class HostProbe(Protocol):
    """Read-only checks of host resources, used before anything starts and on hotplug."""

    def file_usable(self, path: str, *, write: bool) -> str | None:
        """None when usable, else the reason (e.g. 'No such file or directory')."""

    def pci_device_exists(self, host: str) -> bool: ...

    def iommu_group(self, host: str) -> str | None: ...


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


class EventSink(Protocol):
    def emit(self, event: "object") -> None:
        """Deliver a domain event (domain.events) to every listener. Thread-safe; events emitted
        from one thread reach every client in emission order."""


Listener = Callable[[object], None]


class Timers(Protocol):
    """One-shot timers whose callbacks run in the device I/O thread, like fd callbacks (device
    models that need time to pass: the CMOS clock's periodic, alarm and update interrupts)."""

    def call_at(self, deadline: float, callback: Callable[[], None]) -> object:
        """Call ``callback`` once, in the I/O thread, at or after ``deadline`` (a time.monotonic()
        value; one already past runs at once). Thread-safe. Returns a handle for cancel()."""

    def cancel(self, handle: object) -> None:
        """The callback will not run, unless it already started. Idempotent; thread-safe."""


class IoPoller(Timers, Protocol):
    """The device I/O thread: eventfds (ioeventfd queue notifies, irqfds), tap fds and timers."""

    def new_eventfd(self) -> int: ...

    def signal(self, fd: int) -> None:
        """Add 1 to an eventfd (an irqfd trigger)."""

    def close_fd(self, fd: int) -> None: ...

    def watch(self, fd: int, callback: Callable[[], None], *, drain_eventfd: bool = True) -> None:
        """Call ``callback`` in the I/O thread whenever fd is readable (an eventfd is drained
        first)."""

    def unwatch(self, fd: int) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# VFIO device passthrough
# ---------------------------------------------------------------------------------------------


@record(frozen=True)
class VfioPciIndices:
    """The vfio-pci region and IRQ index numbers, as the adapter read them from <linux/vfio.h>."""

    bars: tuple[int, ...]  # BAR0..BAR5
    rom: int
    config: int
    intx: int
    msi: int
    msix: int


@record(frozen=True)
class VfioRegionInfo:
    index: int
    size: int
    readable: bool
    writable: bool
    mappable: bool
    # (offset, size) ranges of the region that may be mmapped: the whole region, the kernel's
    # sparse areas (a BAR holding an MSI-X table), or none.
    mmap_areas: tuple[tuple[int, int], ...]


@record(frozen=True)
class VfioIrqInfo:
    index: int
    count: int  # vectors in this index (0: the device lacks it)
    eventfd: bool  # can signal through eventfds
    maskable: bool
    automasked: bool  # INTx: the host masks the line on each interrupt; unmask_irq() re-arms it
    resizable: bool  # vectors can be added while enabled (no VFIO_IRQ_INFO_NORESIZE)


@runtime_checkable
class VfioDevice(Protocol):
    """One host PCI function opened through VFIO. Every failure raises HostResourceError."""

    host: str  # "0000:1a:00.3"
    indices: VfioPciIndices
    num_regions: int
    num_irqs: int
    can_reset: bool

    def region_info(self, index: int) -> VfioRegionInfo: ...

    def region_read(self, index: int, offset: int, length: int) -> bytes:
        """Read from a region (config space, a BAR, the ROM); the range must lie inside it."""

    def region_write(self, index: int, offset: int, data: bytes | memoryview) -> None: ...

    def region_mmap(self, index: int) -> list[tuple[int, memoryview]]:
        """Map the region's mmap areas: (offset in the region, writable view) pairs, valid until
        close(). Empty when the region cannot be mapped (accesses then go through read/write)."""

    def irq_info(self, index: int) -> VfioIrqInfo: ...

    def set_irq_eventfds(self, index: int, fds: Sequence[int], start: int = 0) -> None:
        """Signal vectors start.. of an IRQ index (INTx, MSI, MSI-X) through these eventfds;
        -1 leaves a vector without one."""

    def disable_irqs(self, index: int) -> None:
        """Stop signalling every vector of an IRQ index (the guest disabled MSI/MSI-X/INTx)."""

    def unmask_irq(self, index: int, subindex: int = 0) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None:
        """Unmap the BARs, close the device and, with its last device, its group's DMA maps."""

    def release(self) -> None:
        """close(): the name the machine calls when a hot-plugged device goes away."""


class VfioOpener(Protocol):
    def open_device(self, host: str) -> VfioDevice:
        """Open a host PCI function (bound to vfio-pci) with guest RAM mapped for its DMA."""
