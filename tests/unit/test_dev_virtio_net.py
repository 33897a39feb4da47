import struct
from collections import deque

import pytest

from domain.devices.virtio import mmio as r
from domain.devices.virtio import net as n
from domain.devices.virtio.mock import MmioDriver, MockQueue
from domain.devices.virtio.mmio import VirtioMmioTransport
from domain.devices.virtio.net import VirtioNet, parse_mac
from domain.errors import ConfigError
from domain.memory import GuestMemory

RAM = 0x80000
RXBUF = 0x20000
TXBUF = 0x40000


class Tap:
    """NetBackend test double: queued incoming frames, recorded outgoing ones."""

    fd = -1

    def __init__(self):
        self.incoming = deque()
        self.sent = []
        self.buffer_types = set()

    def recv_into(self, buf):
        if not self.incoming:
            raise BlockingIOError()
        pkt = self.incoming.popleft()
        k = min(len(pkt), len(buf))
        buf[:k] = pkt[:k]
        return k

    def sendv(self, bufs):
        self.buffer_types.update(type(x) for x in bufs)
        data = b"".join(bytes(x) for x in bufs)
        self.sent.append(data)
        return len(data)

    def close(self):
        pass


def frame(payload, hdr=None):
    return (hdr or bytes(12)) + payload


class Rig:
    def __init__(self, mac="52:54:00:12:34:56"):
        self.mem = GuestMemory([(0, bytearray(RAM))])
        self.tap = Tap()
        self.wakeups = 0
        self.dev = VirtioNet(self.mem, self.tap, mac, rx_wakeup=self.wake, queue_size=16)
        self.irqs = 0
        self.t = VirtioMmioTransport(self.dev, self.irq)
        self.drv = MmioDriver(self.t)
        self.rxq = MockQueue(self.mem, 16, 0x1000)
        self.txq = MockQueue(self.mem, 16, 0x3000)
        assert self.drv.start([self.rxq, self.txq]) & r.DRIVER_OK

    def wake(self):
        self.wakeups += 1

    def irq(self):
        self.irqs += 1

    def post_rx(self, count, size=n.SMALL_RX_BUFFER, split=False):
        heads = []
        for i in range(count):
            base = RXBUF + i * 0x1000
            if split:
                heads.append(self.rxq.add_chain([(base, 12, True), (base + 0x100, size, True)]))
            else:
                heads.append(self.rxq.add_chain([(base, size, True)]))
        self.drv.notify(n.RX_QUEUE)
        return heads


def test_config_mac_and_link():
    rig = Rig()
    feats = rig.drv.device_features()
    assert feats & n.VIRTIO_NET_F_MAC and feats & n.VIRTIO_NET_F_STATUS
    assert rig.drv.read_config(0, 8) == bytes.fromhex("525400123456") + b"\x01\x00"
    gen = rig.drv.read32(r.CONFIG_GENERATION)
    rig.dev.set_link(False)
    assert rig.drv.read_config(6, 2) == b"\0\0"
    assert rig.drv.read32(r.CONFIG_GENERATION) == gen + 1
    assert rig.drv.ack_interrupt() & r.INT_CONFIG


def test_no_mac_feature_without_a_mac():
    mem = GuestMemory([(0, bytearray(RAM))])
    dev = VirtioNet(mem, Tap(), None)
    assert not dev.avail_features & n.VIRTIO_NET_F_MAC


def test_parse_mac():
    assert parse_mac("aa:bb:cc:dd:ee:ff") == bytes.fromhex("aabbccddeeff")
    for bad in ("aa:bb", "zz:bb:cc:dd:ee:ff", b"12345"):
        with pytest.raises(ConfigError):
            parse_mac(bad)


def test_tx_passes_header_and_payload_zero_copy():
    rig = Rig()
    hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)
    rig.mem.write(TXBUF, hdr)
    rig.mem.write(TXBUF + 0x100, b"PAYLOAD!")
    head = rig.txq.add_chain([(TXBUF, 12, False), (TXBUF + 0x100, 8, False)])
    rig.drv.notify(n.TX_QUEUE)
    assert rig.tap.sent == [hdr + b"PAYLOAD!"]
    assert rig.tap.buffer_types == {memoryview}
    assert rig.txq.take_used() == [(head, 0)]
    assert rig.dev.stats["tx_packets"] == 1


