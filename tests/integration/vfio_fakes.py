"""Test doubles for VFIO: a sysfs tree in a directory, and a scripted kernel.

The scripted kernel answers the VFIO ioctls the way Linux does for a host with an IOMMU (which
this test host lacks), records every call, and can refuse any one of them with an errno, so the
manager's sequence, bookkeeping and undo paths run for real.
"""

from __future__ import annotations

import os
import struct

from adapters.vfio import kernel as kmod
from adapters.vfio.errors import VfioIoctlError
from adapters.vfio.kernel import DeviceInfo, GroupStatus, IommuInfo, RegionInfo

lib = kmod.lib


class FakeSysfs:
    """/sys/bus/pci/devices/HOST/{iommu_group,driver,config} and /sys/kernel/iommu_groups/G/devices."""

    def __init__(self, root):
        self.root = str(root)
        os.makedirs(os.path.join(self.root, "bus", "pci", "devices"), exist_ok=True)

    def add(self, host: str, *, group: str | None = None, driver: str | None = None, bridge: bool = False):
        dev = os.path.join(self.root, "bus", "pci", "devices", host)
        os.makedirs(dev)
        cfg = bytearray(256)
        cfg[0x0E] = 0x01 if bridge else 0x00
        with open(os.path.join(dev, "config"), "wb") as f:
            f.write(cfg)
        if driver:
            drv = os.path.join(self.root, "bus", "pci", "drivers", driver)
            os.makedirs(drv, exist_ok=True)
            os.symlink(os.path.relpath(drv, dev), os.path.join(dev, "driver"))
        if group is not None:
            gpath = os.path.join(self.root, "kernel", "iommu_groups", group)
            gdir = os.path.join(gpath, "devices")
            os.makedirs(gdir, exist_ok=True)
            os.symlink(os.path.relpath(gpath, dev), os.path.join(dev, "iommu_group"))
            os.symlink(os.path.relpath(dev, gdir), os.path.join(gdir, host))
        return dev


class FakeDevice:
    """A device fd: a regular file whose contents are the regions, at VFIO's index << 40 offsets
    scaled down to index << 20 so the file stays small."""

    SHIFT = 20

    def __init__(self, path: str, regions: dict[int, tuple[int, int, tuple | None]], *, flags=None,
                 irqs: dict[int, tuple[int, int]] | None = None):
        self.path = path
        self.regions = regions  # index -> (flags, size, sparse)
        self.flags = lib.VFIO_DEVICE_FLAGS_PCI | lib.VFIO_DEVICE_FLAGS_RESET if flags is None else flags
        self.irqs = irqs or {0: (1, lib.VFIO_IRQ_INFO_EVENTFD | lib.VFIO_IRQ_INFO_MASKABLE
                                 | lib.VFIO_IRQ_INFO_AUTOMASKED),
                             1: (1, lib.VFIO_IRQ_INFO_EVENTFD | lib.VFIO_IRQ_INFO_NORESIZE),
                             2: (8, lib.VFIO_IRQ_INFO_EVENTFD | lib.VFIO_IRQ_INFO_NORESIZE)}
        size = (max(regions) + 1) << self.SHIFT
        with open(path, "wb") as f:
            f.truncate(size)

    def offset(self, index: int) -> int:
        return index << self.SHIFT


def rw_flags(mmap=False):
    return lib.VFIO_REGION_INFO_FLAG_READ | lib.VFIO_REGION_INFO_FLAG_WRITE | (
        lib.VFIO_REGION_INFO_FLAG_MMAP if mmap else 0)


def pci_config(header_type: int = 0) -> bytes:
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, 0, 0x8086, 0x10FB)
    cfg[0x0E] = header_type
    return bytes(cfg)


class ScriptedKernel:
    def __init__(self, *, api=None, type1v2=True, type1=True, viable=True, pgsizes=0x1000 | 0x200000,
                 iova_ranges=(), devices: dict[str, FakeDevice] | None = None):
        self.api = lib.VFIO_API_VERSION if api is None else api
        self.exts = {lib.VFIO_TYPE1v2_IOMMU: type1v2, lib.VFIO_TYPE1_IOMMU: type1}
        self.viable = viable
        self.info = IommuInfo(pgsizes, tuple(iova_ranges))
        self.devices = devices or {}
        self.calls: list[tuple] = []
        self.fail: dict[str, int] = {}  # method name -> errno
        self.container_of: dict[int, int] = {}  # group fd -> container fd
        self.device_fds: dict[int, FakeDevice] = {}

    def _enter(self, name, *args):
        self.calls.append((name, *args))
        if name in self.fail:
            raise VfioIoctlError(name.upper(), self.fail[name])

    def names(self):
        return [c[0] for c in self.calls]

    def api_version(self, c):
        self._enter("api_version", c)
        return self.api

    def check_extension(self, c, ext):
        self._enter("check_extension", c, ext)
        return self.exts.get(ext, False)

    def set_iommu(self, c, t):
        self._enter("set_iommu", c, t)

    def iommu_info(self, c):
        self._enter("iommu_info", c)
        return self.info

    def map_dma(self, c, iova, vaddr, size):
        self._enter("map_dma", c, iova, vaddr, size)

    def unmap_dma(self, c, iova, size):
        self._enter("unmap_dma", c, iova, size)

    def group_status(self, g):
        self._enter("group_status", g)
        return GroupStatus(self.viable, g in self.container_of)

    def set_container(self, g, c):
        self._enter("set_container", g, c)
        self.container_of[g] = c

    def unset_container(self, g):
        self._enter("unset_container", g)
        self.container_of.pop(g, None)

    def get_device_fd(self, g, host):
        self._enter("get_device_fd", g, host)
        dev = self.devices[host]
        fd = os.open(dev.path, os.O_RDWR | os.O_CLOEXEC)
        self.device_fds[fd] = dev
        return fd

    def device_info(self, d):
        self._enter("device_info", d)
        dev = self.device_fds[d]
        return DeviceInfo(dev.flags, max(dev.regions) + 1, max(dev.irqs) + 1)

    def region_info(self, d, index):
        self._enter("region_info", d, index)
        dev = self.device_fds[d]
        flags, size, sparse = dev.regions.get(index, (0, 0, None))
        return RegionInfo(index, flags, size, dev.offset(index), sparse)

    def irq_info(self, d, index):
        self._enter("irq_info", d, index)
        count, flags = self.device_fds[d].irqs.get(index, (0, 0))
        return kmod.parse_irq_info(index, count, flags)

    def irq_eventfds(self, d, index, start, fds):
        self._enter("irq_eventfds", d, index, start, list(fds))

    def irq_disable(self, d, index):
        self._enter("irq_disable", d, index)

    def irq_unmask(self, d, index, sub):
        self._enter("irq_unmask", d, index, sub)

    def reset(self, d):
        self._enter("reset", d)

    def host_address(self, view):
        return kmod.VfioKernel().host_address(view)
