"""A raw image's virtio-blk request loop in C (adapters/storage/_blk_ffi_build.py), behind the
domain's BlockDataPlane port.

Why: through the host page cache a 64 KiB request's copy takes ~10 µs on this host, and the
Python device model's own work per request (pop, parse, complete, the used ring) about as long,
on the one CPU a polling guest leaves. The C loop serves the plain reads and writes and
declines everything else, which the Python model then handles as before; the model keeps the
queue's state, the interrupt decisions' effects, pause and quiesce, and dirty tracking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from domain.ports import (
    SERVE_BUDGET,
    SERVE_DECLINE,
    SERVE_IDLE,
    SERVE_SIGNAL,
    SERVE_STOP,
    NativeServe,
)

log = logging.getLogger("pystrato.block")

try:
    from adapters.storage._blk_cffi import ffi, lib
except ImportError as e:  # not built (a source checkout before `pip install -e .`)
    ffi = lib = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = ""
    # The port's reasons are the C loop's return codes.
    if (lib.PX_IDLE, lib.PX_SIGNAL, lib.PX_DECLINE, lib.PX_STOP, lib.PX_BUDGET_DONE) != (
            SERVE_IDLE, SERVE_SIGNAL, SERVE_DECLINE, SERVE_STOP, SERVE_BUDGET):
        raise ImportError("adapters.storage._blk_cffi's return codes differ from domain.ports' SERVE_*")

_warned = False


def available() -> bool:
    global _warned
    if lib is None and not _warned:
        _warned = True
        log.warning("virtio-blk's C request loop is not built (%s): requests go through Python", _IMPORT_ERROR)
    return lib is not None


def _address(view: memoryview) -> int:
    """The host address of a writable buffer, without keeping an export of it (guest RAM must
    stay unmappable: GuestMemory.release)."""
    p = ffi.from_buffer(view, require_writable=True)
    try:
        return int(ffi.cast("uintptr_t", p))
    finally:
        ffi.release(p)


class NativeBlockQueue:
    """One virtio-blk queue's C request loop over one image's file descriptors.

    Holds raw host addresses of guest RAM: the device model calls it only while its queue is
    active, i.e. while guest RAM is mapped (release quiesces the device first)."""

    def __init__(self, regions: Sequence[tuple[int, memoryview]], fd: int, bfd: int, size: int,
                 readonly: bool):
        if len(regions) > lib.PX_MAX_REGIONS:
            raise ValueError(f"more than {lib.PX_MAX_REGIONS} RAM regions")
        b = ffi.new("struct px_blk *")
        for i, (gpa, view) in enumerate(regions):
            b.regions[i].gpa = gpa
            b.regions[i].size = len(view)
            b.regions[i].hva = ffi.cast("uint8_t *", _address(view))
        b.nregions = len(regions)
        b.fd, b.bfd = fd, bfd
        b.capacity = size // 512 * 512
        b.readonly = int(readonly)
        b.signalled_used = -1
        self._b = b
        self._bound = False

    def bind(self, desc: int, avail: int, used: int, size: int) -> bool:
        self._bound = lib.px_blk_bind(self._b, desc, avail, used, size) == 0
        return self._bound

    def arm(self) -> None:
        """Forget an earlier stop request (before a serve is started)."""
        self._b.stop = 0

    def request_stop(self) -> None:
        """Make a running (or the next) serve return PX_STOP after its current request."""
        self._b.stop = 1

    def serve(self, next_avail: int, next_used: int, signalled_used: int | None, event_idx: bool,
              poll: float, budget: int = 0) -> NativeServe:
        if not self._bound:
            raise RuntimeError("native queue is not bound to a ring")
        b = self._b
        b.next_avail, b.next_used = next_avail, next_used
        b.signalled_used = -1 if signalled_used is None else signalled_used
        b.event_idx = int(event_idx)
        reason = lib.px_blk_serve(b, int(poll * 1e9), budget)
        su = b.signalled_used
        return NativeServe(reason, b.next_avail, b.next_used, None if su < 0 else su,
                           b.rd_ops, b.rd_bytes, b.wr_ops, b.wr_bytes, b.errors, bool(b.poll_missed))

    def written(self) -> list[tuple[int, int]]:
        """Guest RAM ranges the last serve() wrote (data of reads, status bytes)."""
        w = self._b.written
        return [(w[2 * i], w[2 * i + 1]) for i in range(self._b.nwritten)]
