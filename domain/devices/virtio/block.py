"""virtio-blk (virtio 1.1 §5.2): one request queue, 512-byte sectors, data moved by the backend's
readv/writev straight into/out of guest memory views.

A request is a readable 16-byte header (type, reserved, sector), data buffers, and a writable
status byte at the very end. Malformed requests complete with an error status (or, without room
for a status byte, with used length 0); only broken queues make the device need a reset.
"""

from __future__ import annotations

import struct

from domain.devices.virtio import iov
from domain.devices.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice
from domain.devices.virtio.queue import DescriptorChain
from domain.errors import VmmError
from domain.memory import GuestMemory
from domain.ports import BlockBackend

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
QUEUE_SIZE = 256
SIZE_MAX = 1 << 20  # largest single data segment we advertise


class VirtioBlock(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK

    def __init__(self, mem: GuestMemory, backend: BlockBackend, *, readonly: bool | None = None,
                 serial: str = "", queue_size: int = QUEUE_SIZE):
        self.backend = backend
        self.readonly = backend.readonly if readonly is None else readonly
        self.serial = serial.encode("ascii", "replace")[:ID_BYTES]
        features = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if self.readonly:
            features |= VIRTIO_BLK_F_RO
        super().__init__(mem, [queue_size], features)
        self.capacity = backend.size // SECTOR_SIZE  # in 512-byte sectors
        self.seg_max = queue_size - 2  # room for header and status in a full-size chain
        self.stats = {"rd_ops": 0, "wr_ops": 0, "flush_ops": 0, "rd_bytes": 0, "wr_bytes": 0, "errors": 0}

    def config_bytes(self) -> bytes:
        # capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size
        return struct.pack("<QIIHBBI", self.capacity, SIZE_MAX, self.seg_max, 0, 0, 0, SECTOR_SIZE)

    def handle_queue(self, index: int) -> None:
        q = self.queues[0]
        while True:
            q.disable_notification()
            while (chain := q.pop()) is not None:
                q.add_used(chain.head, self._request(chain))
            if not q.enable_notification():
                break
        self.signal_used(0)

    def _request(self, chain: DescriptorChain) -> int:
        """Execute one request; returns the used length (bytes written into the chain)."""
        mem = self.mem
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        for addr, length, w in chain.descs:
            if w:
                writable.append((addr, length))
            elif writable:
                return self._finish(None, VIRTIO_BLK_S_IOERR)  # readable after writable: malformed
            else:
                readable.append((addr, length))
        while writable and writable[-1][1] == 0:
            writable.pop()
        if not writable:
            self.stats["errors"] += 1
            return 0  # nowhere to put the status byte
        status_addr = writable[-1][0] + writable[-1][1] - 1
        out_len = iov.total(writable) - 1  # device-writable data bytes before the status byte
        if iov.total(readable) < HEADER.size:
            return self._finish(status_addr, VIRTIO_BLK_S_IOERR)
        rtype, _, sector = HEADER.unpack(iov.gather(mem, readable, 0, HEADER.size))
        in_len = iov.total(readable) - HEADER.size  # driver-supplied data bytes after the header
        if rtype == VIRTIO_BLK_T_IN:
            return self._read(sector, iov.views(mem, writable, 0, out_len), out_len, status_addr)
        if rtype == VIRTIO_BLK_T_OUT:
            if self.readonly:
                return self._finish(status_addr, VIRTIO_BLK_S_IOERR)
            return self._write(sector, iov.views(mem, readable, HEADER.size, in_len), in_len, status_addr)
        if rtype == VIRTIO_BLK_T_FLUSH:
            try:
                self.backend.flush()
            except (OSError, VmmError):
                return self._finish(status_addr, VIRTIO_BLK_S_IOERR)
            self.stats["flush_ops"] += 1
            return self._finish(status_addr, VIRTIO_BLK_S_OK)
        if rtype == VIRTIO_BLK_T_GET_ID:
            n = min(ID_BYTES, out_len)
            iov.scatter(mem, writable, 0, self.serial.ljust(ID_BYTES, b"\0")[:n])
            return self._finish(status_addr, VIRTIO_BLK_S_OK, n)
        return self._finish(status_addr, VIRTIO_BLK_S_UNSUPP)

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + length <= self.capacity * SECTOR_SIZE

    def _read(self, sector: int, bufs: list[memoryview], length: int, status_addr: int) -> int:
        if not self._in_range(sector, length):
            return self._finish(status_addr, VIRTIO_BLK_S_IOERR)
        try:
            done = self.backend.readv(sector * SECTOR_SIZE, bufs) if length else 0
        except (OSError, VmmError):
            done = -1
        if done != length:
            return self._finish(status_addr, VIRTIO_BLK_S_IOERR)
        self.stats["rd_ops"] += 1
        self.stats["rd_bytes"] += length
        return self._finish(status_addr, VIRTIO_BLK_S_OK, length)

    def _write(self, sector: int, bufs: list[memoryview], length: int, status_addr: int) -> int:
        if not self._in_range(sector, length):
            return self._finish(status_addr, VIRTIO_BLK_S_IOERR)
        try:
            done = self.backend.writev(sector * SECTOR_SIZE, bufs) if length else 0
        except (OSError, VmmError):
            done = -1
        if done != length:
            return self._finish(status_addr, VIRTIO_BLK_S_IOERR)
        self.stats["wr_ops"] += 1
        self.stats["wr_bytes"] += length
        return self._finish(status_addr, VIRTIO_BLK_S_OK)

    def _finish(self, status_addr: int | None, status: int, data_len: int = 0) -> int:
        """Write the status byte last, after the data; returns the used length."""
        if status != VIRTIO_BLK_S_OK:
            self.stats["errors"] += 1
        if status_addr is None:
            return 0
        self.mem.view(status_addr, 1)[0] = status
        return data_len + 1

    def save_device_state(self) -> dict:
        return {"capacity": self.capacity}

    def restore_device_state(self, state: dict) -> None:
        pass  # capacity comes from the backend opened on the destination
