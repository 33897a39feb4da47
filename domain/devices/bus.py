"""Address buses (one for port I/O, one for MMIO) that route a vCPU access to a device.

Ranges are kept sorted and found with bisect. The lookup tables are immutable tuples swapped on
insert/remove, so the hot path takes no bus-wide lock; each device access is serialized by a
per-device lock (the device's own ``lock`` attribute when it has one, so the device can share it
with its other entry points, e.g. a virtio device's ioeventfd path).

Device protocol: ``read(offset, data: memoryview)`` fills ``data``; ``write(offset, data)``.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any, Protocol

from domain.errors import VmmError
from domain.record import record


class BusDevice(Protocol):
    def read(self, offset: int, data: memoryview) -> None: ...

    def write(self, offset: int, data: memoryview) -> None: ...


class BusConflictError(VmmError):
    """A device range that overlaps another, or a bad range."""


@record(frozen=True)
class BusRange:
    base: int
    length: int
    device: Any
    lock: Any

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    def __init__(self, name: str = "bus"):
        self.name = name
        self._mutate = threading.Lock()
        # (starts, ranges) swapped as one object so a reader always sees a consistent pair.
        self._table: tuple[tuple[int, ...], tuple[BusRange, ...]] = ((), ())

    def _publish(self, ranges: tuple[BusRange, ...]) -> None:
        self._table = (tuple(r.base for r in ranges), ranges)

    def insert(self, device: Any, base: int, length: int) -> None:
        if length <= 0 or base < 0:
            raise BusConflictError(f"{self.name}: invalid range {base:#x}+{length:#x}")
        lock = getattr(device, "lock", None) or threading.Lock()
        new = BusRange(base, length, device, lock)
        with self._mutate:
            starts, ranges = self._table
            i = bisect.bisect_right(starts, base)
            if i > 0 and ranges[i - 1].end > base:
                other = ranges[i - 1]
                raise BusConflictError(f"{self.name}: {base:#x}+{length:#x} overlaps {other.base:#x}+{other.length:#x}")
            if i < len(ranges) and ranges[i].base < base + length:
                other = ranges[i]
                raise BusConflictError(f"{self.name}: {base:#x}+{length:#x} overlaps {other.base:#x}+{other.length:#x}")
            self._publish(ranges[:i] + (new,) + ranges[i:])

    def remove(self, base: int) -> Any:
        """Unmap the range starting at ``base``; returns its device."""
        with self._mutate:
            starts, ranges = self._table
            i = bisect.bisect_left(starts, base)
            if i == len(starts) or starts[i] != base:
                raise BusConflictError(f"{self.name}: nothing mapped at {base:#x}")
            self._publish(ranges[:i] + ranges[i + 1:])
            return ranges[i].device

    def find(self, addr: int, length: int = 1) -> tuple[BusRange, int] | None:
        """The range containing [addr, addr+length) and the offset of addr in it."""
        starts, ranges = self._table
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0:
            return None
        r = ranges[i]
        if addr + length > r.end:
            return None
        return r, addr - r.base

    def devices(self) -> list[tuple[int, int, Any]]:
        return [(r.base, r.length, r.device) for r in self._table[1]]

    def read(self, addr: int, data: memoryview) -> bool:
        """Dispatch a read; False when nothing is mapped (the caller returns all-ones)."""
        hit = self.find(addr, len(data))
        if hit is None:
            return False
        r, off = hit
        with r.lock:
            r.device.read(off, data)
        return True

    def write(self, addr: int, data: memoryview) -> bool:
        hit = self.find(addr, len(data))
        if hit is None:
            return False
        r, off = hit
        with r.lock:
            r.device.write(off, data)
        return True
