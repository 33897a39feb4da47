"""Scatter-gather helpers over descriptor buffers: byte ranges of a chain's readable or writable
part as guest-memory views (zero copy) or as a small copied header."""

from __future__ import annotations

from domain.memory import GuestMemory

Segment = tuple[int, int]  # (guest address, length)


def total(segs: list[Segment]) -> int:
    return sum(length for _, length in segs)


def views(mem: GuestMemory, segs: list[Segment], start: int, length: int) -> list[memoryview]:
    """Views of bytes [start, start+length) of the concatenated segments."""
    out = []
    for addr, seg_len in segs:
        if length <= 0:
            break
        if start >= seg_len:
            start -= seg_len
            continue
        n = min(seg_len - start, length)
        out.append(mem.view(addr + start, n))
        length -= n
        start = 0
    return out


def gather(mem: GuestMemory, segs: list[Segment], start: int, length: int) -> bytes:
    return b"".join(bytes(v) for v in views(mem, segs, start, length))


def scatter(mem: GuestMemory, segs: list[Segment], start: int, data) -> int:
    """Copy ``data`` into the segments from byte ``start``; returns bytes written."""
    data = memoryview(data).cast("B")
    done = 0
    for v in views(mem, segs, start, len(data)):
        v[:] = data[done:done + len(v)]
        done += len(v)
    return done
