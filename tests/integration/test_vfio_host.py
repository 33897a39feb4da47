"""VFIO on the host side: sysfs lookups, the open sequence and its errors.

This host has no IOMMU and no /dev/vfio, so the kernel's part runs two ways: for real up to where
the host says no (the error the user would see here), and against a scripted kernel that answers
like an IOMMU host, to run the whole sequence, its bookkeeping and its undo paths.
"""

import ctypes
import errno
import gc
import mmap
import os
import shutil
import subprocess

import pytest

from adapters.vfio import kernel as kmod

if not kmod.available():  # pragma: no cover - depends on the build
    pytest.skip("adapters.vfio._vfio_cffi is not built", allow_module_level=True)

from adapters.host.memory import MmapAllocator
from adapters.vfio.errors import VfioError
from adapters.vfio.manager import VfioManager
from adapters.vfio.sysfs import (
    GroupMember,
    PciSysfs,
    keeps_group_viable,
    not_viable_reason,
)
from domain.errors import HostResourceError
from domain.ports import VfioDevice
from tests.integration.vfio_fakes import (
    FakeDevice,
    FakeSysfs,
    ScriptedKernel,
    pci_config,
    rw_flags,
)

lib = kmod.lib
HOST = "0000:1a:00.3"
MiB = 1 << 20


@pytest.fixture
def sysfs(tmp_path):
    return FakeSysfs(tmp_path / "sys")


@pytest.fixture
def dev_dir(tmp_path):
    """/dev/vfio with a container node and group 12: regular files, so opening them works and
    only the (scripted) ioctls decide."""
    d = tmp_path / "dev-vfio"
    d.mkdir()
    for name in ("vfio", "12", "13"):
        (d / name).write_bytes(b"")
    return str(d)


@pytest.fixture
def memory():
    alloc = MmapAllocator()
    mem = alloc.allocate([(0, 2 * MiB), (4 * MiB, 1 * MiB)])
    yield mem
    alloc.free(mem)


def fake_device(tmp_path, name="dev"):
    return FakeDevice(str(tmp_path / name), {
        0: (rw_flags(mmap=True), 0x4000, None),
        2: (rw_flags(mmap=True), 0x10000, ((0, 0x2000), (0x3000, 0xD000))),
        6: (lib.VFIO_REGION_INFO_FLAG_READ, 0x1000, None),
        7: (rw_flags(), 256, None),
    })


def open_fds() -> set[str]:
    """This process's open fds, after a garbage collection. Compare with <=, not ==: a thread
    or object left by an earlier test may close its own fds meanwhile, never open ours."""
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def manager(sysfs, dev_dir, memory, kernel):
    return VfioManager(lambda: memory, sysfs=PciSysfs(sysfs.root), dev_dir=dev_dir, kernel=kernel)


# --- sysfs ---------------------------------------------------------------------------------------

def test_sysfs_lookups(sysfs):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    sysfs.add("0000:1a:00.0", group="12", driver="ixgbe")
    sysfs.add("0000:00:1c.0", group="12", driver="pcieport", bridge=True)
    sysfs.add("0000:00:02.0")
    s = PciSysfs(sysfs.root)
    assert s.exists(HOST) and not s.exists("0000:99:00.0")
    assert s.iommu_group(HOST) == "12" and s.iommu_group("0000:00:02.0") is None
    assert s.driver(HOST) == "vfio-pci" and s.driver("0000:00:02.0") is None
    assert s.is_bridge("0000:00:1c.0") and not s.is_bridge(HOST)
    assert [m.host for m in s.group_members("12")] == ["0000:00:1c.0", "0000:1a:00.0", HOST]
    assert s.blockers("12") == [GroupMember("0000:1a:00.0", "ixgbe", False)]
    assert s.group_members("99") == []


@pytest.mark.parametrize("driver, bridge, ok", [
    (None, False, True), ("vfio-pci", False, True), ("pci-stub", False, True), ("pcieport", True, True),
    ("mlx5_vfio_pci", False, True), ("shpchp", True, True), ("ixgbe", False, False), ("nvme", False, False),
])
def test_viability_rules(driver, bridge, ok):
    assert keeps_group_viable(GroupMember("0000:00:00.0", driver, bridge)) is ok


