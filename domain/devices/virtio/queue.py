"""Split virtqueue (virtio 1.1 §2.6) over GuestMemory, written for a hostile driver.

Every index, address and length read from the rings is checked before use: heads and ``next``
indices against the table size, buffers against guest RAM, chains against the queue size (which
also catches loops), the available index against jumps of more than the queue size, indirect
tables against their length rules. Any violation raises VirtioQueueError and marks the queue
broken; the transport then sets DEVICE_NEEDS_RESET. Values are read once into Python ints, so a
driver rewriting a ring concurrently cannot make a checked value change after the check.

Ring memory is reached through memoryviews taken once at activation (``activate``); ``release``
drops them so the memory adapter can unmap guest RAM. The 16-bit ring fields the driver reads
or writes concurrently (indices, flags, event indices) go through a native-'H' cast of the
rings: one 2-byte load or store per field, never a torn half-old half-new index (x86 hosts:
native order is the ring's little-endian). Writes through these views bypass
GuestMemory.track_host_writes, which hears of the rings only when they are mapped.
"""

from __future__ import annotations

import struct

from domain.devices.state import check_range, check_state
from domain.errors import GuestMemoryError, VmmError
from domain.memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

MAX_QUEUE_SIZE = 32768  # virtio 1.1: split queue sizes are powers of 2 up to 32768


class VirtioQueueError(VmmError):
    """The driver put something invalid in a virtqueue; the queue is unusable until reset."""


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size  # flags, idx, ring[size], used_event


def used_ring_size(size: int) -> int:
    return 6 + 8 * size  # flags, idx, ring[size] of (id, len), avail_event


class DescriptorChain:
    """One popped request: the head index and its buffers as (addr, len, writable) tuples."""

    __slots__ = ("head", "descs")

    def __init__(self, head: int, descs: list[tuple[int, int, bool]]):
        self.head = head
        self.descs = descs

    def readable(self) -> list[tuple[int, int, bool]]:
        return [d for d in self.descs if not d[2]]

    def writable(self) -> list[tuple[int, int, bool]]:
        return [d for d in self.descs if d[2]]

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, descs={self.descs})"


