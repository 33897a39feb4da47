"""The VFIO ioctls, over the structs cffi compiled from <linux/vfio.h>.

One method per ioctl, plain Python values in and out, VfioIoctlError (op + errno) on refusal.
The manager and the device handle add which device and step it was, and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from adapters.vfio.errors import VfioIoctlError
from domain.ports import VfioIrqInfo, VfioPciIndices

try:
    from adapters.vfio._vfio_cffi import ffi, lib
except ImportError:  # pragma: no cover - depends on the build
    ffi = lib = None

BUILD_HINT = "run `pip install -e .` or `python adapters/vfio/_ffi_build.py` from the repository root"
_MAX_CAPS = 64  # a capability chain longer than this is a loop


def available() -> bool:
    return lib is not None


@dataclass(frozen=True)
class GroupStatus:
    viable: bool
    container_set: bool


@dataclass(frozen=True)
class IommuInfo:
    pgsizes: int  # bitmap of IOMMU page sizes, 0 when not reported
    iova_ranges: tuple[tuple[int, int], ...]  # usable (start, end inclusive), () when not reported


@dataclass(frozen=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int

    @property
    def pci(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_PCI)

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_RESET)


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int  # where the region starts in the device fd (pread/pwrite/mmap offset)
    sparse: tuple[tuple[int, int], ...] | None  # sparse-mmap areas, None without the capability

    @property
    def readable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_MMAP)


def pci_indices() -> VfioPciIndices:
    return VfioPciIndices(
        bars=(lib.VFIO_PCI_BAR0_REGION_INDEX, lib.VFIO_PCI_BAR1_REGION_INDEX, lib.VFIO_PCI_BAR2_REGION_INDEX,
              lib.VFIO_PCI_BAR3_REGION_INDEX, lib.VFIO_PCI_BAR4_REGION_INDEX, lib.VFIO_PCI_BAR5_REGION_INDEX),
        rom=lib.VFIO_PCI_ROM_REGION_INDEX, config=lib.VFIO_PCI_CONFIG_REGION_INDEX,
        intx=lib.VFIO_PCI_INTX_IRQ_INDEX, msi=lib.VFIO_PCI_MSI_IRQ_INDEX, msix=lib.VFIO_PCI_MSIX_IRQ_INDEX)


def _check(rc: int, op: str) -> int:
    if rc < 0:
        raise VfioIoctlError(op, -rc)
    return rc


def _new(ctype: str, size: int | None = None):
    """A zeroed struct with argsz set; ``size`` > sizeof leaves room for a capability chain."""
    size = max(size or 0, ffi.sizeof(ctype))
    buf = ffi.new("char[]", size)
    s = ffi.cast(ctype + " *", buf)
    s.argsz = size
    return buf, s


def walk_caps(buf, size: int, first: int) -> dict[int, int]:
    """{capability id: offset} of an info struct's capability chain (offsets from its start).
    A chain pointing outside the buffer, backwards onto itself, or too long, ends there."""
    found: dict[int, int] = {}
    hdr_size = ffi.sizeof("struct vfio_info_cap_header")
    off, seen = first, set()
    while off and off not in seen and off + hdr_size <= size and len(seen) < _MAX_CAPS:
        seen.add(off)
        hdr = ffi.cast("struct vfio_info_cap_header *", buf + off)
        found.setdefault(hdr.id, off)
        off = hdr.next
    return found


def sparse_areas(buf, size: int, off: int) -> tuple[tuple[int, int], ...]:
    cap = ffi.cast("struct vfio_region_info_cap_sparse_mmap *", buf + off)
    start = off + ffi.offsetof("struct vfio_region_info_cap_sparse_mmap", "areas")
    item = ffi.sizeof("struct vfio_region_sparse_mmap_area")
    n = min(cap.nr_areas, max(0, (size - start) // item))
    return tuple((cap.areas[i].offset, cap.areas[i].size) for i in range(n))


def iova_ranges(buf, size: int, off: int) -> tuple[tuple[int, int], ...]:
    cap = ffi.cast("struct vfio_iommu_type1_info_cap_iova_range *", buf + off)
    start = off + ffi.offsetof("struct vfio_iommu_type1_info_cap_iova_range", "iova_ranges")
    item = ffi.sizeof("struct vfio_iova_range")
    n = min(cap.nr_iovas, max(0, (size - start) // item))
    return tuple((cap.iova_ranges[i].start, cap.iova_ranges[i].end) for i in range(n))


class VfioKernel:
    """The real kernel. Tests substitute an object with the same methods."""

    # --- container ------------------------------------------------------------------------------

    def api_version(self, container: int) -> int:
        return _check(lib.px_vfio_ioctl_int(container, lib.VFIO_GET_API_VERSION, 0), "VFIO_GET_API_VERSION")

    def check_extension(self, container: int, ext: int) -> bool:
        return _check(lib.px_vfio_ioctl_int(container, lib.VFIO_CHECK_EXTENSION, ext), "VFIO_CHECK_EXTENSION") > 0

    def set_iommu(self, container: int, iommu_type: int) -> None:
        _check(lib.px_vfio_ioctl_int(container, lib.VFIO_SET_IOMMU, iommu_type), "VFIO_SET_IOMMU")

    def iommu_info(self, container: int) -> IommuInfo:
        ctype = "struct vfio_iommu_type1_info"
        buf, info = _new(ctype)
        _check(lib.px_vfio_ioctl_ptr(container, lib.VFIO_IOMMU_GET_INFO, buf), "VFIO_IOMMU_GET_INFO")
        if info.flags & lib.VFIO_IOMMU_INFO_CAPS and info.argsz > ffi.sizeof(ctype):
            buf, info = _new(ctype, info.argsz)  # the kernel said how much room the chain needs
            _check(lib.px_vfio_ioctl_ptr(container, lib.VFIO_IOMMU_GET_INFO, buf), "VFIO_IOMMU_GET_INFO")
        pgsizes = info.iova_pgsizes if info.flags & lib.VFIO_IOMMU_INFO_PGSIZES else 0
        ranges: tuple[tuple[int, int], ...] = ()
        if info.flags & lib.VFIO_IOMMU_INFO_CAPS:
            caps = walk_caps(buf, info.argsz, info.cap_offset)
            if lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE in caps:
                ranges = iova_ranges(buf, info.argsz, caps[lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE])
        return IommuInfo(pgsizes, ranges)

    def map_dma(self, container: int, iova: int, vaddr: int, size: int) -> None:
        buf, m = _new("struct vfio_iommu_type1_dma_map")
        m.flags = lib.VFIO_DMA_MAP_FLAG_READ | lib.VFIO_DMA_MAP_FLAG_WRITE
        m.iova, m.vaddr, m.size = iova, vaddr, size
        _check(lib.px_vfio_ioctl_ptr(container, lib.VFIO_IOMMU_MAP_DMA, buf), "VFIO_IOMMU_MAP_DMA")

    def unmap_dma(self, container: int, iova: int, size: int) -> None:
        buf, m = _new("struct vfio_iommu_type1_dma_unmap")
        m.iova, m.size = iova, size
        _check(lib.px_vfio_ioctl_ptr(container, lib.VFIO_IOMMU_UNMAP_DMA, buf), "VFIO_IOMMU_UNMAP_DMA")

    # --- group ----------------------------------------------------------------------------------

    def group_status(self, group: int) -> GroupStatus:
        buf, st = _new("struct vfio_group_status")
        _check(lib.px_vfio_ioctl_ptr(group, lib.VFIO_GROUP_GET_STATUS, buf), "VFIO_GROUP_GET_STATUS")
        return parse_group_status(st.flags)

    def set_container(self, group: int, container: int) -> None:
        fd = ffi.new("int32_t *", container)
        _check(lib.px_vfio_ioctl_ptr(group, lib.VFIO_GROUP_SET_CONTAINER, fd), "VFIO_GROUP_SET_CONTAINER")

    def unset_container(self, group: int) -> None:
        _check(lib.px_vfio_ioctl_int(group, lib.VFIO_GROUP_UNSET_CONTAINER, 0), "VFIO_GROUP_UNSET_CONTAINER")

    def get_device_fd(self, group: int, host: str) -> int:
        name = ffi.new("char[]", host.encode())
        return _check(lib.px_vfio_ioctl_ptr(group, lib.VFIO_GROUP_GET_DEVICE_FD, name), "VFIO_GROUP_GET_DEVICE_FD")

    # --- device ---------------------------------------------------------------------------------

    def device_info(self, device: int) -> DeviceInfo:
        buf, info = _new("struct vfio_device_info")
        _check(lib.px_vfio_ioctl_ptr(device, lib.VFIO_DEVICE_GET_INFO, buf), "VFIO_DEVICE_GET_INFO")
        return DeviceInfo(info.flags, info.num_regions, info.num_irqs)

    def region_info(self, device: int, index: int) -> RegionInfo:
        ctype = "struct vfio_region_info"
        buf, info = _new(ctype)
        info.index = index
        _check(lib.px_vfio_ioctl_ptr(device, lib.VFIO_DEVICE_GET_REGION_INFO, buf), "VFIO_DEVICE_GET_REGION_INFO")
        if info.flags & lib.VFIO_REGION_INFO_FLAG_CAPS and info.argsz > ffi.sizeof(ctype):
            buf, info = _new(ctype, info.argsz)
            info.index = index
            _check(lib.px_vfio_ioctl_ptr(device, lib.VFIO_DEVICE_GET_REGION_INFO, buf),
                   "VFIO_DEVICE_GET_REGION_INFO")
        return parse_region_info(buf, info.argsz)

    def irq_info(self, device: int, index: int) -> VfioIrqInfo:
        buf, info = _new("struct vfio_irq_info")
        info.index = index
        _check(lib.px_vfio_ioctl_ptr(device, lib.VFIO_DEVICE_GET_IRQ_INFO, buf), "VFIO_DEVICE_GET_IRQ_INFO")
        return parse_irq_info(info.index, info.count, info.flags)

    def irq_eventfds(self, device: int, index: int, start: int, eventfds: Sequence[int]) -> None:
        """Signal vectors start.. of an IRQ index through these eventfds (-1: none)."""
        self._set_irqs(device, lib.VFIO_IRQ_SET_ACTION_TRIGGER, index, start, len(eventfds), eventfds)

    def irq_disable(self, device: int, index: int) -> None:
        """DATA_NONE | ACTION_TRIGGER with count 0: stop signalling the whole index."""
        self._set_irqs(device, lib.VFIO_IRQ_SET_ACTION_TRIGGER, index, 0, 0, None)

    def irq_unmask(self, device: int, index: int, subindex: int) -> None:
        self._set_irqs(device, lib.VFIO_IRQ_SET_ACTION_UNMASK, index, subindex, 1, None)

    def _set_irqs(self, device: int, action: int, index: int, start: int, count: int,
                  eventfds: Sequence[int] | None) -> None:
        buf = irq_set_buffer(action, index, start, count, eventfds)
        _check(lib.px_vfio_ioctl_ptr(device, lib.VFIO_DEVICE_SET_IRQS, buf), "VFIO_DEVICE_SET_IRQS")

    def reset(self, device: int) -> None:
        _check(lib.px_vfio_ioctl_int(device, lib.VFIO_DEVICE_RESET, 0), "VFIO_DEVICE_RESET")

    # --- guest RAM --------------------------------------------------------------------------------

    def host_address(self, view: memoryview) -> int:
        """The process address of a buffer (guest RAM), without keeping it exported: an export
        would stop the allocator from closing the mmap later."""
        with ffi.from_buffer(view, require_writable=True) as p:
            return int(ffi.cast("uintptr_t", p))


def irq_set_buffer(action: int, index: int, start: int, count: int, eventfds: Sequence[int] | None):
    """struct vfio_irq_set followed by one int32 eventfd per vector (DATA_EVENTFD), or by
    nothing (DATA_NONE)."""
    data = 0 if eventfds is None else ffi.sizeof("int32_t") * len(eventfds)
    buf, s = _new("struct vfio_irq_set", ffi.sizeof("struct vfio_irq_set") + data)
    s.flags = action | (lib.VFIO_IRQ_SET_DATA_NONE if eventfds is None else lib.VFIO_IRQ_SET_DATA_EVENTFD)
    s.index, s.start, s.count = index, start, count
    if eventfds:
        fds = ffi.cast("int32_t *", buf + ffi.offsetof("struct vfio_irq_set", "data"))
        for i, fd in enumerate(eventfds):
            fds[i] = fd
    return buf


def parse_group_status(flags: int) -> GroupStatus:
    return GroupStatus(viable=bool(flags & lib.VFIO_GROUP_FLAGS_VIABLE),
                       container_set=bool(flags & lib.VFIO_GROUP_FLAGS_CONTAINER_SET))


def parse_region_info(buf, size: int) -> RegionInfo:
    info = ffi.cast("struct vfio_region_info *", buf)
    sparse = None
    if info.flags & lib.VFIO_REGION_INFO_FLAG_CAPS:
        caps = walk_caps(buf, min(size, info.argsz), info.cap_offset)
        if lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP in caps:
            sparse = sparse_areas(buf, min(size, info.argsz), caps[lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP])
    return RegionInfo(info.index, info.flags, info.size, info.offset, sparse)


def parse_irq_info(index: int, count: int, flags: int) -> VfioIrqInfo:
    return VfioIrqInfo(index=index, count=count, eventfd=bool(flags & lib.VFIO_IRQ_INFO_EVENTFD),
                       maskable=bool(flags & lib.VFIO_IRQ_INFO_MASKABLE),
                       automasked=bool(flags & lib.VFIO_IRQ_INFO_AUTOMASKED),
                       resizable=not flags & lib.VFIO_IRQ_INFO_NORESIZE)
