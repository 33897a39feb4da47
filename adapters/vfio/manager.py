"""VfioManager (domain.ports.VfioOpener): host PCI functions opened through VFIO for one VM.

The sequence for a device (Documentation/driver-api/vfio.rst):
  sysfs: the device, its IOMMU group, its driver (must be vfio-pci);
  container: open /dev/vfio/vfio, VFIO_GET_API_VERSION, VFIO_CHECK_EXTENSION (TYPE1v2, else TYPE1);
  group: open /dev/vfio/GROUP, VFIO_GROUP_GET_STATUS (viable?), VFIO_GROUP_SET_CONTAINER;
  first group only: VFIO_SET_IOMMU, VFIO_IOMMU_GET_INFO, VFIO_IOMMU_MAP_DMA of all guest RAM;
  device: VFIO_GROUP_GET_DEVICE_FD, VFIO_DEVICE_GET_INFO (regions and IRQs come on demand).
One container serves every group of the VM, so guest RAM is mapped (and pinned) once. A step that
fails undoes what this call opened and raises VfioError: the step, the kernel's answer, the fix.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.vfio import kernel as kmod
from adapters.vfio.device import VfioPciDevice
from adapters.vfio.errors import VfioError, VfioIoctlError, errno_text
from adapters.vfio.plan import DmaMapping, PlanError, iommu_page_size, plan_dma
from adapters.vfio.sysfs import PciSysfs, bind_hint, is_vfio_driver, not_viable_reason
from domain.memory import GuestMemory

log = logging.getLogger("pystrato.vfio")

IOMMU_HINT = "VFIO needs an IOMMU: enable VT-d/AMD-Vi and boot the host with intel_iommu=on or amd_iommu=on"
MODULE_HINT = "load the vfio-pci module (modprobe vfio-pci) on a host with an IOMMU enabled"
ROOT_HINT = "run pystrato as root or give it access to /dev/vfio"
MEMLOCK_HINT = "guest RAM is pinned for device DMA: raise the locked-memory limit (ulimit -l) above the guest RAM size"


@dataclass
class _Container:
    fd: int
    iommu_type: int
    iommu_set: bool = False
    mappings: list[DmaMapping] = field(default_factory=list)


@dataclass
class _Group:
    id: str
    fd: int
    devices: set[str] = field(default_factory=set)


class VfioManager:
    def __init__(self, memory: Callable[[], GuestMemory | None] | None = None, *,
                 sysfs: PciSysfs | None = None, dev_dir: str = "/dev/vfio", kernel=None):
        """``memory`` returns the VM's guest RAM (None before it is allocated): the device's
        DMA targets. ``kernel`` replaces the ioctls in tests."""
        self._memory = memory
        self._sysfs = sysfs or PciSysfs()
        self._dev_dir = dev_dir
        self._kernel = kernel
        self._lock = threading.RLock()
        self._container: _Container | None = None
        self._groups: dict[str, _Group] = {}
        self._devices: dict[str, VfioPciDevice] = {}

    # --- open -------------------------------------------------------------------------------------

    def open_device(self, host: str) -> VfioPciDevice:
        host = host.lower()
        with self._lock:
            if host in self._devices:
                raise VfioError(host, "open", "the device is already assigned to this VM")
            group_id = self._check_sysfs(host)
            k = self._kernel_for(host)
            regions = self._guest_ram(host, k)
            new_container = self._container is None
            group = self._groups.get(group_id)
            new_group = group is None
            try:
                if new_container:
                    self._container = self._open_container(host, k)
                if new_group:
                    group = self._open_group(host, group_id, k)
                    self._groups[group_id] = group
                    self._attach(host, group, k, regions)
                dev = self._open(host, group, k)
            except BaseException:
                if new_group and group is not None:
                    self._drop_group(group, k)
                if new_container and not self._groups:
                    self._drop_container()
                raise
            group.devices.add(host)
            self._devices[host] = dev
            return dev

    def _check_sysfs(self, host: str) -> str:
        s = self._sysfs
        if not s.exists(host):
            raise VfioError(host, "find the device", f"{s.device_dir(host)} does not exist")
        group = s.iommu_group(host)
        if group is None:
            raise VfioError(host, "find the IOMMU group", f"{s.device_dir(host)}/iommu_group is missing", IOMMU_HINT)
        driver = s.driver(host)
        if not is_vfio_driver(driver):
            raise VfioError(host, "check the host driver", "the device is not bound to vfio-pci",
                            bind_hint(host, driver))
        return group

    def _kernel_for(self, host: str):
        if self._kernel is None:
            if not kmod.available():
                raise VfioError(host, "load the VFIO bindings", "adapters.vfio._vfio_cffi is not built",
                                kmod.BUILD_HINT)
            self._kernel = kmod.VfioKernel()
        return self._kernel

    @property
    def guest_memory(self) -> GuestMemory | None:
        return self._memory() if self._memory is not None else None

    def _guest_ram(self, host: str, k) -> list[tuple[int, int, int]]:
        memory = self.guest_memory
        if memory is None:
            raise VfioError(host, "map guest RAM for DMA", "the VM has no guest RAM yet")
        return [(r.gpa, r.size, k.host_address(r.view)) for r in memory.regions]

    def _open_path(self, host: str, path: str, hints: dict[int, str]) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VfioError(host, f"open {path}", errno_text(e.errno), hints.get(e.errno, "")) from None

    def _ioctl(self, host: str, step: str, call, *args, hints: dict[int, str] | None = None):
        try:
            return call(*args)
        except VfioIoctlError as e:
            raise VfioError(host, step, errno_text(e.errno), (hints or {}).get(e.errno, "")) from None

    def _open_container(self, host: str, k) -> _Container:
        path = os.path.join(self._dev_dir, "vfio")
        fd = self._open_path(host, path, {errno.ENOENT: MODULE_HINT, errno.ENODEV: MODULE_HINT,
                                          errno.EACCES: ROOT_HINT, errno.EPERM: ROOT_HINT})
        try:
            version = self._ioctl(host, "VFIO_GET_API_VERSION", k.api_version, fd)
            if version != kmod.lib.VFIO_API_VERSION:
                raise VfioError(host, "VFIO_GET_API_VERSION",
                                f"the kernel speaks VFIO API {version}, pystrato {kmod.lib.VFIO_API_VERSION}")
            for iommu in (kmod.lib.VFIO_TYPE1v2_IOMMU, kmod.lib.VFIO_TYPE1_IOMMU):
                if self._ioctl(host, "VFIO_CHECK_EXTENSION", k.check_extension, fd, iommu):
                    return _Container(fd, iommu)
            raise VfioError(host, "VFIO_CHECK_EXTENSION", "the host has no type1 IOMMU driver",
                            "load vfio_iommu_type1 (modprobe vfio_iommu_type1)")
        except BaseException:
            os.close(fd)
            raise

    def _open_group(self, host: str, group_id: str, k) -> _Group:
        path = os.path.join(self._dev_dir, group_id)
        hint = bind_hint(host, self._sysfs.driver(host))
        fd = self._open_path(host, path, {errno.ENOENT: hint, errno.EBUSY: "the group is in use by another process",
                                          errno.EACCES: ROOT_HINT, errno.EPERM: ROOT_HINT})
        try:
            status = self._ioctl(host, "VFIO_GROUP_GET_STATUS", k.group_status, fd)
            if not status.viable:
                raise VfioError(host, "VFIO_GROUP_GET_STATUS",
                                not_viable_reason(group_id, self._sysfs.blockers(group_id)))
            if status.container_set:
                raise VfioError(host, "VFIO_GROUP_GET_STATUS", f"IOMMU group {group_id} already has a container",
                                "the group is in use by another process")
            self._ioctl(host, f"VFIO_GROUP_SET_CONTAINER of group {group_id}", k.set_container,
                        fd, self._container.fd)
        except BaseException:
            os.close(fd)
            raise
        return _Group(group_id, fd)

    def _attach(self, host: str, group: _Group, k, regions: list[tuple[int, int, int]]) -> None:
        """The container's first group gives it an IOMMU: map guest RAM then."""
        c = self._container
        if c.iommu_set:
            return
        self._ioctl(host, "VFIO_SET_IOMMU", k.set_iommu, c.fd, c.iommu_type)
        c.iommu_set = True
        info = self._ioctl(host, "VFIO_IOMMU_GET_INFO", k.iommu_info, c.fd)
        try:
            plan = plan_dma(regions, iommu_page_size(info.pgsizes), info.iova_ranges)
        except PlanError as e:
            raise VfioError(host, "plan the DMA map of guest RAM", str(e)) from None
        for m in plan:
            self._ioctl(host, f"VFIO_IOMMU_MAP_DMA of guest RAM {m.iova:#x}+{m.size:#x}", k.map_dma,
                        c.fd, m.iova, m.vaddr, m.size, hints={errno.ENOMEM: MEMLOCK_HINT})
            c.mappings.append(m)

    def _open(self, host: str, group: _Group, k) -> VfioPciDevice:
        fd = self._ioctl(host, "VFIO_GROUP_GET_DEVICE_FD", k.get_device_fd, group.fd, host,
                         hints={errno.EBUSY: "the device is open in another process"})
        try:
            info = self._ioctl(host, "VFIO_DEVICE_GET_INFO", k.device_info, fd)
            indices = kmod.pci_indices()
            if not info.pci:
                raise VfioError(host, "VFIO_DEVICE_GET_INFO", "vfio-pci did not report a PCI device")
            if info.num_regions <= indices.config:
                raise VfioError(host, "VFIO_DEVICE_GET_INFO", f"only {info.num_regions} regions: no config space")
        except BaseException:
            os.close(fd)
            raise
        return VfioPciDevice(k, fd, host, info, indices, on_close=self._device_closed)

    # --- close ------------------------------------------------------------------------------------

    def _device_closed(self, dev: VfioPciDevice) -> None:
        with self._lock:
            self._devices.pop(dev.host, None)
            for group in list(self._groups.values()):
                group.devices.discard(dev.host)
                if not group.devices:
                    self._drop_group(group, self._kernel)
            if not self._groups:
                self._drop_container()

    def _drop_group(self, group: _Group, k) -> None:
        self._groups.pop(group.id, None)
        try:
            k.unset_container(group.fd)
        except VfioIoctlError as e:
            log.warning("VFIO group %s: %s", group.id, e)
        os.close(group.fd)

    def _drop_container(self) -> None:
        """Closing the container fd drops its DMA maps and unpins guest RAM."""
        c, self._container = self._container, None
        if c is not None:
            os.close(c.fd)

    def close(self) -> None:
        """Close every device this manager opened (VM teardown)."""
        for dev in list(self._devices.values()):
            dev.close()

    @property
    def dma_mappings(self) -> list[DmaMapping]:
        return list(self._container.mappings) if self._container else []