def test_tx_drops_runt_and_oversized_frames():
    rig = Rig()
    h1 = rig.txq.add_chain([(TXBUF, 4, False)])
    rig.drv.notify(n.TX_QUEUE)
    assert rig.tap.sent == [] and rig.txq.take_used() == [(h1, 0)]
    assert rig.dev.stats["tx_dropped"] == 1


def test_rx_into_a_single_buffer():
    rig = Rig()
    heads = rig.post_rx(2)
    rig.tap.incoming.append(frame(b"hello"))
    rig.tap.incoming.append(frame(b"world!"))
    assert rig.dev.process_rx() is False  # both delivered, and the guest's buffers ran out
    assert rig.rxq.take_used() == [(heads[0], 17), (heads[1], 18)]
    assert rig.mem.read(RXBUF + 12, 5) == b"hello"
    assert rig.mem.read(RXBUF + 10, 2) == b"\x01\x00"  # num_buffers
    assert rig.mem.read(RXBUF + 0x1000 + 12, 6) == b"world!"
    assert rig.irqs >= 1


def test_rx_scattered_chain():
    rig = Rig()
    heads = rig.post_rx(1, size=1600, split=True)
    rig.tap.incoming.append(frame(b"x" * 100))
    rig.dev.process_rx()
    assert rig.rxq.take_used() == [(heads[0], 112)]
    assert rig.mem.read(RXBUF + 0x100, 100) == b"x" * 100


def test_rx_frame_larger_than_the_buffer_is_dropped_and_the_buffer_reused():
    rig = Rig()
    heads = rig.post_rx(1, size=64, split=True)
    rig.tap.incoming.append(frame(b"y" * 500))
    rig.tap.incoming.append(frame(b"ok"))
    rig.dev.process_rx()
    assert rig.dev.stats["rx_dropped"] == 1
    assert rig.rxq.take_used() == [(heads[0], 14)]


def test_rx_stalls_without_buffers_then_wakes_up():
    rig = Rig()
    rig.tap.incoming.append(frame(b"early"))
    assert rig.dev.process_rx() is False
    assert rig.dev.rx_stalled and len(rig.tap.incoming) == 1  # left in the tap
    heads = rig.post_rx(2)  # the guest posts buffers: the application is told to poll again
    assert rig.wakeups == 1 and not rig.dev.rx_stalled
    assert rig.dev.process_rx() is True  # drained the tap, a buffer is left
    assert rig.rxq.take_used() == [(heads[0], 17)]
    rig.post_rx(1)
    assert rig.wakeups == 1  # not stalled: no wake-up needed


def test_rx_without_wakeup_callback_delivers_on_notify():
    rig = Rig()
    rig.dev._rx_wakeup = None
    rig.tap.incoming.append(frame(b"early"))
    assert rig.dev.process_rx() is False
    heads = rig.post_rx(1)
    assert rig.rxq.take_used() == [(heads[0], 17)]


def test_rx_before_activation_drains_the_tap():
    mem = GuestMemory([(0, bytearray(RAM))])
    tap = Tap()
    dev = VirtioNet(mem, tap, None)
    tap.incoming.extend([frame(b"a"), frame(b"b")])
    assert dev.process_rx() is True
    assert not tap.incoming and dev.stats["rx_dropped"] == 2


def test_hostile_rx_chain_sets_needs_reset():
    rig = Rig()
    rig.rxq.add_chain([(RAM + 0x1000, 2000, True)])
    rig.tap.incoming.append(frame(b"z"))
    rig.drv.notify(n.RX_QUEUE)
    assert rig.dev.process_rx() is True  # does not raise
    assert rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    assert rig.drv.read32(r.INTERRUPT_STATUS) & r.INT_CONFIG
    assert rig.dev.process_rx() is True  # inert from now on, and drains the tap
    assert not rig.tap.incoming


def test_link_down_drops_traffic():
    rig = Rig()
    rig.dev.set_link(False)
    rig.txq.add_chain([(TXBUF, 20, False)])
    rig.drv.notify(n.TX_QUEUE)
    assert rig.tap.sent == []
    rig.post_rx(1)
    rig.tap.incoming.append(frame(b"q"))
    rig.dev.process_rx()
    assert rig.rxq.take_used() == []
