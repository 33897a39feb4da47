"""The manual's examples through real QMP clients: qemu.qmp's QMPClient and `ncat -U`."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
from qemu.qmp import ExecuteError, QMPClient

MICROVM = ["-machine", "microvm", "-smp", "2", "-m", "1024"]
Q35 = ["-machine", "q35", "-smp", "1", "-m", "512",
       "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x2"]


async def _events_until(qmp: QMPClient, names: list[str], timeout=5.0) -> list[dict]:
    got = []
    async def collect():
        async for ev in qmp.events:
            got.append(ev)
            if [e["event"] for e in got if e["event"] in names] == names:
                return
    await asyncio.wait_for(collect(), timeout)
    return got


def test_qemu_qmp_lifecycle(vmm):
    p = vmm(*MICROVM)

    async def run():
        qmp = QMPClient("pystrato-test")
        await qmp.connect(p.sock)
        assert qmp.greeting.QMP.version["qemu"]["major"] == 5
        assert await qmp.execute("query-status") == {"running": True, "singlestep": False, "status": "running"}
        cpus = await qmp.execute("query-cpus")
        assert [c["props"]["socket-id"] for c in cpus] == [0, 1]
        hot = await qmp.execute("query-hotpluggable-cpus")
        assert all("qom-path" in h for h in hot)
        with qmp.listener() as listener:
            assert await qmp.execute("stop") == {}
            ev = await asyncio.wait_for(listener.get(), 5)
            assert ev["event"] == "STOP"
        assert (await qmp.execute("query-status"))["status"] == "paused"
        with qmp.listener() as listener:
            assert await qmp.execute("cont") == {}
            ev = await asyncio.wait_for(listener.get(), 5)
            assert ev["event"] == "RESUME"
        names = [c["name"] for c in await qmp.execute("query-commands")]
        for n in ("query-status", "device_add", "migrate", "balloon"):
            assert n in names
        with pytest.raises(ExecuteError) as ei:
            await qmp.execute("device_del", {"id": "nope"})
        assert ei.value.error_class == "DeviceNotFound"
        with qmp.listener() as listener:
            await qmp.execute("quit")
            ev = await asyncio.wait_for(listener.get(), 5)
            assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        try:
            await qmp.disconnect()
        except EOFError:  # the VMM closed the socket after quit, as QEMU does
            pass

    asyncio.run(run())
    assert p.wait() == 0


def test_qemu_qmp_hotplug_disk_microvm_and_q35(vmm, image):
    micro = vmm(*MICROVM, sock_name="m.sock")
    q35 = vmm(*Q35, sock_name="q.sock")
    img1, img2 = image("a.img"), image("b.img")

    async def run():
        qmp = QMPClient("m")
        await qmp.connect(micro.sock)
        await qmp.execute("blockdev-add", {"node-name": "drive-0", "file": {"driver": "file", "filename": img1},
                                           "cache": {"direct": True}, "read-only": False})
        await qmp.execute("device_add", {"id": "drive-0", "driver": "virtio-blk-mmio", "addr": "0x1"})
        with qmp.listener() as listener:
            await qmp.execute("device_del", {"id": "drive-0"})
            ev = await asyncio.wait_for(listener.get(), 5)
            assert ev["event"] == "DEVICE_DELETED" and ev["data"] == {"device": "drive-0", "path": "drive-0"}
        await qmp.disconnect()

        qmp = QMPClient("q")
        await qmp.connect(q35.sock)
        await qmp.execute("blockdev-add", {"node-name": "drive-0", "file": {"driver": "file", "filename": img2},
                                           "cache": {"direct": True}, "read-only": False})
        await qmp.execute("device_add", {"id": "drive-0", "driver": "virtio-blk-pci", "drive": "drive-0",
                                         "addr": "0x0", "bus": "pcie.1"})
        with qmp.listener() as listener:
            await qmp.execute("device_del", {"id": "drive-0"})
            ev = await asyncio.wait_for(listener.get(), 5)
            assert ev["event"] == "DEVICE_DELETED"
        await qmp.execute("blockdev-del", {"node-name": "drive-0"})
        with pytest.raises(ExecuteError) as ei:
            await qmp.execute("device_add", {"id": "vfio-0", "driver": "vfio-pci", "bus": "pcie.1", "addr": "0x0",
                                             "host": "0000:1a:00.3"})
        assert ei.value.error_class == "GenericError"
        await qmp.disconnect()

    asyncio.run(run())


def test_qemu_qmp_balloon(vmm):
    p = vmm("-machine", "microvm", "-m", "4096", "-device", "virtio-balloon-device,id=balloon0")

    async def run():
        qmp = QMPClient("b")
        await qmp.connect(p.sock)
        with qmp.listener() as listener:
            assert await qmp.execute("balloon", {"value": 2147483648}) == {}
            ev = await asyncio.wait_for(listener.get(), 5)
            assert ev["event"] == "BALLOON_CHANGED" and ev["data"] == {"actual": 2147483648}
        assert await qmp.execute("query-balloon") == {"actual": 2147483648}
        await qmp.disconnect()

    asyncio.run(run())


@pytest.mark.skipif(shutil.which("ncat") is None, reason="ncat is not installed (apt-get install ncat)")
def test_ncat_as_the_manual_types_it(vmm):
    p = vmm(*MICROVM)
    typed = (b'{ "execute": "query-status" }\n'
             b'{"execute":"stop"}\n'
             b'{"execute":"query-status"}\n'
             b'{"execute":"cont"}\n'
             b'{"execute":"quit"}\n')
    r = subprocess.run(["ncat", "-U", p.sock], input=typed, capture_output=True, timeout=20)
    lines = [ln for ln in r.stdout.decode().splitlines() if ln.strip()]
    import json

    msgs = [json.loads(ln) for ln in lines]
    assert "QMP" in msgs[0]
    kinds = [m.get("event") or ("return" if "return" in m else "error") for m in msgs[1:]]
    assert kinds == ["return", "STOP", "return", "return", "RESUME", "return", "return", "SHUTDOWN"]
    assert msgs[1]["return"]["status"] == "running"
    assert msgs[4]["return"] == {"running": True, "singlestep": False, "status": "paused"}
    assert r.stdout.count(b"\r\n") == len(lines)  # QMP lines end with CRLF
    assert p.wait() == 0


def test_qmp_shell(vmm):
    """qemu.qmp's qmp-shell, typed at as a person would."""
    import sys
    from pathlib import Path

    p = vmm(*MICROVM)
    shell = Path(sys.executable).parent / "qmp-shell"
    r = subprocess.run([str(shell), p.sock], input=b"query-status\nstop\nquery-status\ncont\n",
                       capture_output=True, timeout=30)
    out = r.stdout.decode()
    assert "Connected to QEMU 5.0.1" in out
    assert '"status": "running"' in out and '"status": "paused"' in out
