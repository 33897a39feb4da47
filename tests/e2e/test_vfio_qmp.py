"""The manual's VFIO hot-plug over QMP on a host that cannot pass a device through.

device_add vfio-pci runs the real path (sysfs, then VFIO through the composition root's
VfioManager): a missing host device and a device without an IOMMU group both answer GenericError
with one clear line, and leave the root port free.
"""

import os

import pytest

Q35 = ["-machine", "q35", "-smp", "1", "-m", "256",
       "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x2"]
SYS_PCI = "/sys/bus/pci/devices"


def _vfio_add(c, host):
    return c.cmd("device_add", {"id": "vfio-0", "driver": "vfio-pci", "bus": "pcie.1", "addr": "0x0",
                                "host": host})[-1]


def test_missing_host_device(vmm):
    c = vmm(*Q35).client()
    host = "0000:1a:00.3"
    if os.path.exists(os.path.join(SYS_PCI, host)):
        pytest.skip(f"{host} exists on this host")
    err = _vfio_add(c, host)["error"]
    assert err == {"class": "GenericError",
                   "desc": f"host PCI device '{host}' not found under /sys/bus/pci/devices"}
    assert c.cmd("device_del", {"id": "vfio-0"})[-1]["error"]["class"] == "DeviceNotFound"


def test_host_device_without_iommu_group(vmm):
    hosts = [h for h in sorted(os.listdir(SYS_PCI)) if not os.path.exists(os.path.join(SYS_PCI, h, "iommu_group"))]
    if not hosts:
        pytest.skip("every PCI device of this host has an IOMMU group")
    c = vmm(*Q35).client()
    err = _vfio_add(c, hosts[0])["error"]
    assert err["class"] == "GenericError"
    assert err["desc"] == f"host PCI device '{hosts[0]}' has no IOMMU group: VFIO needs an IOMMU"
    # Nothing was plugged, and the VM runs on.
    assert c.cmd("device_del", {"id": "vfio-0"})[-1]["error"]["class"] == "DeviceNotFound"
    assert c.execute("query-status")["status"] == "running"
