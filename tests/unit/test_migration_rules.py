"""Exclusion rules, configuration fingerprints and compatibility, URIs, memory digest."""

import dataclasses

import pytest
from hypothesis import given, strategies as st

from domain.config import (
    CpuTopology,
    DeviceConfig,
    MachineConfig,
    MemoryConfig,
    NetdevConfig,
    VmConfig,
)
from domain.errors import IncompatibleConfigError, InvalidArgumentError, SnapshotFormatError
from domain.memory import GuestMemory
from domain.migration import (
    ConfigFingerprint,
    MigrationUri,
    check_compatible,
    compatibility_differences,
    config_fingerprint,
    memory_digest,
    merge_blockers,
    migration_blockers,
    parse_migration_uri,
    snapshot_blockers,
)

BASE = VmConfig(
    machine=MachineConfig(type="q35"),
    smp=CpuTopology(cpus=2, maxcpus=2, sockets=1, cores=2),
    memory=MemoryConfig(size=1 << 30),
    netdevs=(NetdevConfig(id="n0", ifname="tap0"),),
    devices=(
        DeviceConfig(driver="virtio-blk-pci", id="rootfs", bus="pcie.0", addr=0x2 << 3, drive="d0"),
        DeviceConfig(driver="virtio-net-pci", id="net0", bus="pcie.0", addr=0x3 << 3, netdev="n0",
                     mac="52:54:00:12:34:56"),
    ),
)


def with_(cfg: VmConfig, **kw) -> VmConfig:
    return dataclasses.replace(cfg, **kw)


# --- blockers --------------------------------------------------------------------------------


def test_plain_config_has_no_blockers():
    assert snapshot_blockers(BASE) == [] and migration_blockers(BASE) == []


@pytest.mark.parametrize("cfg, expected", [
    (with_(BASE, netdevs=(NetdevConfig(id="n0", vhost=True),)), "vhost-net netdev 'n0'"),
    (with_(BASE, netdevs=(NetdevConfig(id="vu", type="vhost-user"),)), "vhost-user-net netdev 'vu'"),
    (with_(BASE, devices=BASE.devices + (DeviceConfig(driver="vfio-pci", id="vf0", host="0000:1a:00.3"),)),
     "vfio device 'vf0'"),
    (with_(BASE, devices=BASE.devices + (DeviceConfig(driver="virtio-balloon-pci", id="b0"),)),
     "balloon device 'b0'"),
    (with_(BASE, devices=(DeviceConfig(driver="virtio-balloon-device"),)), "balloon device 'virtio-balloon-device'"),
    (with_(BASE, memory=MemoryConfig(size=1 << 30, hugepages=True)), "huge pages"),
    (with_(BASE, memory=MemoryConfig(size=1 << 30, mem_share=True)), "shared memory (mem-share=on)"),
    (with_(BASE, memory=MemoryConfig(size=1 << 30, mem_path="/dev/shm/x")), "memory backend file (mem-path=/dev/shm/x)"),
])
def test_each_exclusion_rule(cfg, expected):
    assert expected in snapshot_blockers(cfg)
    assert expected in migration_blockers(cfg)


def test_merge_blockers_keeps_order_and_drops_duplicates():
    assert merge_blockers(["a", "b"], ["b", "c"]) == ["a", "b", "c"]


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_ignores_host_side_details():
    other = with_(BASE, netdevs=(NetdevConfig(id="n0", ifname="tap9"),), kernel="/other/kernel",
                  qmp=("/tmp/other.sock",))
    assert config_fingerprint(BASE, "kvm") == config_fingerprint(other, "kvm")


def test_fingerprint_bytes_round_trip():
    fp = config_fingerprint(BASE, "kvm")
    assert ConfigFingerprint.from_bytes(fp.to_bytes()) == fp


def test_idless_devices_are_keyed_by_driver_and_position():
    cfg = with_(BASE, machine=MachineConfig(type="microvm"), devices=(
        DeviceConfig(driver="virtio-blk-device", drive="a"), DeviceConfig(driver="virtio-blk-device", drive="b")))
    keys = [d.key for d in config_fingerprint(cfg, "test").devices]
    assert keys == ["virtio-blk-device#0", "virtio-blk-device#1"]


def _diff(**kw) -> str:
    dst = with_(BASE, **kw)
    with pytest.raises(IncompatibleConfigError) as ei:
        check_compatible(config_fingerprint(BASE, "kvm"), config_fingerprint(dst, "kvm"))
    assert "\n" not in str(ei.value)
    return str(ei.value)


def test_identical_configs_are_compatible():
    check_compatible(config_fingerprint(BASE, "kvm"), config_fingerprint(BASE, "kvm"))


def test_memory_size_difference_is_named_exactly():
    assert _diff(memory=MemoryConfig(size=512 << 20)) == (
        "memory size differs: source 1073741824, destination 536870912")


def test_smp_difference():
    msg = _diff(smp=CpuTopology(cpus=1, maxcpus=1))
    assert msg.startswith("smp differs: source cpus=2,maxcpus=2,")
    assert "destination cpus=1,maxcpus=1" in msg


def test_machine_type_difference():
    assert _diff(machine=MachineConfig(type="microvm")) == (
        "machine type differs: source q35, destination microvm")


def test_hidden_cpu_feature_difference():
    assert "hidden CPU features differ" in _diff(machine=MachineConfig(type="q35", hidden_cpu_features=("avx2",)))


