"""Pausing virtio devices (live migration's final pass, a snapshot write): a paused device starts
no new work and leaves guest RAM alone, pause() waits for the requests in flight, and resume()
processes every queue notified meanwhile, so no notification is lost; a restored device looks at
every active queue on resume (the source may have taken a notification it never processed)."""

import threading

import pytest

from domain.config import VmConfig
from domain.devices.virtio import block as b
from domain.devices.virtio import net as n
from domain.devices.virtio.block import VirtioBlock
from domain.devices.virtio.mmio import VirtioMmioTransport
from domain.devices.virtio.queue import VRING_USED_F_NO_NOTIFY
from domain.topology import Placement
from application.devices import Attached, DeviceManager
from tests.unit import test_dev_virtio_block_async as blk
from tests.unit import test_dev_virtio_console as con
from tests.unit import test_dev_virtio_net as net

NO_EVENT_IDX = blk.VIRTIO_F_VERSION_1 | b.VIRTIO_BLK_F_FLUSH  # notifications through the flags word


def ram(rig) -> bytes:
    return bytes(rig.mem.read(0, blk.RAM))


# --- virtio-blk ----------------------------------------------------------------------------------


def test_a_notification_while_paused_is_processed_on_resume():
    rig = blk.Rig()
    rig.dev.pause()
    head = rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    before = ram(rig)
    rig.drv.notify(0)
    assert rig.disk.ops == [] and not rig.disk.jobs
    assert ram(rig) == before  # no used entry, no data, no status byte
    assert rig.q.take_used() == []
    rig.dev.resume()
    assert rig.q.take_used() == [(head, 513)]
    assert rig.status(0) == b.VIRTIO_BLK_S_OK and rig.disk.ops == [("r", 0)]
    assert rig.irqs == 1


def test_several_notifications_while_paused_lose_nothing():
    rig = blk.Rig()
    rig.dev.pause()
    heads = []
    for slot in range(4):
        heads.append(rig.post(slot, b.VIRTIO_BLK_T_IN, slot))
        rig.drv.notify(0)
    assert rig.disk.ops == []
    rig.dev.resume()
    rig.disk.run_all()
    assert sorted(rig.q.take_used()) == sorted((h, 513) for h in heads)
    assert [rig.status(s) for s in range(4)] == [b.VIRTIO_BLK_S_OK] * 4


def test_pause_waits_for_requests_in_flight_and_their_completion_pops_nothing_new():
    rig = blk.Rig(features=NO_EVENT_IDX)
    h0 = rig.post(0, b.VIRTIO_BLK_T_IN, 0)
    h1 = rig.post(1, b.VIRTIO_BLK_T_IN, 1)
    rig.drv.notify(0)  # h1 ran on the notifying thread, h0 waits on a backend thread
    assert rig.q.take_used() == [(h1, 513)] and len(rig.disk.jobs) == 1
    assert rig.used_flags() & VRING_USED_F_NO_NOTIFY  # so the guest posts h2 without a notify
    h2 = rig.post(2, b.VIRTIO_BLK_T_IN, 2)
    order = []

    def pause():
        rig.dev.pause()
        order.append("paused")

    pauser = threading.Thread(target=pause)
    pauser.start()
    pauser.join(0.2)  # it waits for h0
    order.append("io")
    rig.disk.run_all()  # h0 completes; the paused device does not take h2
    pauser.join(10)
    assert order == ["io", "paused"]
    assert rig.q.take_used() == [(h0, 513)]
    assert len(rig.disk.ops) == 2 and not rig.disk.jobs
    state = rig.dev.save_state()["queues"][0]
    assert state["next_avail"] == state["next_used"] == 2
    # Nothing notified h2 (notifications were off): resume looks at the ring anyway.
    rig.dev.resume()
    rig.disk.run_all()
    assert rig.q.take_used() == [(h2, 513)]
    assert not rig.used_flags() & VRING_USED_F_NO_NOTIFY  # idle: the guest must notify again


def test_resume_without_anything_pending_changes_nothing():
    rig = blk.Rig()
    rig.dev.pause()
    before = ram(rig)
    rig.dev.resume()
    assert ram(rig) == before and rig.disk.ops == [] and rig.irqs == 0


def test_a_restored_device_takes_a_request_the_source_never_processed():
    src = blk.Rig()
    src.dev.pause()  # the source's final pass: the guest's last notify is kept, not handled
    head = src.post(0, b.VIRTIO_BLK_T_IN, 0)
    src.drv.notify(0)
    saved = src.t.save_state()
    dev = VirtioBlock(src.mem, src.disk, queue_size=16)  # the destination, same RAM contents
    irqs = []
    t = VirtioMmioTransport(dev, lambda: irqs.append(1))
    t.restore_state(saved)
    assert src.q.take_used() == []
    dev.resume()  # what the VM does once the state is in
    assert src.q.take_used() == [(head, 513)] and irqs


# --- virtio-net ----------------------------------------------------------------------------------


