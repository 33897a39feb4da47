"""Every JSON example of the manual (seed-vm-management.md), replayed over a raw unix socket
against `pystrato -accel test`, checking the replies' and events' shape, values and order."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

MICROVM = ["-machine", "microvm", "-smp", "2", "-m", "1024"]
Q35 = ["-machine", "q35", "-smp", "2", "-m", "1024",
       "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x2",
       "-device", "pcie-root-port,id=pcie.2,port=0x2,bus=pcie.0,addr=0x3"]


def assert_timestamp(ev):
    ts = ev["timestamp"]
    assert set(ts) == {"seconds", "microseconds"}
    assert isinstance(ts["seconds"], int) and 0 <= ts["microseconds"] < 1_000_000


def test_greeting_and_query_status(vmm):
    p = vmm(*MICROVM)
    c = p.client()
    assert c.greeting["QMP"]["version"]["qemu"] == {"micro": 1, "minor": 0, "major": 5}
    assert c.greeting["QMP"]["version"]["package"].startswith("pystrato-")
    assert c.greeting["QMP"]["capabilities"] == []
    # The manual sends commands without qmp_capabilities.
    assert c.cmd("query-status") == [{"return": {"running": True, "singlestep": False, "status": "running"}}]


def test_query_cpus_topology(vmm):
    p = vmm(*MICROVM)
    c = p.client()
    cpus = c.execute("query-cpus")
    assert [x["CPU"] for x in cpus] == [0, 1]
    assert cpus[0]["props"] == {"core-id": 0, "socket-id": 0, "thread-id": 0}
    assert cpus[1]["props"] == {"core-id": 0, "socket-id": 1, "thread-id": 0}
    for i, x in enumerate(cpus):
        assert x["arch"] == "x86" and x["current"] is True and x["halted"] is False
        assert x["qom_path"] == f"/machine/unattached/device[{i}]"
    tids = [x["thread_id"] for x in cpus]
    assert len(set(tids)) == 2
    # Real threads of the VMM process.
    tasks = set(map(int, os.listdir(f"/proc/{p.proc.pid}/task")))
    assert set(tids) <= tasks


def test_query_hotpluggable_cpus_online_and_offline(vmm):
    p = vmm("-machine", "microvm", "-smp", "cpus=2,maxcpus=3,sockets=3,cores=1,threads=1", "-m", "512")
    c = p.client()
    entries = c.execute("query-hotpluggable-cpus")
    assert entries[:2] == [
        {"props": {"core-id": 0, "socket-id": 0, "thread-id": 0}, "qom-path": "/machine/unattached/device[0]",
         "type": "host-x86-cpu", "vcpus-count": 1},
        {"props": {"core-id": 0, "socket-id": 1, "thread-id": 0}, "qom-path": "/machine/unattached/device[1]",
         "type": "host-x86-cpu", "vcpus-count": 1},
    ]
    # Offline vCPUs have no qom-path (the manual).
    assert entries[2] == {"props": {"core-id": 0, "socket-id": 2, "thread-id": 0},
                          "type": "host-x86-cpu", "vcpus-count": 1}


def test_stop_cont_quit_events_in_manual_order(vmm):
    p = vmm(*MICROVM)
    c = p.client()
    stop = c.cmd("stop")
    assert [m.get("event", "return") for m in stop] == ["STOP", "return"]
    assert stop[0]["data"] == {} and stop[1] == {"return": {}}
    assert_timestamp(stop[0])
    assert c.execute("query-status") == {"running": True, "singlestep": False, "status": "paused"}
    cont = c.cmd("cont")
    assert [m.get("event", "return") for m in cont] == ["RESUME", "return"]
    assert c.execute("query-status")["status"] == "running"
    quit_ = c.cmd("quit")
    assert quit_ == [{"return": {}}]
    ev = c.recv()
    assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert_timestamp(ev)
    assert p.wait() == 0


def test_microvm_hotplug_disk(vmm, image):
    p = vmm(*MICROVM)
    c = p.client()
    img = image()
    r = c.cmd("blockdev-add", {"node-name": "drive-0", "file": {"driver": "file", "filename": img},
                               "cache": {"direct": True}, "read-only": False})
    assert r == [{"return": {}}]
    assert c.cmd("device_add", {"id": "drive-0", "driver": "virtio-blk-mmio", "addr": "0x1"}) == [{"return": {}}]
    # microvm: DEVICE_DELETED comes before the return.
    out = c.cmd("device_del", {"id": "drive-0"})
    assert [m.get("event", "return") for m in out] == ["DEVICE_DELETED", "return"]
    assert out[0]["data"] == {"device": "drive-0", "path": "drive-0"}
    # The slot and the node are free again.
    assert c.cmd("blockdev-add", {"node-name": "drive-0", "file": {"driver": "file", "filename": img},
                                  "cache": {"direct": True}, "read-only": False}) == [{"return": {}}]
    assert c.cmd("device_add", {"id": "drive-0", "driver": "virtio-blk-mmio", "lun": 0}) == [{"return": {}}]


def test_microvm_disk_slot_limit(vmm, image):
    p = vmm(*MICROVM)
    c = p.client()
    for i in range(6):
        c.execute("blockdev-add", {"node-name": f"d{i}", "file": {"driver": "file", "filename": image(f"{i}.img")},
                                   "cache": {"direct": False}})
        c.execute("device_add", {"id": f"d{i}", "driver": "virtio-blk-mmio", "addr": hex(i)})
    c.execute("blockdev-add", {"node-name": "d6", "file": {"driver": "file", "filename": image("6.img")}})
    err = c.cmd("device_add", {"id": "d6", "driver": "virtio-blk-mmio", "addr": "0x6"})[-1]["error"]
    assert err["class"] == "GenericError" and "6" in err["desc"]
    assert c.execute("query-status")["status"] == "running"


def test_q35_hotplug_disk(vmm, image):
    p = vmm(*Q35)
    c = p.client()
    img = image()
    assert c.cmd("blockdev-add", {"node-name": "drive-0", "file": {"driver": "file", "filename": img},
                                  "cache": {"direct": True}, "read-only": False}) == [{"return": {}}]
    assert c.cmd("device_add", {"id": "drive-0", "driver": "virtio-blk-pci", "drive": "drive-0",
                                "addr": "0x0", "bus": "pcie.1"}) == [{"return": {}}]
    # q35: the return first, DEVICE_DELETED once the guest let go of the device.
    assert c.cmd("device_del", {"id": "drive-0"}) == [{"return": {}}]
    ev = c.wait_event("DEVICE_DELETED")
    assert ev["data"] == {"device": "drive-0", "path": "drive-0"}
    assert c.cmd("blockdev-del", {"node-name": "drive-0"}) == [{"return": {}}]


def test_q35_blockdev_del_refused_while_in_use(vmm, image):
    p = vmm(*Q35)
    c = p.client()
    c.execute("blockdev-add", {"node-name": "drive-0", "file": {"driver": "file", "filename": image()}})
    c.execute("device_add", {"id": "drive-0", "driver": "virtio-blk-pci", "drive": "drive-0", "addr": "0x0", "bus": "pcie.1"})
    err = c.cmd("blockdev-del", {"node-name": "drive-0"})[-1]["error"]
    assert "in use" in err["desc"]
    err = c.cmd("device_add", {"id": "drive-1", "driver": "virtio-blk-pci", "drive": "drive-0", "addr": "0x0", "bus": "pcie.9"})[-1]["error"]
    assert "pcie.9" in err["desc"]


@pytest.fixture
def netns():
    if not os.path.exists("/dev/net/tun") or os.geteuid() != 0:
        pytest.skip("needs root and /dev/net/tun")
    name = f"pystrato-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.net
def test_microvm_hotplug_nic_in_netns(tmp_path, netns):
    c, proc = _vmm_in_netns(tmp_path, netns, MICROVM)
    try:
        assert c.cmd("netdev_add", {"id": "net-0", "ifname": "tap0"}) == [{"return": {}}]
        assert c.cmd("device_add", {"id": "net-0", "driver": "virtio-net-mmio", "addr": "0x0"}) == [{"return": {}}]
        out = c.cmd("device_del", {"id": "net-0"})
        assert [m.get("event", "return") for m in out] == ["DEVICE_DELETED", "return"]
        assert out[0]["data"] == {"device": "net-0", "path": "net-0"}
        # Only two NIC slots on microvm (addr 0x0 = eth0, 0x1 = eth1).
        c.execute("netdev_add", {"id": "net-1", "ifname": "tap1"})
        err = c.cmd("device_add", {"id": "net-1", "driver": "virtio-net-mmio", "addr": "0x2"})[-1]["error"]
        assert "at most 2" in err["desc"]
        bad = c.cmd("netdev_add", {"id": "net-9", "ifname": "a/b"})[-1]["error"]
        assert "invalid" in bad["desc"]
    finally:
        proc.kill()
        proc.wait()


def _vmm_in_netns(tmp_path, netns, machine):
    """Run the VMM inside the test's network namespace: its taps exist only there."""
    import sys

    from tests.e2e.qmpclient import ROOT, RawQmp

    subprocess.run(["ip", "netns", "exec", netns, "ip", "tuntap", "add", "tap0", "mode", "tap"], check=True)
    sock = f"{tmp_path}/n.sock"
    args = ["ip", "netns", "exec", netns, sys.executable, "-m", "application.cli", "-accel", "test", *machine,
            "-qmp", f"unix:{sock},server,nowait"]
    proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_sock(sock, proc)
    return RawQmp(sock), proc