def test_hypervisor_difference():
    with pytest.raises(IncompatibleConfigError, match="hypervisor differs: source kvm, destination test"):
        check_compatible(config_fingerprint(BASE, "kvm"), config_fingerprint(BASE, "test"))


def test_mac_difference():
    devs = (BASE.devices[0], dataclasses.replace(BASE.devices[1], mac="52:54:00:12:34:57"))
    assert _diff(devices=devs) == (
        "device 'net0' mac differs: source 52:54:00:12:34:56, destination 52:54:00:12:34:57")


def test_mac_case_does_not_matter():
    devs = (BASE.devices[0], dataclasses.replace(BASE.devices[1], mac="52:54:00:12:34:56".upper()))
    check_compatible(config_fingerprint(BASE, "kvm"), config_fingerprint(with_(BASE, devices=devs), "kvm"))


def test_bdf_difference():
    devs = (dataclasses.replace(BASE.devices[0], addr=0x4 << 3 | 1), BASE.devices[1])
    assert _diff(devices=devs) == "device 'rootfs' addr differs: source 0x2.0, destination 0x4.1"


def test_driver_and_bus_differences_are_all_reported():
    devs = (dataclasses.replace(BASE.devices[0], driver="virtio-scsi-pci", bus="pcie.1"), BASE.devices[1])
    msg = _diff(devices=devs)
    assert "device 'rootfs' driver differs: source virtio-blk-pci, destination virtio-scsi-pci" in msg
    assert "device 'rootfs' bus differs: source pcie.0, destination pcie.1" in msg


def test_missing_and_extra_devices():
    assert _diff(devices=BASE.devices[:1]) == "device 'net0' (virtio-net-pci) is missing on the destination"
    extra = BASE.devices + (DeviceConfig(driver="virtio-rng-pci", id="rng0"),)
    assert _diff(devices=extra) == "device 'rng0' (virtio-rng-pci) is not on the source"


def test_device_order_difference():
    msg = _diff(devices=tuple(reversed(BASE.devices)))
    assert msg == "device order differs: source rootfs,net0, destination net0,rootfs"


def test_several_differences_in_one_line():
    diffs = compatibility_differences(
        config_fingerprint(BASE, "kvm"),
        config_fingerprint(with_(BASE, memory=MemoryConfig(size=2 << 30), smp=CpuTopology()), "kvm"))
    assert len(diffs) == 2


@pytest.mark.parametrize("blob", [
    b"", b"\xff\xfe", b"[]", b"{}", b'{"smp": [1]}', b"1e99999",
    b'{"hypervisor":"kvm","machine":"q35","smp":[1,1,1,1,1,1,1],"memory":"big","devices":[]}',
    b'{"hypervisor":"kvm","machine":"q35","smp":[1,1,1,1,1,1,true],"memory":1,"devices":[]}',
    b'{"hypervisor":"kvm","machine":"q35","smp":[1,1,1,1,1,1,1],"memory":1,"devices":[{"key":1}]}',
    b'{"hypervisor":"kvm","machine":"q35","smp":[1,1,1,1,1,1,1],"memory":1,"devices":[{"key":"a","driver":"d","addr":"x"}]}',
    b"[" * 100000,
])
def test_garbage_fingerprints_are_format_errors(blob):
    with pytest.raises(SnapshotFormatError):
        ConfigFingerprint.from_bytes(blob)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=6),
                    max_leaves=20))
def test_fingerprint_from_any_json_value_raises_only_format_errors(value):
    try:
        ConfigFingerprint.from_dict(value)
    except SnapshotFormatError:
        pass


# --- URIs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, parsed", [
    ("file:/path/to/template", MigrationUri("file", path="/path/to/template")),
    ("unix:/tmp/stratovirt-migrate.socket", MigrationUri("unix", path="/tmp/stratovirt-migrate.socket")),
    ("tcp:192.168.0.1:4446", MigrationUri("tcp", host="192.168.0.1", port=4446)),
    ("tcp:[::1]:4446", MigrationUri("tcp", host="::1", port=4446)),
    ("tcp:localhost:0", MigrationUri("tcp", host="localhost", port=0)),
    ("tcp::4446", MigrationUri("tcp", host="", port=4446)),
])
def test_uri_parsing(uri, parsed):
    assert parse_migration_uri(uri) == parsed
    assert str(parsed) == uri


@pytest.mark.parametrize("uri", ["", "file:", "tcp:host", "tcp:h:", "tcp:h:99999", "tcp:h:x",
                                 "exec:cat", "/path", "rdma:h:1"])
def test_bad_uris(uri):
    with pytest.raises(InvalidArgumentError):
        parse_migration_uri(uri)


# --- digest ---------------------------------------------------------------------------------------


def test_memory_digest_sees_every_byte_and_the_layout():
    a = GuestMemory([(0, bytearray(8192)), (1 << 20, bytearray(4096))])
    b = GuestMemory([(0, bytearray(8192)), (1 << 20, bytearray(4096))])
    assert memory_digest(a) == memory_digest(b)
    b.write((1 << 20) + 4095, b"\x01")
    assert memory_digest(a) != memory_digest(b)
    c = GuestMemory([(0, bytearray(8192)), (2 << 20, bytearray(4096))])
    assert memory_digest(a) != memory_digest(c)