def test_net_transmit_while_paused_is_sent_on_resume():
    rig = net.Rig()
    rig.dev.pause()
    rig.mem.write(net.TXBUF, net.frame(b"hello"))
    head = rig.txq.add_chain([(net.TXBUF, 17, False)])
    rig.drv.notify(n.TX_QUEUE)
    assert rig.tap.sent == [] and rig.txq.take_used() == []
    rig.dev.resume()
    assert rig.tap.sent == [net.frame(b"hello")]
    assert rig.txq.take_used() == [(head, 0)]


def test_net_receive_while_paused_stops_watching_the_tap_until_resume():
    rig = net.Rig()
    rig.post_rx(2)
    rig.dev.pause()
    rig.tap.incoming.append(net.frame(b"x" * 60))
    before = bytes(rig.mem.read(0, net.RAM))
    assert rig.dev.process_rx() is False  # the application stops watching the tap
    assert bytes(rig.mem.read(0, net.RAM)) == before and len(rig.tap.incoming) == 1
    wakeups = rig.wakeups
    rig.dev.resume()
    assert rig.wakeups == wakeups + 1  # watch the tap again
    assert rig.dev.process_rx() is True
    assert len(rig.rxq.take_used()) == 1 and not rig.tap.incoming


# --- virtio-console ------------------------------------------------------------------------------


def test_console_input_while_paused_is_held_back_until_resume():
    rig = con.Rig()
    rig.post_rx([64])
    rig.dev.pause()
    rig.chardev.feed(b"typed")
    assert rig.chardev.pending == b"typed" and rig.rxq.take_used() == []
    state = rig.dev.save_state()
    rig.dev.resume()
    assert rig.rx_data() == b"typed" and rig.chardev.pending == b""
    # Held-back input is not device state: a destination's fresh chardev holds nothing.
    assert state["device"] == {"rx_stalled": False}


def test_console_transmit_while_paused_is_written_on_resume():
    rig = con.Rig()
    rig.dev.pause()
    rig.transmit(b"out")
    assert rig.chardev.output == b""
    rig.dev.resume()
    assert rig.chardev.output == b"out"


# --- DeviceManager -------------------------------------------------------------------------------


def manager_with(*models) -> DeviceManager:
    dm = DeviceManager(VmConfig(), block_opener=None, net_opener=None, probe=None, poller=None,
                       guest_agent=None, console_write=None, emit=lambda e: None)
    for i, model in enumerate(models):
        dm.attached[f"dev{i}"] = Attached(Placement(f"dev{i}", "x"), "x", model=model)
    return dm


def test_the_manager_pauses_and_resumes_every_virtio_device_once():
    disk = blk.Rig()
    console = con.Rig()
    dm = manager_with(disk.dev, console.dev, console.dev, object())  # virtconsole shares the model
    assert len(dm.virtio_models()) == 2
    dm.pause_devices()
    assert disk.dev.paused and console.dev.paused
    head = disk.post(0, b.VIRTIO_BLK_T_IN, 0)
    disk.drv.notify(0)
    console.transmit(b"late")
    assert disk.q.take_used() == [] and console.chardev.output == b""
    dm.resume_devices()
    assert not disk.dev.paused and not console.dev.paused
    assert disk.q.take_used() == [(head, 513)] and console.chardev.output == b"late"


def test_a_failed_pause_resumes_the_devices_it_had_paused():
    disk = blk.Rig()
    broken = blk.Rig().dev

    def fail():
        raise RuntimeError("stuck")

    broken.pause = fail
    dm = manager_with(disk.dev, broken)
    with pytest.raises(RuntimeError):
        dm.pause_devices()
    assert not disk.dev.paused


def test_pauses_nest_and_only_the_outermost_resume_lets_the_devices_go():
    """`stop` pauses the devices; a snapshot or a cancelled migration of that stopped VM pauses
    and resumes again: the devices must stay paused until `cont`."""
    disk = blk.Rig()
    dm = manager_with(disk.dev)
    dm.pause_devices()  # stop
    dm.pause_devices()  # the snapshot writer
    head = disk.post(0, b.VIRTIO_BLK_T_IN, 0)
    disk.drv.notify(0)
    dm.resume_devices()  # the snapshot is written
    assert disk.dev.paused and dm.devices_paused and disk.q.take_used() == []
    dm.resume_devices()  # cont
    assert not disk.dev.paused and not dm.devices_paused
    assert disk.q.take_used() == [(head, 513)]


def test_resume_of_a_never_paused_manager_still_looks_at_the_queues():
    """A restored VM resumes devices it never paused: they must look at their queues."""
    disk = blk.Rig()
    dm = manager_with(disk.dev)
    disk.dev.pause()  # what restore_state leaves: queues marked, device not taking work
    head = disk.post(0, b.VIRTIO_BLK_T_IN, 0)
    disk.drv.notify(0)
    dm.resume_devices()
    assert disk.q.take_used() == [(head, 513)] and not dm.devices_paused