def test_not_viable_reasons():
    assert not_viable_reason("12", [GroupMember("0000:1a:00.0", "ixgbe", False)]) == (
        "IOMMU group 12 is not viable: bind 0000:1a:00.0 to vfio-pci first (driver is ixgbe)")
    assert "bind every device of /sys/kernel/iommu_groups/7/devices to vfio-pci" in not_viable_reason("7", [])


def test_the_real_sysfs_parses():
    s = PciSysfs()
    for host in sorted(os.listdir("/sys/bus/pci/devices")):
        assert s.exists(host)
        group = s.iommu_group(host)
        if group is not None:
            assert host in [m.host for m in s.group_members(group)]


# --- errors before any ioctl ---------------------------------------------------------------------

def test_missing_device(sysfs, dev_dir, memory):
    with pytest.raises(VfioError, match=f"VFIO {HOST}: find the device: .*{HOST} does not exist"):
        manager(sysfs, dev_dir, memory, ScriptedKernel()).open_device(HOST)


def test_device_without_iommu_group(sysfs, dev_dir, memory):
    sysfs.add(HOST, driver="ixgbe")
    with pytest.raises(VfioError, match="iommu_group is missing; VFIO needs an IOMMU: .*intel_iommu=on"):
        manager(sysfs, dev_dir, memory, ScriptedKernel()).open_device(HOST)


@pytest.mark.parametrize("driver, shown", [("ixgbe", "ixgbe"), (None, "none")])
def test_device_not_bound_to_vfio(sysfs, dev_dir, memory, driver, shown):
    sysfs.add(HOST, group="12", driver=driver)
    k = ScriptedKernel()
    with pytest.raises(VfioError, match=rf"bind {HOST} to vfio-pci first \(driver is {shown}\)"):
        manager(sysfs, dev_dir, memory, k).open_device(HOST.upper())
    assert k.calls == []


def test_no_guest_ram_yet(sysfs, dev_dir):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    m = VfioManager(lambda: None, sysfs=PciSysfs(sysfs.root), dev_dir=dev_dir, kernel=ScriptedKernel())
    with pytest.raises(VfioError, match="map guest RAM for DMA: the VM has no guest RAM yet"):
        m.open_device(HOST)


# --- this host, for real -------------------------------------------------------------------------

def test_no_vfio_container_node_on_this_host(sysfs, memory):
    if os.path.exists("/dev/vfio/vfio"):
        pytest.skip("this host has /dev/vfio/vfio")
    sysfs.add(HOST, group="12", driver="vfio-pci")
    m = VfioManager(lambda: memory, sysfs=PciSysfs(sysfs.root))  # the real kernel, the real /dev
    before = open_fds()
    with pytest.raises(HostResourceError) as ei:
        m.open_device(HOST)
    assert str(ei.value) == (f"VFIO {HOST}: open /dev/vfio/vfio: No such file or directory [ENOENT]; "
                             "load the vfio-pci module (modprobe vfio-pci) on a host with an IOMMU enabled")
    assert open_fds() <= before


def test_real_ioctls_on_something_else_are_refused(sysfs, dev_dir, memory):
    # The real ioctl path through cffi: a regular file answers ENOTTY, and the fd is closed.
    sysfs.add(HOST, group="12", driver="vfio-pci")
    m = VfioManager(lambda: memory, sysfs=PciSysfs(sysfs.root), dev_dir=dev_dir)
    before = open_fds()
    with pytest.raises(VfioError, match=r"VFIO_GET_API_VERSION: Inappropriate ioctl for device \[ENOTTY\]"):
        m.open_device(HOST)
    assert open_fds() <= before


def test_real_pci_device_without_iommu_group_on_this_host(memory):
    s = PciSysfs()
    hosts = [h for h in sorted(os.listdir("/sys/bus/pci/devices")) if s.iommu_group(h) is None]
    if not hosts:
        pytest.skip("every PCI device of this host has an IOMMU group")
    with pytest.raises(VfioError, match=f"VFIO {hosts[0]}: find the IOMMU group: .*VFIO needs an IOMMU"):
        VfioManager(lambda: memory).open_device(hosts[0])


# --- the sequence, against a scripted kernel -----------------------------------------------------

