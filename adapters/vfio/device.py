"""One opened VFIO PCI function (domain.ports.VfioDevice).

Regions are reached through the device fd at the offset VFIO_DEVICE_GET_REGION_INFO gave: pread/
pwrite for config space and trapped BAR accesses, mmap for the BAR areas the kernel lets us map.
Interrupts leave through eventfds handed to VFIO_DEVICE_SET_IRQS.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Sequence

from adapters.vfio.errors import VfioError, VfioIoctlError, errno_text
from adapters.vfio.kernel import DeviceInfo, RegionInfo
from adapters.vfio.plan import plan_mmap
from domain.ports import VfioIrqInfo, VfioPciIndices, VfioRegionInfo


class VfioPciDevice:
    def __init__(self, kernel, fd: int, host: str, info: DeviceInfo, indices: VfioPciIndices,
                 on_close: Callable[[VfioPciDevice], None] | None = None):
        self._k = kernel
        self.fd = fd
        self.host = host
        self.indices = indices
        self.num_regions = info.num_regions
        self.num_irqs = info.num_irqs
        self.can_reset = info.can_reset
        self._on_close = on_close
        self._regions: dict[int, RegionInfo] = {}
        self._irqs: dict[int, VfioIrqInfo] = {}
        self._maps: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.closed = False

    def _fail(self, step: str, err: BaseException, hint: str = "") -> VfioError:
        reason = errno_text(err.errno) if isinstance(err, OSError) else str(err)
        return VfioError(self.host, step, reason, hint)

    def _raw_region(self, index: int) -> RegionInfo:
        if self.closed:
            raise VfioError(self.host, f"region {index}", "the device is closed")
        r = self._regions.get(index)
        if r is None:
            if not 0 <= index < self.num_regions:
                raise VfioError(self.host, f"region {index}", f"the device has {self.num_regions} regions")
            try:
                r = self._k.region_info(self.fd, index)
            except VfioIoctlError as e:
                raise self._fail(f"VFIO_DEVICE_GET_REGION_INFO of region {index}", e) from None
            self._regions[index] = r
        return r

    # --- regions ----------------------------------------------------------------------------------

    def region_info(self, index: int) -> VfioRegionInfo:
        r = self._raw_region(index)
        return VfioRegionInfo(index=index, size=r.size, readable=r.readable, writable=r.writable,
                              mappable=r.mappable,
                              mmap_areas=plan_mmap(r.size, r.mappable, r.sparse, mmap.PAGESIZE))

    def _bounds(self, r: RegionInfo, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > r.size:
            raise VfioError(self.host, f"{what} region {r.index}",
                            f"{offset:#x}+{length:#x} is outside the region ({r.size:#x} bytes)")

    def region_read(self, index: int, offset: int, length: int) -> bytes:
        r = self._raw_region(index)
        self._bounds(r, offset, length, "read")
        if not r.readable:
            raise VfioError(self.host, f"read region {index}", "the region is not readable")
        try:
            data = os.pread(self.fd, length, r.offset + offset)
        except OSError as e:
            raise self._fail(f"read region {index} at {offset:#x}", e) from None
        if len(data) != length:
            raise VfioError(self.host, f"read region {index} at {offset:#x}",
                            f"short read ({len(data)} of {length} bytes)")
        return data

    def region_write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        r = self._raw_region(index)
        self._bounds(r, offset, len(data), "write")
        if not r.writable:
            raise VfioError(self.host, f"write region {index}", "the region is read-only")
        try:
            n = os.pwrite(self.fd, data, r.offset + offset)
        except OSError as e:
            raise self._fail(f"write region {index} at {offset:#x}", e) from None
        if n != len(data):
            raise VfioError(self.host, f"write region {index} at {offset:#x}",
                            f"short write ({n} of {len(data)} bytes)")

    def region_mmap(self, index: int) -> list[tuple[int, memoryview]]:
        r = self._raw_region(index)
        areas = plan_mmap(r.size, r.mappable, r.sparse, mmap.PAGESIZE)
        prot = (mmap.PROT_READ if r.readable else 0) | (mmap.PROT_WRITE if r.writable else 0)
        out = []
        with self._lock:
            for off, size in areas:
                try:
                    m = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=r.offset + off)
                except OSError as e:
                    raise self._fail(f"mmap of region {index} at {off:#x}", e) from None
                self._maps.append(m)
                out.append((off, memoryview(m)))
        return out

    # --- interrupts -------------------------------------------------------------------------------

    def irq_info(self, index: int) -> VfioIrqInfo:
        if self.closed:
            raise VfioError(self.host, f"IRQ index {index}", "the device is closed")
        i = self._irqs.get(index)
        if i is None:
            if not 0 <= index < self.num_irqs:
                raise VfioError(self.host, f"IRQ index {index}", f"the device has {self.num_irqs} IRQ indexes")
            try:
                i = self._k.irq_info(self.fd, index)
            except VfioIoctlError as e:
                raise self._fail(f"VFIO_DEVICE_GET_IRQ_INFO of index {index}", e) from None
            self._irqs[index] = i
        return i

    def set_irq_eventfds(self, index: int, fds: Sequence[int], start: int = 0) -> None:
        info = self.irq_info(index)
        if not info.eventfd:
            raise VfioError(self.host, f"IRQ index {index}", "the device cannot signal it through eventfds")
        if start < 0 or not fds or start + len(fds) > info.count:
            raise VfioError(self.host, f"IRQ index {index}",
                            f"vectors {start}..{start + len(fds) - 1} outside the device's {info.count}")
        self._irq_call("eventfds", index, self._k.irq_eventfds, index, start, list(fds))

    def disable_irqs(self, index: int) -> None:
        self.irq_info(index)
        self._irq_call("disable", index, self._k.irq_disable, index)

    def unmask_irq(self, index: int, subindex: int = 0) -> None:
        info = self.irq_info(index)
        if not 0 <= subindex < info.count:
            raise VfioError(self.host, f"IRQ index {index}", f"no vector {subindex}")
        self._irq_call("unmask", index, self._k.irq_unmask, index, subindex)

    def _irq_call(self, what: str, index: int, call, *args) -> None:
        try:
            call(self.fd, *args)
        except VfioIoctlError as e:
            raise self._fail(f"VFIO_DEVICE_SET_IRQS ({what}) of index {index}", e) from None

    # --- reset, close -----------------------------------------------------------------------------

    def reset(self) -> None:
        if not self.can_reset:
            raise VfioError(self.host, "VFIO_DEVICE_RESET", "the device has no reset method",
                            "it cannot be reset without resetting its bus")
        try:
            self._k.reset(self.fd)
        except VfioIoctlError as e:
            raise self._fail("VFIO_DEVICE_RESET", e) from None

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            maps, self._maps = self._maps, []
        for m in maps:
            try:
                m.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes when that view does
        os.close(self.fd)
        if self._on_close is not None:
            self._on_close(self)

    release = close
