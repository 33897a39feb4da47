"""q35 on KVM with the real Linux guest (scripts/build-guest): the kernel enumerates the PCI
Express hierarchy through 0xCF8/0xCFC, binds virtio-blk to a virtio-pci disk on pcie.0, and its
pciehp driver handles a virtio-blk-pci disk hot-plugged into a root port; device_del presses the
attention button and DEVICE_DELETED follows once the guest powered the slot off (the manual's
q35 order: the return first, the event after); its virtio-balloon driver inflates to a target. The kernel needs ~2 minutes to get there under
kvm-pvm, so the test is slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.qmpclient import RawQmp

ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 600.0

pytestmark = [pytest.mark.kvm, pytest.mark.slow, pytest.mark.timeout(1200)]


class Serial:
    def __init__(self, path: Path, proc: subprocess.Popen):
        self.path, self.proc = path, proc

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, pattern: str, timeout: float, after: int = 0) -> tuple[re.Match, int]:
        """The first match of ``pattern`` at or after offset ``after``; returns it and its end."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = rx.search(text, after)
            if m:
                return m, m.end()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no serial match for {pattern!r} "
                                     f"({'pystrato exited' if self.proc.poll() is not None else 'timeout'})"
                                     f"\n--- serial tail ---\n{text[-3000:]}")
            time.sleep(0.5)


def test_linux_enumerates_q35_and_hot_plugs_through_pciehp(tmp_path, linux_guest):
    boot = tmp_path / "boot.img"
    hot = tmp_path / "hot.img"
    with open(boot, "wb") as f:
        f.truncate(8 << 20)
    with open(hot, "wb") as f:
        f.truncate(16 << 20)
    sock = tmp_path / "qmp.sock"
    serial_path = tmp_path / "serial.log"
    append = (linux_guest / "cmdline").read_text().strip() + " pystrato.idle=1"
    args = [sys.executable, "-m", "application.cli", "-accel", "kvm", "-machine", "q35", "-smp", "1",
            "-m", "256", "-kernel", str(linux_guest / "vmlinux"),
            "-initrd", str(linux_guest / "initramfs.cpio.gz"), "-append", append,
            "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x2",
            "-drive", f"file={boot},id=boot,readonly=off,direct=off",
            "-device", "virtio-blk-pci,id=boot,drive=boot,bus=pcie.0,addr=0x3",
            "-device", "virtio-balloon-pci,id=balloon0,bus=pcie.0,addr=0x4",
            "-serial", f"file:{serial_path}", "-qmp", f"unix:{sock},server,nowait"]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        serial = Serial(serial_path, proc)
        # Boot: the hierarchy as the firmware step numbered it, and both drivers bound.
        _, pos = serial.wait(r"PCI: Using configuration type 1", BOOT_TIMEOUT)
        serial.wait(r"pci 0000:00:02\.0: \[1b36:000c\] type 01 class 0x060400", 60, pos)
        serial.wait(r"pci 0000:00:03\.0: \[1af4:1042\] type 00", 60, pos)
        serial.wait(r"pci 0000:00:02\.0: PCI bridge to \[bus 01\]", 60, pos)
        serial.wait(r"pcieport 0000:00:02\.0: pciehp: Slot #1 AttnBtn\+ PwrCtrl\+ .*HotPlug\+", BOOT_TIMEOUT, pos)
        _, pos = serial.wait(r"virtio_blk virtio\d+: \[vda\] 16384 512-byte logical blocks", BOOT_TIMEOUT, pos)

        qmp = RawQmp(str(sock), timeout=30)
        assert qmp.cmd("blockdev-add", {"node-name": "drive-0", "file": {"driver": "file", "filename": str(hot)},
                                        "cache": {"direct": True}, "read-only": False}) == [{"return": {}}]
        assert qmp.cmd("device_add", {"id": "drive-0", "driver": "virtio-blk-pci", "drive": "drive-0",
                                      "addr": "0x0", "bus": "pcie.1"}) == [{"return": {}}]
        _, pos = serial.wait(r"pciehp: Slot\(1\): (Card present|Link Up)", 120, pos)
        serial.wait(r"pci 0000:01:00\.0: \[1af4:1042\] type 00", 120, pos)
        _, pos = serial.wait(r"virtio_blk virtio\d+: \[vdb\] 32768 512-byte logical blocks", 120, pos)

        # Unplug: the reply comes first; the event only once the guest has let go of the slot.
        assert qmp.cmd("device_del", {"id": "drive-0"}) == [{"return": {}}]
        _, pressed = serial.wait(r"pciehp: Slot\(1\): Attention button pressed", 120, pos)
        serial.wait(r"pciehp: Slot\(1\): Powering off due to button press", 60, pos)
        event = qmp.wait_event("DEVICE_DELETED", timeout=120)
        assert event["data"] == {"device": "drive-0", "path": "drive-0"}
        assert qmp.cmd("blockdev-del", {"node-name": "drive-0"}) == [{"return": {}}]

        # The slot really is empty and powered off: the same port takes a new disk.
        assert qmp.cmd("blockdev-add", {"node-name": "drive-1", "file": {"driver": "file", "filename": str(hot)},
                                        "cache": {"direct": True}, "read-only": True}) == [{"return": {}}]
        assert qmp.cmd("device_add", {"id": "drive-1", "driver": "virtio-blk-pci", "drive": "drive-1",
                                      "addr": "0x0", "bus": "pcie.1"}) == [{"return": {}}]
        serial.wait(r"virtio_blk virtio\d: \[vd\w\] 32768 512-byte logical blocks", 120, pressed)
        assert "Card not present" not in serial.text()  # the removal was orderly, not a surprise

        # virtio-balloon-pci with the guest's own driver: config change by MSI-X, inflation
        # through its queue, 'actual' written back.
        target = 200 << 20
        assert qmp.cmd("balloon", {"value": target})[-1] == {"return": {}}
        deadline = time.monotonic() + 300
        while qmp.cmd("query-balloon")[-1]["return"]["actual"] != target:
            assert time.monotonic() < deadline, qmp.cmd("query-balloon")
            time.sleep(1)

        assert qmp.cmd("quit")[-1] == {"return": {}}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