def test_open_sequence(sysfs, dev_dir, memory, tmp_path):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    k = ScriptedKernel(devices={HOST: fake_device(tmp_path)})
    m = manager(sysfs, dev_dir, memory, k)
    dev = m.open_device(HOST)
    assert isinstance(dev, VfioDevice)
    assert k.names() == ["api_version", "check_extension", "group_status", "set_container", "set_iommu",
                         "iommu_info", "map_dma", "map_dma", "get_device_fd", "device_info"]
    assert k.calls[1][2] == lib.VFIO_TYPE1v2_IOMMU and k.calls[4][2] == lib.VFIO_TYPE1v2_IOMMU
    container = k.calls[0][1]
    assert k.calls[3][2] == container
    regions = memory.regions
    maps = [c[1:] for c in k.calls if c[0] == "map_dma"]
    assert maps == [(container, r.gpa, k.host_address(r.view), r.size) for r in regions]
    assert [(mm.iova, mm.size) for mm in m.dma_mappings] == [(0, 2 * MiB), (4 * MiB, 1 * MiB)]
    assert k.calls[-2][2] == HOST
    assert (dev.host, dev.num_regions, dev.num_irqs, dev.can_reset) == (HOST, 8, 3, True)
    assert dev.indices.config == lib.VFIO_PCI_CONFIG_REGION_INDEX
    dev.close()


def test_dma_addresses_are_the_guest_ram_mappings(memory):
    # The host address handed to VFIO_IOMMU_MAP_DMA is where guest RAM lives in this process.
    k = kmod.VfioKernel()
    for r in memory.regions:
        addr = k.host_address(r.view)
        r.view[0:4] = b"\xde\xad\xbe\xef"
        assert ctypes.string_at(addr, 4) == b"\xde\xad\xbe\xef"
        assert addr % mmap.PAGESIZE == 0


def test_type1_fallback(sysfs, dev_dir, memory, tmp_path):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    k = ScriptedKernel(type1v2=False, devices={HOST: fake_device(tmp_path)})
    manager(sysfs, dev_dir, memory, k).open_device(HOST).close()
    assert ("set_iommu", k.calls[0][1], lib.VFIO_TYPE1_IOMMU) in k.calls


def check_refused(sysfs, dev_dir, memory, k, match):
    before = open_fds()
    m = manager(sysfs, dev_dir, memory, k)
    with pytest.raises(VfioError, match=match):
        m.open_device(HOST)
    assert open_fds() <= before  # everything this call opened is closed again
    assert m.dma_mappings == []
    return m


def test_no_type1_iommu(sysfs, dev_dir, memory):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    check_refused(sysfs, dev_dir, memory, ScriptedKernel(type1v2=False, type1=False),
                  "VFIO_CHECK_EXTENSION: the host has no type1 IOMMU driver; load vfio_iommu_type1")


def test_api_version_mismatch(sysfs, dev_dir, memory):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    check_refused(sysfs, dev_dir, memory, ScriptedKernel(api=1), "the kernel speaks VFIO API 1, pystrato 0")


def test_group_not_viable_names_the_driver_to_replace(sysfs, dev_dir, memory):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    sysfs.add("0000:1a:00.2", group="12", driver="ixgbe")
    k = ScriptedKernel(viable=False)
    check_refused(sysfs, dev_dir, memory, k, r"VFIO_GROUP_GET_STATUS: IOMMU group 12 is not viable: "
                                             r"bind 0000:1a:00.2 to vfio-pci first \(driver is ixgbe\)$")
    assert "set_container" not in k.names()


def test_group_node_missing(sysfs, dev_dir, memory):
    sysfs.add(HOST, group="14", driver="vfio-pci")
    check_refused(sysfs, dev_dir, memory, ScriptedKernel(),
                  rf"open {dev_dir}/14: No such file or directory \[ENOENT\]; bind {HOST} to vfio-pci first")


def test_dma_map_refused_undoes_everything(sysfs, dev_dir, memory, tmp_path):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    k = ScriptedKernel(devices={HOST: fake_device(tmp_path)})
    k.fail["map_dma"] = errno.ENOMEM
    m = check_refused(sysfs, dev_dir, memory, k,
                      r"VFIO_IOMMU_MAP_DMA of guest RAM 0x0\+0x200000: Cannot allocate memory \[ENOMEM\]; "
                      r"guest RAM is pinned .*ulimit -l")
    assert k.names()[-1] == "unset_container"
    # Nothing is left behind: the next attempt starts from the container again.
    del k.fail["map_dma"]
    k.calls.clear()
    m.open_device(HOST).close()
    assert k.names()[:2] == ["api_version", "check_extension"]


