"""virtio-blk over MMIO on a mock driver: the in-memory disk, the started device and the fuzzed
queue that the sync (test_dev_virtio_block) and threaded-backend (test_dev_virtio_block_async)
tests share."""

import struct

from domain.devices.virtio import mmio as r
from domain.devices.virtio.block import VirtioBlock
from domain.devices.virtio.mmio import VirtioMmioTransport
from domain.devices.virtio.mock import MmioDriver, MockQueue
from domain.errors import HostResourceError
from domain.memory import GuestMemory

RAM = 0x80000
DISK = 64 * 512


class MemDisk:
    """In-memory BlockBackend test double that records the buffers it was handed."""

    def __init__(self, size=DISK, readonly=False):
        self.data = bytearray(bytes(range(256)) * (size // 256))
        self.size = size
        self.readonly = readonly
        self.flushes = 0
        self.buffer_types = set()
        self.fail = False

    def readv(self, offset, bufs):
        if self.fail:
            raise HostResourceError("disk gone")
        n = 0
        for buf in bufs:
            self.buffer_types.add(type(buf))
            chunk = self.data[offset + n:offset + n + len(buf)]
            buf[:len(chunk)] = chunk
            n += len(chunk)
        return n

    def writev(self, offset, bufs):
        if self.fail:
            raise OSError(5, "EIO")
        n = 0
        for buf in bufs:
            self.buffer_types.add(type(buf))
            self.data[offset + n:offset + n + len(buf)] = buf
            n += len(buf)
        return n

    def flush(self):
        self.flushes += 1

    def close(self):
        pass


class BlockRig:
    """A VirtioBlock on `disk` in RAM bytes of guest memory, driven to DRIVER_OK with one
    16-entry queue; counts its interrupts."""

    def __init__(self, disk, features=None, **device_kwargs):
        self.mem = GuestMemory([(0, bytearray(RAM))])
        self.disk = disk
        self.dev = VirtioBlock(self.mem, self.disk, queue_size=16, **device_kwargs)
        self.irqs = 0
        self.t = VirtioMmioTransport(self.dev, self.irq)
        self.drv = MmioDriver(self.t)
        self.q = MockQueue(self.mem, 16, 0x1000)
        assert self.drv.start([self.q], features) & r.DRIVER_OK

    def irq(self):
        self.irqs += 1


def notify_fuzzed_queue(disk, desc, ring, avail_idx, header):
    """Start a device on an 8-entry queue whose descriptor table, avail ring and request header
    are the fuzzer's bytes, then notify it once (which must never raise). Descriptor addresses
    and lengths are folded into a small window so some land on real memory. Returns (dev, drv, q)."""
    mem = GuestMemory([(0, bytearray(0x8000))])
    dev = VirtioBlock(mem, disk, queue_size=8)
    drv = MmioDriver(VirtioMmioTransport(dev, lambda: None))
    q = MockQueue(mem, 8, 0x100)
    drv.start([q])
    raw = bytearray(desc)
    for i in range(8):
        addr = struct.unpack_from("<Q", raw, 16 * i)[0]
        struct.pack_into("<Q", raw, 16 * i, addr % 0x9000)
        length = struct.unpack_from("<I", raw, 16 * i + 8)[0]
        struct.pack_into("<I", raw, 16 * i + 8, length % 0x1200)
    mem.write(q.desc_addr, bytes(raw))
    mem.write(0x4000, header)
    for i, h in enumerate(ring):
        mem.write_u16(q.avail_addr + 4 + 2 * i, h)
    q.set_avail_idx(avail_idx)
    drv.notify(0)
    return dev, drv, q
