"""Address buses (one for port I/O, one for MMIO) that route a vCPU access to a device.

Ranges are kept sorted and found with bisect. The lookup tables are immutable tuples swapped on
insert/remove, so the hot path takes no bus-wide lock; each device access is serialized by a
per-device lock (the device's own ``lock`` attribute when it has one, so the device can share it
with its other entry points, e.g. a virtio device's ioeventfd path).

Every vCPU exit goes through read/write, so they answer from a per-address cache first (a guest
uses a handful of ports and registers over and over): one dict lookup instead of a bisect, a
tuple and a property call. The cache belongs to the table it was filled from, so a lookup that
raced an insert/remove can only fill the table being replaced; it is cleared when it reaches
CACHE_LIMIT entries, so a guest probing every address cannot grow it without bound.

Device protocol: ``read(offset, data: memoryview)`` fills ``data``; ``write(offset, data)``.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any, Protocol

from domain.errors import VmmError
from domain.record import record

CACHE_LIMIT = 4096

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
        # (starts, ranges, cache) swapped as one object so a reader always sees a consistent set.
        self._table: tuple[tuple[int, ...], tuple[BusRange, ...], dict] = ((), (), {})

    def _publish(self, ranges: tuple[BusRange, ...]) -> None:
        self._table = (tuple(r.base for r in ranges), ranges, {})

    def insert(self, device: Any, base: int, length: int) -> None:
        if length <= 0 or base < 0:
            raise BusConflictError(f"{self.name}: invalid range {base:#x}+{length:#x}")
        lock = getattr(device, "lock", None) or threading.Lock()
        new = BusRange(base, length, device, lock)
        with self._mutate:
            starts, ranges, _ = self._table
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
            starts, ranges, _ = self._table
            i = bisect.bisect_left(starts, base)
            if i == len(starts) or starts[i] != base:
                raise BusConflictError(f"{self.name}: nothing mapped at {base:#x}")
            self._publish(ranges[:i] + ranges[i + 1:])
            return ranges[i].device

    def find(self, addr: int, length: int = 1) -> tuple[BusRange, int] | None:
        """The range containing [addr, addr+length) and the offset of addr in it."""
        starts, ranges, _ = self._table
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0:
            return None
        r = ranges[i]
        if addr + length > r.end:
            return None
        return r, addr - r.base

    def devices(self) -> list[tuple[int, int, Any]]:
        return [(r.base, r.length, r.device) for r in self._table[1]]

    def _fill(self, table: tuple, addr: int) -> tuple[Any, int, int, Any] | None:
        """Cache miss: (device, offset, bytes left in the range, lock) for addr, or None."""
        starts, ranges, cache = table
        i = bisect.bisect_right(starts, addr) - 1
        r = ranges[i] if i >= 0 else None
        hit = (r.device, addr - r.base, r.end - addr, r.lock) if r is not None and addr < r.end else None
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[addr] = hit
        return hit

    # read and write repeat the cache lookup inline: they run on every vCPU exit, where a call
    # more is measurable (see bench/kvm_devices.py).
    def read(self, addr: int, data: memoryview) -> bool:
        """Dispatch a read; False when nothing is mapped (the caller returns all-ones)."""
        table = self._table
        hit = table[2].get(addr, _MISS)
        if hit is _MISS:
            hit = self._fill(table, addr)
        if hit is None or len(data) > hit[2]:
            return False
        with hit[3]:
            hit[0].read(hit[1], data)
        return True

    def write(self, addr: int, data: memoryview) -> bool:
        table = self._table
        hit = table[2].get(addr, _MISS)
        if hit is _MISS:
            hit = self._fill(table, addr)
        if hit is None or len(data) > hit[2]:
            return False
        with hit[3]:
            hit[0].write(hit[1], data)
        return True


_MISS = object()