def test_plan_refused(sysfs, dev_dir, memory):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    k = ScriptedKernel(iova_ranges=[(0, 0xFFFFF)])
    check_refused(sysfs, dev_dir, memory, k, r"plan the DMA map of guest RAM: guest RAM 0x0-0x1fffff is outside")
    assert "map_dma" not in k.names()


def test_device_fd_refused(sysfs, dev_dir, memory):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    k = ScriptedKernel()
    k.fail["get_device_fd"] = errno.EBUSY
    check_refused(sysfs, dev_dir, memory, k,
                  r"VFIO_GROUP_GET_DEVICE_FD: Device or resource busy \[EBUSY\]; the device is open in another process")


def test_not_a_pci_device(sysfs, dev_dir, memory, tmp_path):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    d = fake_device(tmp_path)
    d.flags = 0
    check_refused(sysfs, dev_dir, memory, ScriptedKernel(devices={HOST: d}), "vfio-pci did not report a PCI device")


def test_groups_share_one_container_and_one_dma_map(sysfs, dev_dir, memory, tmp_path):
    a, b, c = HOST, "0000:1a:00.2", "0000:3b:00.0"
    sysfs.add(a, group="12", driver="vfio-pci")
    sysfs.add(b, group="12", driver="vfio-pci")
    sysfs.add(c, group="13", driver="vfio-pci")
    k = ScriptedKernel(devices={a: fake_device(tmp_path, "a"), b: fake_device(tmp_path, "b"),
                                c: fake_device(tmp_path, "c")})
    m = manager(sysfs, dev_dir, memory, k)
    before = open_fds()
    da = m.open_device(a)
    k.calls.clear()
    db = m.open_device(b)  # same group: just the device
    assert k.names() == ["get_device_fd", "device_info"]
    k.calls.clear()
    dc = m.open_device(c)  # another group joins the container; RAM stays mapped once
    assert k.names() == ["group_status", "set_container", "get_device_fd", "device_info"]
    with pytest.raises(VfioError, match="already assigned to this VM"):
        m.open_device(a)
    k.calls.clear()
    da.close()
    assert k.names() == []  # b keeps group 12
    db.release()
    dc.close()
    assert k.names() == ["unset_container", "unset_container"]
    assert m.dma_mappings == []
    assert open_fds() <= before  # devices, groups and the container are all closed


def test_manager_close_closes_every_device(sysfs, dev_dir, memory, tmp_path):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    k = ScriptedKernel(devices={HOST: fake_device(tmp_path)})
    m = manager(sysfs, dev_dir, memory, k)
    before = open_fds()
    dev = m.open_device(HOST)
    m.close()
    assert dev.closed and open_fds() <= before
    m.close()


# --- the device handle ---------------------------------------------------------------------------

@pytest.fixture
def device(sysfs, dev_dir, memory, tmp_path):
    sysfs.add(HOST, group="12", driver="vfio-pci")
    fake = fake_device(tmp_path)
    with open(fake.path, "r+b") as f:
        f.seek(fake.offset(7))
        f.write(pci_config())
    k = ScriptedKernel(devices={HOST: fake})
    dev = manager(sysfs, dev_dir, memory, k).open_device(HOST)
    dev.fake, dev.kernel = fake, k
    yield dev
    dev.close()


def test_region_info(device):
    cfg = device.region_info(7)
    assert (cfg.size, cfg.readable, cfg.writable, cfg.mappable, cfg.mmap_areas) == (256, True, True, False, ())
    assert device.region_info(0).mmap_areas == ((0, 0x4000),)
    assert device.region_info(2).mmap_areas == ((0, 0x2000), (0x3000, 0xD000))
    assert device.region_info(1).size == 0
    with pytest.raises(VfioError, match="region 9: the device has 8 regions"):
        device.region_info(9)


def test_region_read_write_go_to_the_region_offset(device):
    assert int.from_bytes(device.region_read(7, 0, 4), "little") == 0x10FB8086
    device.region_write(0, 0x10, b"\x01\x02")
    with open(device.fake.path, "rb") as f:
        f.seek(device.fake.offset(0) + 0x10)
        assert f.read(2) == b"\x01\x02"
    assert device.region_read(0, 0x10, 2) == b"\x01\x02"