class VirtQueue:
    def __init__(self, mem: GuestMemory, max_size: int):
        if max_size <= 0 or max_size & (max_size - 1) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue max size {max_size} is not a power of 2 <= {MAX_QUEUE_SIZE}")
        self.mem = mem
        self.max_size = max_size
        self._desc = self._avail = self._used = None
        self._avail16 = self._used16 = None
        self.reset()

    # --- configuration (driven by the transport) ------------------------------------------------

    def reset(self) -> None:
        self.release()
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self.signalled_used: int | None = None
        self.broken: str | None = None

    def release(self) -> None:
        for v in (self._avail16, self._used16, self._desc, self._avail, self._used):
            if v is not None:
                v.release()
        self._desc = self._avail = self._used = None
        self._avail16 = self._used16 = None

    @property
    def active(self) -> bool:
        return self._desc is not None

    def activate(self, event_idx: bool = False) -> None:
        """Check the configuration the driver wrote and map the rings."""
        self.release()
        size = self.size
        if not self.ready:
            raise VirtioQueueError("queue is not ready")
        if size <= 0 or size & (size - 1) or size > self.max_size:
            raise VirtioQueueError(f"queue size {size} is not a power of 2 <= {self.max_size}")
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise VirtioQueueError("virtqueue ring addresses are misaligned")
        try:
            desc = self.mem.view(self.desc_addr, desc_table_size(size))
            avail = self.mem.view(self.avail_addr, avail_ring_size(size))
            used = self.mem.view(self.used_addr, used_ring_size(size))
        except GuestMemoryError as e:
            raise VirtioQueueError(f"virtqueue ring outside guest RAM: {e}") from None
        self._desc, self._avail, self._used = desc, avail, used
        self._avail16, self._used16 = avail.cast("H"), used.cast("H")  # whole u16 accesses
        self.event_idx = event_idx
        self.broken = None

    def _fail(self, reason: str) -> None:
        self.broken = reason
        raise VirtioQueueError(reason)

    # --- device side ---------------------------------------------------------------------------

    def avail_idx(self) -> int:
        return self._avail16[1]

    def has_available(self) -> bool:
        return self._desc is not None and self.broken is None and self.avail_idx() != self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None when the driver has posted nothing."""
        if self.broken is not None:
            raise VirtioQueueError(f"queue is broken: {self.broken}")
        if self._desc is None:
            return None
        size = self.size
        pending = (self._avail16[1] - self.next_avail) & 0xFFFF  # avail_idx(), inlined: hot
        if pending == 0:
            return None
        if pending > size:
            self._fail(f"available index moved {pending} entries ahead, more than the queue size {size}")
        head = self._avail16[2 + self.next_avail % size]
        chain = DescriptorChain(head, self._walk(head))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def undo_pop(self) -> None:
        """Give back the chain popped last (e.g. an rx buffer too small for the packet)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _walk(self, head: int) -> list[tuple[int, int, bool]]:
        size = self.size
        if head >= size:
            self._fail(f"descriptor head {head} is beyond the queue size {size}")
        mem = self.mem
        contains = mem.contains
        unpack = _DESC.unpack_from
        table, table_len, in_indirect = self._desc, size, False
        idx, visited = head, 0
        out: list[tuple[int, int, bool]] = []
        while True:
            visited += 1
            if visited > table_len:
                self._fail("descriptor chain is longer than its table (a loop?)")
            addr, length, flags, nxt = unpack(table, idx * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    self._fail("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    self._fail("indirect descriptor with the NEXT flag")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > size:
                    self._fail(f"indirect table of {length} bytes is not 1..{size} descriptors")
                try:
                    table = mem.read(addr, length)
                except GuestMemoryError:
                    self._fail(f"indirect table {addr:#x}+{length:#x} is outside guest RAM")
                table_len, in_indirect, idx, visited = length // DESC_SIZE, True, 0, 0
                continue
            if length and not contains(addr, length):
                self._fail(f"descriptor buffer {addr:#x}+{length:#x} is outside guest RAM")
            out.append((addr, length, flags & VIRTQ_DESC_F_WRITE != 0))
            if not flags & VIRTQ_DESC_F_NEXT:
                return out
            if nxt >= table_len:
                self._fail(f"descriptor next index {nxt} is beyond its table of {table_len}")
            idx = nxt

    def add_used(self, head: int, length: int) -> None:
        if self._used is None:
            raise VirtioQueueError("queue is not active")
        if not 0 <= head < self.size:
            raise VirtioQueueError(f"used head {head} is beyond the queue size {self.size}")
        slot = self.next_used % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, length & 0xFFFFFFFF)
        self.next_used = (self.next_used + 1) & 0xFFFF
        # The element is written before the index that publishes it (x86 keeps store order).
        self._used16[1] = self.next_used

    def needs_notification(self) -> bool:
        """Whether the driver asked to be interrupted for the used entries added so far."""
        if self._avail is None:
            return False
        if not self.event_idx:
            return not self._avail16[0] & VRING_AVAIL_F_NO_INTERRUPT
        new, old = self.next_used, self.signalled_used
        self.signalled_used = new
        if old is None:
            return True
        used_event = self._avail16[2 + self.size]
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def disable_notification(self) -> None:
        """Ask the driver not to notify (without EVENT_IDX; with it, avail_event already lags)."""
        if self._used is not None and not self.event_idx:
            self._used16[0] = VRING_USED_F_NO_NOTIFY

    def enable_notification(self) -> bool:
        """Ask for a notification on the next buffer; True if buffers arrived meanwhile (the
        caller must then process again, or it could sleep on a buffer nobody will notify)."""
        if self._used is None or self.broken is not None:
            return False
        if self.event_idx:
            self._used16[2 + 4 * self.size] = self.next_avail
        else:
            self._used16[0] = 0
        return self.avail_idx() != self.next_avail

    # --- snapshot ------------------------------------------------------------------------------

    def save_state(self) -> dict:
        return {"size": self.size, "ready": self.ready, "desc": self.desc_addr, "avail": self.avail_addr,
                "used": self.used_addr, "next_avail": self.next_avail, "next_used": self.next_used,
                "event_idx": self.event_idx,
                "signalled_used": -1 if self.signalled_used is None else self.signalled_used}

    def restore_state(self, state: dict) -> None:
        check_state(state, {"size": int, "ready": bool, "desc": int, "avail": int, "used": int,
                            "next_avail": int, "next_used": int, "event_idx": bool, "signalled_used": int})
        self.reset()
        self.size = check_range("size", state["size"], 1, self.max_size)
        self.ready = state["ready"]
        self.desc_addr = check_range("desc", state["desc"], 0, (1 << 64) - 1)
        self.avail_addr = check_range("avail", state["avail"], 0, (1 << 64) - 1)
        self.used_addr = check_range("used", state["used"], 0, (1 << 64) - 1)
        self.next_avail = check_range("next_avail", state["next_avail"], 0, 0xFFFF)
        self.next_used = check_range("next_used", state["next_used"], 0, 0xFFFF)
        self.event_idx = state["event_idx"]
        su = check_range("signalled_used", state["signalled_used"], -1, 0xFFFF)
        self.signalled_used = None if su < 0 else su
