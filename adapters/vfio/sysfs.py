"""What sysfs says about a host PCI function and its IOMMU group.

The kernel answers VFIO_GROUP_GET_STATUS with one bit (viable or not); sysfs tells which device of
the group keeps it from being viable, so the error can name the device and the driver to unbind.
The root is a parameter so tests run against a fake tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

VFIO_DRIVER = "vfio-pci"
# Drivers that leave DMA to the group's user (Linux: driver_managed_dma) and so keep a group
# viable: the stub, PCIe port services on bridges, and vfio-pci with its vendor variants.
_DMA_NEUTRAL = {"vfio-pci", "pci-stub", "pcieport"}
_HEADER_TYPE = 0x0E


@dataclass(frozen=True)
class GroupMember:
    host: str
    driver: str | None  # None: bound to no driver
    bridge: bool


def is_vfio_driver(driver: str | None) -> bool:
    return driver is not None and (driver == VFIO_DRIVER or driver.replace("_", "-").endswith("-vfio-pci"))


def keeps_group_viable(member: GroupMember) -> bool:
    """Whether this device lets the group be used by VFIO (before Linux 5.19, bridges with any
    driver were allowed too; later kernels allow pcieport, which is what bridges bind to)."""
    d = member.driver
    return d is None or d in _DMA_NEUTRAL or is_vfio_driver(d) or member.bridge


class PciSysfs:
    def __init__(self, root: str = "/sys"):
        self.root = root

    def device_dir(self, host: str) -> str:
        return os.path.join(self.root, "bus", "pci", "devices", host)

    def group_dir(self, group: str) -> str:
        return os.path.join(self.root, "kernel", "iommu_groups", group)

    def exists(self, host: str) -> bool:
        return os.path.isdir(self.device_dir(host))

    def iommu_group(self, host: str) -> str | None:
        return _link_name(os.path.join(self.device_dir(host), "iommu_group"))

    def driver(self, host: str) -> str | None:
        return _link_name(os.path.join(self.device_dir(host), "driver"))

    def is_bridge(self, host: str) -> bool:
        """Header type 1 or 2 (bits 0-6 of config byte 0x0e); unreadable counts as a function."""
        try:
            with open(os.path.join(self.device_dir(host), "config"), "rb") as f:
                f.seek(_HEADER_TYPE)
                b = f.read(1)
        except OSError:
            return False
        return bool(b) and (b[0] & 0x7F) != 0

    def group_members(self, group: str) -> list[GroupMember]:
        try:
            hosts = sorted(os.listdir(os.path.join(self.group_dir(group), "devices")))
        except OSError:
            return []
        return [GroupMember(h, self.driver(h), self.is_bridge(h)) for h in hosts]

    def blockers(self, group: str) -> list[GroupMember]:
        """The devices of the group whose host driver makes it non-viable."""
        return [m for m in self.group_members(group) if not keeps_group_viable(m)]


def bind_hint(host: str, driver: str | None) -> str:
    return f"bind {host} to {VFIO_DRIVER} first (driver is {driver or 'none'})"


def not_viable_reason(group: str, blockers: list[GroupMember]) -> str:
    """Why VFIO_GROUP_GET_STATUS said "not viable", from what sysfs shows."""
    if not blockers:
        return (f"IOMMU group {group} is not viable: a device of the group is in use by a host "
                f"driver; bind every device of /sys/kernel/iommu_groups/{group}/devices to {VFIO_DRIVER}")
    return f"IOMMU group {group} is not viable: " + "; ".join(bind_hint(m.host, m.driver) for m in blockers)


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None