def test_region_access_errors(device):
    with pytest.raises(VfioError, match=r"read region 7: 0xfe\+0x4 is outside the region \(0x100 bytes\)"):
        device.region_read(7, 0xFE, 4)
    with pytest.raises(VfioError, match="write region 6: the region is read-only"):
        device.region_write(6, 0, b"x")
    with pytest.raises(VfioError, match="outside the region"):
        device.region_write(0, -1, b"x")


def test_region_mmap(device):
    (off, view), = device.region_mmap(0)
    assert off == 0 and len(view) == 0x4000
    view[0x20:0x24] = b"abcd"  # through the mapping, into the device's region
    assert device.region_read(0, 0x20, 4) == b"abcd"
    areas = device.region_mmap(2)
    assert [(o, len(v)) for o, v in areas] == [(0, 0x2000), (0x3000, 0xD000)]
    assert device.region_mmap(7) == []  # config space is never mapped
    for _, v in [(off, view), *areas]:
        v.release()


def test_irqs(device):
    intx = device.irq_info(device.indices.intx)
    assert (intx.count, intx.automasked, intx.maskable) == (1, True, True)
    device.set_irq_eventfds(device.indices.msix, [30, 31, -1], start=2)
    device.unmask_irq(device.indices.intx)
    device.disable_irqs(device.indices.msix)
    fd = device.fd
    assert [c for c in device.kernel.calls if c[0].startswith("irq_") and c[0] != "irq_info"] == [
        ("irq_eventfds", fd, 2, 2, [30, 31, -1]), ("irq_unmask", fd, 0, 0), ("irq_disable", fd, 2)]
    with pytest.raises(VfioError, match=r"vectors 7..8 outside the device's 8"):
        device.set_irq_eventfds(device.indices.msix, [1, 2], start=7)
    with pytest.raises(VfioError, match="IRQ index 4: the device has 3 IRQ indexes"):
        device.irq_info(4)
    device.kernel.fail["irq_eventfds"] = errno.EINVAL
    with pytest.raises(VfioError, match=r"VFIO_DEVICE_SET_IRQS \(eventfds\) of index 1: Invalid argument"):
        device.set_irq_eventfds(device.indices.msi, [5])


def test_reset(device):
    device.reset()
    assert device.kernel.names()[-1] == "reset"
    device.can_reset = False
    with pytest.raises(VfioError, match="VFIO_DEVICE_RESET: the device has no reset method"):
        device.reset()


def test_closed_device_refuses_work(device):
    device.close()
    with pytest.raises(VfioError, match="the device is closed"):
        device.region_read(7, 0, 4)
    device.close()  # idempotent


# --- the compiler agrees with cffi ---------------------------------------------------------------

LAYOUT = {
    "vfio_group_status": ["argsz", "flags"],
    "vfio_device_info": ["argsz", "flags", "num_regions", "num_irqs"],
    "vfio_region_info": ["argsz", "flags", "index", "cap_offset", "size", "offset"],
    "vfio_region_info_cap_sparse_mmap": ["nr_areas", "areas"],
    "vfio_irq_info": ["argsz", "flags", "index", "count"],
    "vfio_irq_set": ["argsz", "flags", "index", "start", "count", "data"],
    "vfio_iommu_type1_info": ["argsz", "flags", "iova_pgsizes", "cap_offset"],
    "vfio_iommu_type1_info_cap_iova_range": ["nr_iovas", "iova_ranges"],
    "vfio_iommu_type1_dma_map": ["argsz", "flags", "vaddr", "iova", "size"],
    "vfio_iommu_type1_dma_unmap": ["argsz", "flags", "iova", "size"],
}


def test_layouts_match_an_independent_compile(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vfio.h>", "int main(void) {"]
    for s, fields in LAYOUT.items():
        lines.append(f'printf("{s} %zu\\n", sizeof(struct {s}));')
        lines += [f'printf("{s}.{f} %zu\\n", offsetof(struct {s}, {f}));' for f in fields]
    lines += ["return 0; }"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(tmp_path / "layout"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    ffi = kmod.ffi
    want = {}
    for s, fields in LAYOUT.items():
        want[s] = ffi.sizeof(f"struct {s}")
        want.update({f"{s}.{f}": ffi.offsetof(f"struct {s}", f) for f in fields})
    got = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert got == want
