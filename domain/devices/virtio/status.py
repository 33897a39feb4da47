"""The virtio device-status state machine (virtio 1.1 §2.1, §3.1.1), shared by every transport.

virtio-mmio and virtio-pci differ in how a driver reaches the Status field and in how interrupts
go out; what a write to Status means is the same for both, so it lives here once.
"""

from __future__ import annotations

from domain.devices.virtio.device import VIRTIO_F_VERSION_1
from domain.devices.virtio.queue import VirtioQueueError

# Device status bits
ACKNOWLEDGE = 0x01
DRIVER = 0x02
DRIVER_OK = 0x04
FEATURES_OK = 0x08
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80
# The order a driver sets them in (virtio 1.1 §3.1.1): each valid status is one of these.
STATUS_STEPS = (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK,
                ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)


class VirtioStatusMixin:
    """Status writes, feature negotiation and activation for a transport.

    The transport provides ``status``, ``device`` (present whenever Status can be written),
    ``driver_features``, ``driver_features_sel``, ``_on_activate``, ``reset()`` (its own reset
    hooks) and ``needs_reset(reason)`` (its own interrupt delivery).
    """

    def _clear_common(self) -> None:
        """The registers every virtio transport resets to zero (device reset, virtio 1.1 §2.1)."""
        self.status = 0
        self.isr = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.needs_reset_reason: str | None = None

    def _status_is(self, must_have: int, must_not_have: int) -> bool:
        return self.status & must_have == must_have and not self.status & must_not_have

    def _write_driver_features(self, value: int) -> None:
        """The driver writes its half (``driver_features_sel``) of the features it accepts."""
        if self._status_is(DRIVER, FEATURES_OK | FAILED) and self.driver_features_sel < 2:
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & FAILED:
            self.status |= FAILED
            return
        keep = self.status & DEVICE_NEEDS_RESET
        cur = self.status & ~DEVICE_NEEDS_RESET
        new = value & ~DEVICE_NEEDS_RESET
        if new not in STATUS_STEPS or new & cur != cur:
            return  # out of order or clearing bits: ignored, the driver sees the old status
        added = new & ~cur
        if added & FEATURES_OK and not self._accept_features():
            return  # FEATURES_OK stays clear: the driver must give up (virtio 1.1 §3.1.1)
        self.status = new | keep
        if added & DRIVER_OK:
            self._activate()

    def _accept_features(self) -> bool:
        dev, feats = self.device, self.driver_features
        if feats & ~dev.avail_features or not feats & VIRTIO_F_VERSION_1:
            return False
        dev.acked_features = feats
        return True

    def _activate(self) -> None:
        dev = self.device
        try:
            dev.activate()
        except VirtioQueueError as e:
            dev.broken = str(e)
            self.needs_reset(str(e))
            return
        if self._on_activate is not None:
            self._on_activate(self)
