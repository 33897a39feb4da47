"""A scriptable virtio *driver* for tests: lays out split rings in GuestMemory, posts descriptor
chains, reads the used ring, and drives a virtio-mmio transport through its registers.

It writes whatever it is told to, so tests can also play a hostile driver (loops, bad indices,
wild addresses). Like rust-vmm virtio-queue's ``mock`` module, it lives beside the code it tests.
"""

from __future__ import annotations

import struct

from domain.devices.virtio import mmio as regs
from domain.devices.virtio.queue import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtQueue,
    avail_ring_size,
    desc_table_size,
)
from domain.memory import GuestMemory

_DESC = struct.Struct("<QIHH")


class MockQueue:
    """Driver side of one split virtqueue placed at ``base`` in guest memory."""

    def __init__(self, mem: GuestMemory, size: int, base: int):
        self.mem = mem
        self.size = size
        self.desc_addr = base
        self.avail_addr = base + desc_table_size(size)
        self.used_addr = (self.avail_addr + avail_ring_size(size) + 3) & ~3
        self.end = self.used_addr + 6 + 8 * size
        self.avail_idx = 0
        self.next_desc = 0
        self.used_seen = 0
        mem.write(base, bytes(self.end - base))

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc_addr + DESC_SIZE * index, _DESC.pack(addr, length, flags, nxt))

    def _alloc(self, n: int) -> list[int]:
        out = [(self.next_desc + i) % self.size for i in range(n)]
        self.next_desc = (self.next_desc + n) % self.size
        return out

    def add_chain(self, bufs: list[tuple[int, int, bool]], publish: bool = True) -> int:
        """Post a direct chain of (addr, len, device_writable) buffers; returns its head."""
        idx = self._alloc(len(bufs))
        for i, (addr, length, w) in enumerate(bufs):
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(idx[i], addr, length, flags, 0 if last else idx[i + 1])
        if publish:
            self.publish(idx[0])
        return idx[0]

    def add_indirect(self, bufs: list[tuple[int, int, bool]], table_addr: int, publish: bool = True) -> int:
        """Post one descriptor pointing at an indirect table (written at table_addr) of ``bufs``."""
        for i, (addr, length, w) in enumerate(bufs):
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.mem.write(table_addr + DESC_SIZE * i, _DESC.pack(addr, length, flags, 0 if last else i + 1))
        head = self._alloc(1)[0]
        self.write_desc(head, table_addr, DESC_SIZE * len(bufs), VIRTQ_DESC_F_INDIRECT)
        if publish:
            self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail_addr, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_addr + 4 + 2 * self.size, value)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_addr + 2)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_addr + 4 + 8 * self.size)

    def used_elem(self, n: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(self.used_addr + 4 + 8 * (n % self.size), 8))

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements added since the last call."""
        out = []
        while self.used_seen != self.used_idx():
            out.append(self.used_elem(self.used_seen))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def configure(self, q: VirtQueue, event_idx: bool = False) -> VirtQueue:
        """Program a device-side queue directly (no transport) and activate it."""
        q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready = (
            self.size, self.desc_addr, self.avail_addr, self.used_addr, True)
        q.activate(event_idx)
        return q


class MmioDriver:
    """Drives a VirtioMmioTransport through its registers as Linux's virtio_mmio driver does."""

    def __init__(self, transport):
        self.t = transport

    def read32(self, offset: int) -> int:
        buf = bytearray(4)
        self.t.read(offset, memoryview(buf))
        return struct.unpack("<I", buf)[0]

    def write32(self, offset: int, value: int) -> None:
        self.t.write(offset, memoryview(struct.pack("<I", value & 0xFFFFFFFF)))

    def read_config(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.t.read(regs.CONFIG + offset, memoryview(buf))
        return bytes(buf)

    def write_config(self, offset: int, data: bytes) -> None:
        self.t.write(regs.CONFIG + offset, memoryview(bytearray(data)))

    def device_features(self) -> int:
        self.write32(regs.DEVICE_FEATURES_SEL, 0)
        lo = self.read32(regs.DEVICE_FEATURES)
        self.write32(regs.DEVICE_FEATURES_SEL, 1)
        return lo | self.read32(regs.DEVICE_FEATURES) << 32

    def add_status(self, bits: int) -> int:
        self.write32(regs.STATUS, self.read32(regs.STATUS) | bits)
        return self.read32(regs.STATUS)

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write features (default: all offered), FEATURES_OK."""
        self.write32(regs.STATUS, 0)
        self.add_status(regs.ACKNOWLEDGE)
        self.add_status(regs.DRIVER)
        feats = self.device_features() if features is None else features
        for sel in (0, 1):
            self.write32(regs.DRIVER_FEATURES_SEL, sel)
            self.write32(regs.DRIVER_FEATURES, feats >> (32 * sel))
        return bool(self.add_status(regs.FEATURES_OK) & regs.FEATURES_OK)

    def setup_queue(self, index: int, mq: MockQueue) -> None:
        self.write32(regs.QUEUE_SEL, index)
        self.write32(regs.QUEUE_NUM, mq.size)
        for low, addr in ((regs.QUEUE_DESC_LOW, mq.desc_addr), (regs.QUEUE_DRIVER_LOW, mq.avail_addr),
                          (regs.QUEUE_DEVICE_LOW, mq.used_addr)):
            self.write32(low, addr)
            self.write32(low + 4, addr >> 32)
        self.write32(regs.QUEUE_READY, 1)

    def start(self, queues: list[MockQueue], features: int | None = None) -> int:
        """Full bring-up; returns the final status."""
        if not self.negotiate(features):
            return self.read32(regs.STATUS)
        for i, mq in enumerate(queues):
            self.setup_queue(i, mq)
        return self.add_status(regs.DRIVER_OK)

    def notify(self, index: int) -> None:
        self.write32(regs.QUEUE_NOTIFY, index)

    def ack_interrupt(self) -> int:
        isr = self.read32(regs.INTERRUPT_STATUS)
        self.write32(regs.INTERRUPT_ACK, isr)
        return isr
