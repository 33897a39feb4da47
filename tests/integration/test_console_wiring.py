"""The guest console as the composition root builds it: command line -> container -> machine ->
virtio-console on its virtio-mmio slot -> socket chardev, on the test hypervisor. A mock driver
plays the guest's virtio_console driver through the slot's registers in the VM's own RAM."""

from __future__ import annotations

import dataclasses
import os
import socket
from types import SimpleNamespace

import pytest

from tests.integration.unix_client import TIMEOUT, connect, recv_exactly
from tests.integration.waiting import until

from application.container import Container, Runtime
from domain.cmdline import parse_cmdline
from domain.config import ACCEL_TEST, ChardevConfig, DeviceConfig
from domain.devices.virtio import mmio as r
from domain.devices.virtio.console import RX_QUEUE, TX_QUEUE, VirtioConsole
from domain.devices.virtio.mock import MmioDriver, MockQueue

RINGS = 0x200000
RXBUF = 0x210000
TXBUF = 0x220000


@pytest.fixture
def build(tmp_path):
    runtimes = []

    def make(*args, config=None):
        cfg = config or parse_cmdline(["-accel", "test", *args])
        container = Container()
        container.accel.override(ACCEL_TEST)
        rt = Runtime(cfg, container)
        rt.events = SimpleNamespace(emit=lambda event: None)
        rt._request_exit = lambda code: None
        rt._build_vm()
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        rt._release_quietly()


def console_args(path):
    return ["-chardev", f"socket,id=con,path={path},server,nowait",
            "-device", "virtio-serial-device,id=vs0", "-device", "virtconsole,id=c0,chardev=con"]


def drive_console(rt, path):
    """The guest's console driver on the VM's console slot (rx and tx queues started) and a
    client connected to its socket chardev. Returns (driver, rx queue, tx queue, client)."""
    slot = rt.vm.devices.platform.slots["console"]
    drv = MmioDriver(slot.transport)
    rxq, txq = MockQueue(rt.vm.memory, 16, RINGS), MockQueue(rt.vm.memory, 16, RINGS + 0x2000)
    assert drv.read32(r.DEVICE_ID) == 3
    assert drv.start([rxq, txq]) & r.DRIVER_OK
    client = connect(path)
    until(lambda: slot.transport.device.backend.connected, "the chardev to accept the client")
    return drv, rxq, txq, client


def test_microvm_console_slot_carries_bytes_both_ways(build, tmp_path):
    path = str(tmp_path / "con.sock")
    rt = build(*console_args(path))
    platform = rt.vm.devices.platform
    slot = platform.slots["console"]
    assert isinstance(slot.transport.device, VirtioConsole)
    assert f"virtio_mmio.device=4K@{slot.base:#x}:{slot.irq}" in platform.kernel_cmdline()
    att = rt.vm.devices.attached
    assert att["vs0"].model is att["c0"].model is slot.transport.device  # one device

    mem = rt.vm.memory
    drv, rxq, txq, client = drive_console(rt, path)

    # guest -> client
    mem.write(TXBUF, b"Welcome\r\n")
    txq.add_chain([(TXBUF, 9, False)])
    drv.notify(TX_QUEUE)
    assert recv_exactly(client, 9) == b"Welcome\r\n"

    # client -> guest: held until the guest posts buffers, then delivered
    client.sendall(b"uname\n")
    until(lambda: slot.transport.device.rx_stalled, "the input to wait for buffers")
    head = rxq.add_chain([(RXBUF, 256, True)])
    drv.notify(RX_QUEUE)
    until(lambda: rxq.used_idx() == 1, "the receive buffer to be used")
    assert rxq.take_used() == [(head, 6)]
    assert mem.read(RXBUF, 6) == b"uname\n"

    rt._release_quietly()
    assert not os.path.exists(path)


def test_virtio_serial_device_alone_is_a_console_without_chardev(build):
    rt = build("-device", "virtio-serial-device,id=vs0")
    dev = rt.vm.devices.platform.slots["console"].transport.device
    assert isinstance(dev, VirtioConsole) and dev.backend is None


def test_q35_console_is_a_pci_model_with_its_chardev(build, tmp_path):
    # The command line does not take virtio-serial-pci yet (domain.cmdline_devices): build the
    # configuration the parser would give.
    path = str(tmp_path / "con.sock")
    cfg = parse_cmdline(["-accel", "test", "-machine", "q35"])
    cfg = dataclasses.replace(cfg, chardevs=(ChardevConfig("con", "socket", path, True, True),), devices=(
        DeviceConfig("virtio-serial-pci", id="vs0"), DeviceConfig("virtconsole", id="c0", chardev="con")))
    rt = build(config=cfg)
    model = rt.vm.devices.platform.pci_models["vs0"]
    assert isinstance(model, VirtioConsole) and model.backend is not None
    assert os.path.exists(path)


def test_console_devices_cannot_be_unplugged(build, tmp_path):
    from domain.errors import InvalidArgumentError

    rt = build(*console_args(str(tmp_path / "con.sock")))
    for dev_id in ("vs0", "c0"):
        with pytest.raises(InvalidArgumentError, match="cannot be hot-unplugged"):
            rt.vm.devices.device_del(dev_id)


def test_snapshot_state_covers_the_console_slot(build, tmp_path):
    rt = build(*console_args(str(tmp_path / "con.sock")))
    states = rt.vm.devices.save_states()
    assert "mmio.console" in states
    rt.vm.devices.restore_states(states)


def test_stop_holds_the_devices_and_cont_lets_them_go(build, tmp_path):
    """As QEMU's stop: a request the guest queued is not carried out while the VM is stopped
    (guest RAM and the device state hold still), and nothing is lost: cont carries it out."""
    path = str(tmp_path / "con.sock")
    rt = build(*console_args(path))
    rt.vm.start()
    mem = rt.vm.memory
    drv, _, txq, client = drive_console(rt, path)

    rt.vm.stop()
    mem.write(TXBUF, b"held")
    txq.add_chain([(TXBUF, 4, False)])
    drv.notify(TX_QUEUE)  # queued before the stop took effect, as a notify in flight would be
    client.settimeout(0.2)
    with pytest.raises(socket.timeout):
        client.recv(64)
    assert txq.used_idx() == 0  # the used ring did not move while stopped
    rt.vm.cont()
    client.settimeout(TIMEOUT)
    assert recv_exactly(client, 4) == b"held"
    until(lambda: txq.used_idx() == 1, "the request to complete after cont")


def test_a_disk_plugged_into_a_stopped_vm_is_held_until_cont(build, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    rt = build()
    rt.vm.start()
    rt.vm.stop()
    devices = rt.vm.devices
    devices.blockdev_add("drive0", str(img), readonly=False, direct=False)
    att = devices.device_add_config(DeviceConfig("virtio-blk-device", id="vd0", drive="drive0"),
                                    hotplugged=True)
    assert att.model.paused  # like the devices `stop` held
    rt.vm.cont()
    assert not att.model.paused and not devices.devices_paused