_PING = r"""
import socket, struct, sys
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(20)
data = b"pystrato-virtio-net-pci"
hdr = struct.pack("!BBHHH", 8, 0, 0, 0x5053, 1)
s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + data), 0x5053, 1) + data, (sys.argv[1], 0))
while True:
    r, _ = s.recvfrom(2048)
    icmp = r[(r[0] & 15) * 4:]
    if icmp[0] == 0 and icmp[4:6] == b"\x50\x53":
        print("REPLY", icmp[8:] == data); break
"""


@pytest.mark.net
def test_linux_virtio_net_pci_answers_ping_from_the_host(tmp_path, linux_guest):
    """virtio-net-pci on pcie.0 with the guest's own driver: the guest script brings eth0 up and
    the kernel answers an ICMP echo sent from the host side of the tap (its own netns)."""
    if not os.path.exists("/dev/net/tun") or os.geteuid() != 0:
        pytest.skip("needs root and /dev/net/tun")
    ns = f"pystrato-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        for cmd in (["ip", "tuntap", "add", "tap0", "mode", "tap"], ["ip", "addr", "add", "10.0.7.1/24", "dev", "tap0"],
                    ["ip", "link", "set", "tap0", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        sock = tmp_path / "qmp.sock"
        serial_path = tmp_path / "serial.log"
        append = (linux_guest / "cmdline").read_text().strip() + " pystrato.ip=10.0.7.2/24"
        args = ["ip", "netns", "exec", ns, sys.executable, "-m", "application.cli", "-accel", "kvm",
                "-machine", "q35", "-smp", "1", "-m", "256", "-kernel", str(linux_guest / "vmlinux"),
                "-initrd", str(linux_guest / "initramfs.cpio.gz"), "-append", append,
                "-netdev", "tap,id=n0,ifname=tap0",
                "-device", "virtio-net-pci,id=n0,netdev=n0,bus=pcie.0,addr=0x5,mac=52:54:00:12:34:56",
                "-serial", f"file:{serial_path}", "-qmp", f"unix:{sock},server,nowait"]
        with open(tmp_path / "stderr", "wb") as err:
            proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        serial = Serial(serial_path, proc)
        serial.wait(r"pci 0000:00:05\.0: \[1af4:1041\] type 00 class 0x020000", BOOT_TIMEOUT)
        serial.wait(r"PYSTRATO-IP-OK 10\.0\.7\.2/24", BOOT_TIMEOUT)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _PING, "10.0.7.2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        assert "REPLY True" in out.stdout, out.stdout
        qmp = RawQmp(str(sock), timeout=30)
        assert qmp.cmd("quit")[-1] == {"return": {}}
        assert proc.wait(30) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], check=False)
