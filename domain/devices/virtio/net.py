"""virtio-net (virtio 1.1 §5.1) over a tap NetBackend opened with IFF_VNET_HDR and a 12-byte
vnet header, so virtio_net_hdr_v1 passes through unchanged in both directions.

Queues: 0 = receive, 1 = transmit. Transmit runs on queue notify. Receive runs when the
application sees the tap readable (level-triggered) and calls ``process_rx()``: it returns False
when it ran out of guest receive buffers; the application then stops watching the tap until the
device calls the injected ``rx_wakeup()``, which it does when the guest posts buffers again.
So a guest that does not post buffers never makes the I/O thread spin. A paused device
(migration's final pass) receives nothing the same way: ``process_rx()`` returns False, and
``resume()`` asks to watch the tap again.
"""

from __future__ import annotations

from typing import Callable

from domain.devices.state import check_state
from domain.devices.virtio import iov
from domain.devices.virtio.device import VIRTIO_ID_NET, VirtioDevice
from domain.errors import ConfigError, VmmError
from domain.memory import GuestMemory
from domain.ports import NetBackend

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
VNET_HDR_SIZE = 12  # virtio_net_hdr_v1
NUM_BUFFERS_OFFSET = 10
MAX_PACKET = VNET_HDR_SIZE + 65550  # header + the largest frame a tap hands out
SMALL_RX_BUFFER = VNET_HDR_SIZE + 1518  # Linux's per-packet buffer without mergeable buffers


def parse_mac(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        raw = mac
    else:
        try:
            raw = bytes(int(part, 16) for part in mac.split(":"))
        except ValueError:
            raw = b""
    if len(raw) != 6:
        raise ConfigError("mac", f"invalid MAC address {mac!r}")
    return raw


class VirtioNet(VirtioDevice):
    device_id = VIRTIO_ID_NET

    def __init__(self, mem: GuestMemory, backend: NetBackend, mac: str | bytes | None = None, *,
                 rx_wakeup: Callable[[], object] | None = None, queue_size: int = QUEUE_SIZE):
        self.backend = backend
        self.mac = parse_mac(mac) if mac is not None else None
        features = VIRTIO_NET_F_STATUS | (VIRTIO_NET_F_MAC if self.mac is not None else 0)
        super().__init__(mem, [queue_size, queue_size], features)
        self._rx_wakeup = rx_wakeup
        self.link_up = True
        self.rx_stalled = False
        self._rx_deferred = False  # the tap was readable while paused
        self._scratch = bytearray(MAX_PACKET)
        self.stats = {"rx_packets": 0, "rx_bytes": 0, "rx_dropped": 0,
                      "tx_packets": 0, "tx_bytes": 0, "tx_dropped": 0}

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return (self.mac or bytes(6)) + status.to_bytes(2, "little")

    def set_link(self, up: bool) -> None:
        with self.lock:
            if up != self.link_up:
                self.link_up = up
                self.interrupt.config_changed()

    def on_reset(self) -> None:
        self.rx_stalled = False

    # --- queues --------------------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._tx()
        elif index == RX_QUEUE and self.rx_stalled:  # the guest posted receive buffers
            self.rx_stalled = False
            if self._rx_wakeup is not None:
                self._rx_wakeup()  # the application polls the tap again and calls process_rx
            else:
                self._rx()

    def _tx(self) -> None:
        q = self.queues[TX_QUEUE]
        mem = self.mem
        while True:
            q.disable_notification()
            while (chain := q.pop()) is not None:
                segs = [(a, n) for a, n, w in chain.descs if not w]
                size = iov.total(segs)
                if size < VNET_HDR_SIZE or size > MAX_PACKET or not self.link_up:
                    self.stats["tx_dropped"] += 1
                else:
                    try:
                        self.backend.sendv(iov.views(mem, segs, 0, size))
                        self.stats["tx_packets"] += 1
                        self.stats["tx_bytes"] += size - VNET_HDR_SIZE
                    except (OSError, VmmError):
                        self.stats["tx_dropped"] += 1
                q.add_used(chain.head, 0)
            if not q.enable_notification():
                break
        self.signal_used(TX_QUEUE)

    def process_rx(self) -> bool:
        """Move frames from the tap into the guest. True when the tap was drained or a batch was
        moved (call again while the tap is readable); False when the guest's receive buffers ran
        out (stop watching the tap until ``rx_wakeup()``)."""
        with self.lock:
            if self.paused:  # frames stay in the tap; stop watching it until resume()
                self._rx_deferred = True
                return False
            if not self.activated or not self.queues[RX_QUEUE].active or not self.link_up:
                self._drop_pending()
                return True
            result = self.guarded(self._rx)
            return True if result is None else result

    def on_resume(self) -> None:
        with self.lock:
            if not self._rx_deferred or self.paused:
                return
            self._rx_deferred = False
            if self._rx_wakeup is not None:
                self._rx_wakeup()  # the application polls the tap again
            elif self.activated and self.queues[RX_QUEUE].active:
                self.guarded(self._rx)

    def _drop_pending(self, limit: int = 256) -> None:
        for _ in range(limit):
            if self._recv(memoryview(self._scratch)) <= 0:
                return
            self.stats["rx_dropped"] += 1

    def _recv(self, buf: memoryview) -> int:
        try:
            return self.backend.recv_into(buf)
        except BlockingIOError:
            return 0
        except (OSError, VmmError):
            return -1

    def _rx(self) -> bool:
        q = self.queues[RX_QUEUE]
        mem = self.mem
        delivered = 0
        drained = True
        for _ in range(q.size):
            if not q.has_available() and not q.enable_notification():
                self.rx_stalled = True
                drained = False
                break
            chain = q.pop()
            if chain is None:
                continue
            segs = [(a, n) for a, n, w in chain.descs if w]
            if len(segs) == 1 and segs[0][1] >= SMALL_RX_BUFFER:
                view = mem.view(segs[0][0], segs[0][1])
                n = self._recv(view)
                if n >= VNET_HDR_SIZE:
                    view[NUM_BUFFERS_OFFSET:NUM_BUFFERS_OFFSET + 2] = b"\x01\x00"
            else:
                n = self._recv(memoryview(self._scratch))
                if n > iov.total(segs):
                    self.stats["rx_dropped"] += 1
                    q.undo_pop()
                    continue
                if n >= VNET_HDR_SIZE:
                    self._scratch[NUM_BUFFERS_OFFSET:NUM_BUFFERS_OFFSET + 2] = b"\x01\x00"
                    iov.scatter(mem, segs, 0, memoryview(self._scratch)[:n])
            if n <= 0:
                q.undo_pop()
                break
            if n < VNET_HDR_SIZE:  # not even a header: drop, recycle the buffer
                self.stats["rx_dropped"] += 1
                q.undo_pop()
                continue
            q.add_used(chain.head, n)
            delivered += 1
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += n - VNET_HDR_SIZE
        if delivered:
            self.signal_used(RX_QUEUE)
        return drained

    def save_device_state(self) -> dict:
        return {"link_up": self.link_up}

    def restore_device_state(self, state: dict) -> None:
        check_state(state, {"link_up": bool})
        self.link_up = state["link_up"]
