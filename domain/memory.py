"""Guest physical memory over host buffers.

Pure: the buffers (mmaps in production, bytearrays in unit tests) are handed in by an adapter.
Every access is bounds-checked, because every guest address is hostile until proven otherwise.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from typing import Callable, Iterator

from domain.errors import GuestMemoryError
from domain.record import record

PAGE_SIZE = 4096

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@record(frozen=True)
class RamRegion:
    """One contiguous guest-physical RAM range backed by one host buffer."""

    slot: int
    gpa: int
    size: int
    view: memoryview  # writable, len == size

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    def __init__(self, regions: list[tuple[int, object]]):
        """``regions``: (guest physical address, writable buffer) pairs, in any order."""
        built = []
        for slot, (gpa, buf) in enumerate(sorted(regions, key=lambda r: r[0])):
            view = memoryview(buf).cast("B")
            if view.readonly:
                raise ValueError("guest RAM buffers must be writable")
            if gpa % PAGE_SIZE or len(view) % PAGE_SIZE:
                raise ValueError("guest RAM regions must be page aligned")
            if built and built[-1].end > gpa:
                raise ValueError("guest RAM regions overlap")
            built.append(RamRegion(slot, gpa, len(view), view))
        self._regions = tuple(built)
        self._starts = [r.gpa for r in built]
        self._first = built[0] if built and built[0].gpa == 0 else None
        self._first_end = self._first.end if self._first is not None else -1
        self._buffers = [buf for _, buf in regions]
        self.size = sum(r.size for r in built)
        self._host_writes: Callable[[int, int], None] | None = None

    def track_host_writes(self, observer: Callable[[int, int], None] | None) -> None:
        """While set, observer(gpa, length) hears of every range the VMM may write: views
        (devices write guest RAM only through them; a view only read costs a page resent) and
        write/write_uNN. A hypervisor's dirty log sees the guest's own writes only; a live
        migration needs the device side too. None stops the tracking."""
        self._host_writes = observer

    @property
    def tracks_host_writes(self) -> bool:
        return self._host_writes is not None

    def note_host_write(self, gpa: int, length: int) -> None:
        """Report a range the VMM wrote without a view (a device's native data plane)."""
        if self._host_writes is not None:
            self._host_writes(gpa, length)

    @property
    def regions(self) -> tuple[RamRegion, ...]:
        return self._regions

    def _find(self, gpa: int, length: int) -> RamRegion:
        # Hot path (every descriptor and buffer of every virtqueue request): the low region
        # holds almost every address, so test it first, then bisect the rest.
        if 0 <= gpa and 0 <= length and gpa + length <= self._first_end:
            return self._first
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa + length <= r.end:
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        if 0 <= gpa and 0 <= length and gpa + length <= self._first_end:
            return True  # (the hot path: a descriptor in the low region)
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable slice of guest RAM; the range must lie inside one region."""
        r = self._find(gpa, length)
        if self._host_writes is not None:
            self._host_writes(gpa, length)
        off = gpa - r.gpa
        return r.view[off : off + length]

    def read_view(self, gpa: int, length: int) -> memoryview:
        """A slice of guest RAM the VMM only reads (a migration sending pages): the same
        memory as view(), but not reported to track_host_writes, or every page sent would
        count as dirty again."""
        r = self._find(gpa, length)
        off = gpa - r.gpa
        return r.view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data) -> None:
        data = memoryview(data).cast("B")
        self.view(gpa, len(data))[:] = data

    def read_u16(self, gpa: int) -> int:
        r = self._find(gpa, 2)
        return _U16.unpack_from(r.view, gpa - r.gpa)[0]

    def read_u32(self, gpa: int) -> int:
        r = self._find(gpa, 4)
        return _U32.unpack_from(r.view, gpa - r.gpa)[0]

    def read_u64(self, gpa: int) -> int:
        r = self._find(gpa, 8)
        return _U64.unpack_from(r.view, gpa - r.gpa)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        r = self._find(gpa, 2)
        if self._host_writes is not None:
            self._host_writes(gpa, 2)
        _U16.pack_into(r.view, gpa - r.gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        r = self._find(gpa, 4)
        if self._host_writes is not None:
            self._host_writes(gpa, 4)
        _U32.pack_into(r.view, gpa - r.gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        r = self._find(gpa, 8)
        if self._host_writes is not None:
            self._host_writes(gpa, 8)
        _U64.pack_into(r.view, gpa - r.gpa, value)

    def pages(self) -> Iterator[tuple[int, memoryview]]:
        """(gpa, view) for every guest page, in address order."""
        for r in self._regions:
            for off in range(0, r.size, PAGE_SIZE):
                yield r.gpa + off, r.view[off : off + PAGE_SIZE]

    def release(self) -> None:
        """Drop our views so the adapter can close its mmaps (live views make close() fail)."""
        for r in self._regions:
            r.view.release()
        self._regions = ()
        self._starts = []
        self._first = None
        self._first_end = -1  # the fast paths of _find/contains see no RAM either
        self._buffers = []


def bitmap_pages(bitmap: bytes, base: int, page_size: int = PAGE_SIZE) -> list[int]:
    """Addresses of the pages whose bit is set in a dirty bitmap (bit i = page i from base,
    little-endian as KVM_GET_DIRTY_LOG gives it). The zero 64-bit words, most of an idle
    guest's bitmap, are skipped at C speed: a final pass reads it inside the downtime."""
    pages: list[int] = []
    usable = len(bitmap) - len(bitmap) % 8
    words = memoryview(bitmap)[:usable].cast("Q").tolist() if usable else []
    for wi in itertools.compress(range(len(words)), words):
        w = words[wi]
        first = base + wi * 64 * page_size
        while w:
            low = w & -w
            pages.append(first + (low.bit_length() - 1) * page_size)
            w ^= low
    for bi in range(usable, len(bitmap)):
        b = bitmap[bi]
        for bit in range(8):
            if b >> bit & 1:
                pages.append(base + (bi * 8 + bit) * page_size)
    return pages
