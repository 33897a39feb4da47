"""virtio devices: split virtqueues, the virtio-mmio transport, block, net and balloon."""

from domain.devices.virtio.queue import DescriptorChain, VirtioQueueError, VirtQueue

__all__ = ["DescriptorChain", "VirtioQueueError", "VirtQueue"]
