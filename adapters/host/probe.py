"""Read-only checks of host resources (domain.ports.HostProbe)."""

from __future__ import annotations

import os
import re

_PCI_ADDR = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


class HostProbe:
    def __init__(self, sysfs_pci: str = "/sys/bus/pci/devices"):
        self._pci = sysfs_pci

    def file_usable(self, path: str, *, write: bool) -> str | None:
        if not os.path.exists(path):
            return "No such file or directory"
        if os.path.isdir(path):
            return "Is a directory"
        if not os.access(path, os.R_OK | (os.W_OK if write else 0)):
            return "Permission denied"
        return None

    def pci_device_exists(self, host: str) -> bool:
        return bool(_PCI_ADDR.match(host)) and os.path.isdir(os.path.join(self._pci, host.lower()))

    def iommu_group(self, host: str) -> str | None:
        link = os.path.join(self._pci, host.lower(), "iommu_group")
        try:
            return os.path.basename(os.readlink(link))
        except OSError:
            return None
