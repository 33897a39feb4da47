"""virtio-balloon (virtio 1.1 §5.5): the host asks the guest to give back memory.

``set_target_bytes`` sets the logical guest size QMP ``balloon`` asks for; the device turns it
into config ``num_pages`` (pages the balloon should hold). The guest driver inflates (queue 0,
page frame numbers the host may discard: the injected ``discard(gpa, length)`` madvises them away),
deflates (queue 1: ``reclaim(gpa, length)``), and writes how many pages the balloon holds into
config ``actual``; a change calls ``on_actual_changed(logical_guest_bytes)`` (BALLOON_CHANGED).
Pages are 4 KiB whatever the guest's page size (VIRTIO_BALLOON_PFN_SHIFT).
"""

from __future__ import annotations

import struct
from typing import Callable

from domain.devices.state import check_range, check_state
from domain.devices.virtio import iov
from domain.devices.virtio.device import VIRTIO_ID_BALLOON, VirtioDevice
from domain.errors import VmmError
from domain.memory import GuestMemory

VIRTIO_BALLOON_F_MUST_TELL_HOST = 1 << 0
VIRTIO_BALLOON_F_STATS_VQ = 1 << 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2

INFLATE_QUEUE = 0
DEFLATE_QUEUE = 1
STATS_QUEUE = 2
QUEUE_SIZE = 256
PFN_SHIFT = 12
BALLOON_PAGE = 1 << PFN_SHIFT
MAX_PFNS_PER_CHAIN = 4096  # Linux sends at most 256 per request; more is refused as hostile
_STAT = struct.Struct("<HQ")

STAT_NAMES = {0: "stat-swap-in", 1: "stat-swap-out", 2: "stat-major-faults", 3: "stat-minor-faults",
              4: "stat-free-memory", 5: "stat-total-memory", 6: "stat-available-memory",
              7: "stat-disk-caches", 8: "stat-htlb-pgalloc", 9: "stat-htlb-pgfail"}


class VirtioBalloon(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON

    def __init__(self, mem: GuestMemory, *, discard: Callable[[int, int], object],
                 reclaim: Callable[[int, int], object] | None = None,
                 on_actual_changed: Callable[[int], object] | None = None,
                 ram_size: int | None = None, deflate_on_oom: bool = False, stats: bool = False,
                 queue_size: int = QUEUE_SIZE):
        features = VIRTIO_BALLOON_F_MUST_TELL_HOST
        if deflate_on_oom:
            features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        if stats:
            features |= VIRTIO_BALLOON_F_STATS_VQ
        super().__init__(mem, [queue_size] * (3 if stats else 2), features)
        self.ram_size = mem.size if ram_size is None else ram_size
        self._discard = discard
        self._reclaim = reclaim
        self._on_actual_changed = on_actual_changed
        self.num_pages = 0  # target balloon size in pages (host -> guest)
        self.actual = 0  # pages the guest says the balloon holds (guest -> host)
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.invalid_pfns = 0
        self.guest_stats: dict[str, int] = {}
        self._stats_head: int | None = None

    # --- host side -----------------------------------------------------------------------------

    def set_target_bytes(self, target: int) -> None:
        """Ask the guest to shrink (or grow back) to ``target`` bytes of usable RAM."""
        target = max(0, min(int(target), self.ram_size))
        with self.lock:
            pages = (self.ram_size - target) >> PFN_SHIFT
            if pages != self.num_pages:
                self.num_pages = pages
                self.interrupt.config_changed()

    def target_bytes(self) -> int:
        return self.ram_size - self.num_pages * BALLOON_PAGE

    def balloon_bytes(self) -> int:
        return self.actual * BALLOON_PAGE

    def actual_bytes(self) -> int:
        """The logical guest size QMP query-balloon reports: RAM minus what the balloon holds."""
        return self.ram_size - self.balloon_bytes()

    def request_stats(self) -> bool:
        """Hand the guest's stats buffer back so it refills it; False without a buffer to return."""
        with self.lock:
            head, self._stats_head = self._stats_head, None
            if head is None or not self.activated:
                return False
            return self.guarded(self._return_stats, head) is not None

    def _return_stats(self, head: int) -> bool:
        self.queues[STATS_QUEUE].add_used(head, 0)
        self.signal_used(STATS_QUEUE)
        return True

    # --- config space --------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return struct.pack("<II", self.num_pages, self.actual)

    def write_config(self, offset: int, data: memoryview) -> None:
        cfg = bytearray(self.config_bytes())
        if offset < 4 or offset + len(data) > len(cfg):
            return  # only 'actual' (bytes 4..7) is driver-writable
        cfg[offset:offset + len(data)] = data
        actual = struct.unpack_from("<I", cfg, 4)[0]
        if actual != self.actual:
            self.actual = actual
            if self._on_actual_changed is not None:
                self._on_actual_changed(self.actual_bytes())

    # --- queues --------------------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        if index == STATS_QUEUE:
            self._stats()
            return
        q = self.queues[index]
        op = self._discard if index == INFLATE_QUEUE else self._reclaim
        while True:
            q.disable_notification()
            while (chain := q.pop()) is not None:
                self._pages(chain, op, index == INFLATE_QUEUE)
                q.add_used(chain.head, 0)
            if not q.enable_notification():
                break
        self.signal_used(index)

    def _pages(self, chain, op, inflate: bool) -> None:
        segs = [(a, n) for a, n, w in chain.descs if not w]
        size = min(iov.total(segs), MAX_PFNS_PER_CHAIN * 4) & ~3
        pfns = struct.unpack(f"<{size // 4}I", iov.gather(self.mem, segs, 0, size))
        for start, count in _runs(pfns):
            gpa, length = start << PFN_SHIFT, count << PFN_SHIFT
            if not self.mem.contains(gpa, length):
                self.invalid_pfns += count
                continue
            if inflate:
                self.inflated_pages += count
            else:
                self.deflated_pages += count
            if op is not None:
                try:
                    op(gpa, length)
                except (OSError, VmmError):
                    pass  # advisory: the guest keeps working whether or not the host reclaimed

    def _stats(self) -> None:
        q = self.queues[STATS_QUEUE]
        while (chain := q.pop()) is not None:
            if self._stats_head is not None:  # the driver only ever has one buffer outstanding
                q.add_used(self._stats_head, 0)
            segs = [(a, n) for a, n, w in chain.descs if not w]
            raw = iov.gather(self.mem, segs, 0, min(iov.total(segs), 64 * _STAT.size))
            for off in range(0, len(raw) - _STAT.size + 1, _STAT.size):
                tag, value = _STAT.unpack_from(raw, off)
                self.guest_stats[STAT_NAMES.get(tag, f"stat-{tag}")] = value
            self._stats_head = chain.head
        q.enable_notification()

    def on_reset(self) -> None:
        self._stats_head = None

    def save_device_state(self) -> dict:
        return {"num_pages": self.num_pages, "actual": self.actual,
                "stats_head": -1 if self._stats_head is None else self._stats_head}

    def restore_device_state(self, state: dict) -> None:
        check_state(state, {"num_pages": int, "actual": int, "stats_head": int})
        self.num_pages = check_range("num_pages", state["num_pages"], 0, 0xFFFFFFFF)
        self.actual = check_range("actual", state["actual"], 0, 0xFFFFFFFF)
        head = state["stats_head"]
        if len(self.queues) <= STATS_QUEUE:
            head = -1
        check_range("stats_head", head, -1, self.queues[-1].size - 1)
        self._stats_head = None if head < 0 else head


def _runs(pfns) -> list[tuple[int, int]]:
    """Coalesce consecutive page frame numbers into (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs
