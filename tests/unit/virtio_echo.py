"""EchoDevice: the virtio device the transport tests (MMIO and PCI) drive. It has two 16-entry
queues, one feature bit of its own and an 8-byte config space, completes every chain with used
len = its total writable length, and counts activations and resets."""

from domain.devices.virtio.device import VirtioDevice


class EchoDevice(VirtioDevice):
    device_id = 42
    FEATURE_X = 1 << 3

    def __init__(self, mem):
        super().__init__(mem, [16, 16], self.FEATURE_X)
        self.config = bytearray(b"CONFIG!!")
        self.activations = 0
        self.resets = 0
        self.handled = []

    def config_bytes(self):
        return bytes(self.config)

    def write_config(self, offset, data):
        self.config[offset:offset + len(data)] = data

    def on_activate(self):
        self.activations += 1

    def on_reset(self):
        self.resets += 1

    def handle_queue(self, index):
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            self.handled.append((index, chain.head))
            q.add_used(chain.head, sum(n for _, n, w in chain.descs if w))
        self.signal_used(index)