@pytest.mark.net
def test_q35_hotplug_nic_in_netns(tmp_path, netns):
    c, proc = _vmm_in_netns(tmp_path, netns, Q35)
    try:
        assert c.cmd("netdev_add", {"id": "net-0", "ifname": "tap0"}) == [{"return": {}}]
        assert c.cmd("device_add", {"id": "net-0", "driver": "virtio-net-pci", "addr": "0x0", "netdev": "net-0",
                                    "bus": "pcie.1"}) == [{"return": {}}]
        assert c.cmd("device_del", {"id": "net-0"}) == [{"return": {}}]
        assert c.wait_event("DEVICE_DELETED")["data"] == {"device": "net-0", "path": "net-0"}
        assert c.cmd("netdev_del", {"id": "net-0"}) == [{"return": {}}]
    finally:
        proc.kill()
        proc.wait()


def _wait_sock(sock, proc, timeout=30):
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(sock)


def test_vfio_hotplug_error_path(vmm):
    p = vmm(*Q35)
    c = p.client()
    reply = c.cmd("device_add", {"id": "vfio-0", "driver": "vfio-pci", "bus": "pcie.1", "addr": "0x0",
                                 "host": "0000:1a:00.3"})[-1]
    assert reply["error"]["class"] == "GenericError"
    assert "0000:1a:00.3" in reply["error"]["desc"]
    # Nothing was plugged: the port is still free for another device.
    assert c.cmd("device_del", {"id": "vfio-0"})[-1]["error"]["class"] == "DeviceNotFound"
    assert c.execute("query-status")["status"] == "running"


def test_balloon(vmm):
    p = vmm("-machine", "microvm", "-m", "4096", "-device", "virtio-balloon-device,id=balloon0")
    c = p.client()
    assert c.execute("query-balloon") == {"actual": 4 << 30}
    out = c.cmd("balloon", {"value": 2147483648})
    assert out[-1] == {"return": {}}
    events = [m for m in out if "event" in m]
    assert [e["event"] for e in events] == ["BALLOON_CHANGED"]
    assert events[0]["data"] == {"actual": 2147483648}
    assert c.cmd("query-balloon") == [{"return": {"actual": 2147483648}}]
    # Above the boot size: capped at the boot size (the manual).
    c.execute("balloon", {"value": 8 << 30})
    assert c.execute("query-balloon") == {"actual": 4 << 30}


def test_balloon_without_device(vmm):
    p = vmm(*MICROVM)
    c = p.client()
    err = c.cmd("balloon", {"value": 1 << 30})[-1]["error"]
    assert err["class"] == "DeviceNotActive"
