"""Guest RAM on host mmaps: one mapping per region (the MemoryAllocator port).

Anonymous private mappings by default. With a backing file (a memory snapshot), each region maps
the file MAP_PRIVATE at consecutive offsets in layout order: pages are read on first touch and a
guest write copies the page, so restoring does not read the whole file and never changes it.
"""

from __future__ import annotations

import mmap
import os
import weakref
from typing import Sequence

from domain.errors import HostResourceError, InvalidArgumentError
from domain.memory import PAGE_SIZE, GuestMemory

_PROT = mmap.PROT_READ | mmap.PROT_WRITE
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)  # RAM is committed when touched, not up front


class MmapAllocator:
    def __init__(self) -> None:
        self._maps: "weakref.WeakKeyDictionary[GuestMemory, list[mmap.mmap]]" = weakref.WeakKeyDictionary()

    def allocate(self, layout: Sequence[tuple[int, int]], backing_file: str | None = None) -> GuestMemory:
        for gpa, size in layout:
            if gpa < 0 or size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
                raise InvalidArgumentError(f"guest RAM region {gpa:#x}+{size:#x} is not page aligned")
        maps: list[mmap.mmap] = []
        try:
            if backing_file is None:
                for _gpa, size in layout:
                    maps.append(mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE, _PROT))
            else:
                maps.extend(self._map_file(layout, backing_file))
            memory = GuestMemory([(gpa, m) for (gpa, _size), m in zip(layout, maps)])
        except OSError as e:
            _close_all(maps)
            where = f" {backing_file}" if backing_file else ""
            raise HostResourceError(f"cannot map guest RAM{where}: {e.strerror}") from None
        except ValueError as e:  # overlapping layout, from GuestMemory
            _close_all(maps)
            raise InvalidArgumentError(str(e)) from None
        self._maps[memory] = maps
        return memory

    @staticmethod
    def _map_file(layout: Sequence[tuple[int, int]], path: str) -> list[mmap.mmap]:
        maps: list[mmap.mmap] = []
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            need = sum(size for _gpa, size in layout)
            have = os.fstat(fd).st_size
            if have < need:  # touching a page past EOF would kill us with SIGBUS
                raise HostResourceError(f"memory file {path} holds {have} bytes, the layout needs {need}")
            offset = 0
            for _gpa, size in layout:
                # PROT_WRITE on a read-only fd is fine for MAP_PRIVATE: writes never reach the file.
                maps.append(mmap.mmap(fd, size, mmap.MAP_PRIVATE, _PROT, offset=offset))
                offset += size
        except BaseException:
            _close_all(maps)
            raise
        finally:
            os.close(fd)
        return maps

    def discard(self, memory: GuestMemory, gpa: int, length: int) -> None:
        """Give the host memory behind [gpa, gpa+length) back (the balloon took those pages):
        MADV_DONTNEED, after which the guest reads zeros (or the snapshot file's bytes)."""
        maps = self._maps.get(memory)
        if maps is None or length <= 0:
            return
        for region, m in zip(memory.regions, maps):
            # Only whole pages inside the range: a partial page may hold live data.
            start = -(-max(gpa, region.gpa) // PAGE_SIZE) * PAGE_SIZE
            end = min(gpa + length, region.end) // PAGE_SIZE * PAGE_SIZE
            if start < end:
                m.madvise(mmap.MADV_DONTNEED, start - region.gpa, end - start)

    def free(self, memory: GuestMemory) -> None:
        """Drop the views, then unmap. A mapping still pinned elsewhere (a VM not yet closed)
        raises HostResourceError; the rest are unmapped anyway, and free() may be called again."""
        maps = self._maps.pop(memory, None)
        if maps is None:
            raise InvalidArgumentError("guest memory was not allocated here or was already freed")
        try:
            memory.release()
        except BufferError:  # a view is still exported (a VM maps it): free() may be retried
            self._maps[memory] = maps
            raise HostResourceError("guest RAM is still mapped by a VM (close the VM first)") from None
        busy = _close_all(maps)
        if busy:
            self._maps[memory] = busy  # a later free() closes the rest
            raise HostResourceError(f"{len(busy)} guest RAM mapping(s) still in use (close the VM first)")


def _close_all(maps: list[mmap.mmap]) -> list[mmap.mmap]:
    """Close what can be closed; return the mappings something still exports."""
    busy = []
    for m in maps:
        try:
            m.close()
        except BufferError:
            busy.append(m)
    return busy
