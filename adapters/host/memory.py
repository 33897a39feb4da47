"""Guest RAM on host mmaps: one mapping per region (the MemoryAllocator port).

Anonymous private mappings by default. With a backing file (a memory snapshot), each region maps
the file MAP_PRIVATE at consecutive offsets in layout order: pages are read on first touch and a
guest write copies the page, so restoring does not read the whole file and never changes it.

A memory backend (-mem-path, -machine mem-share=on, -mem-prealloc, dump-guest-core=off) is
applied as QEMU and StratoVirt do: -mem-path DIR backs RAM with an unlinked file created in DIR
(hugetlbfs gives huge pages), -mem-path FILE with that file (created if missing, grown to the
RAM size); mem-share=on maps it MAP_SHARED so other processes see guest RAM, otherwise guest
writes stay private; prealloc faults every page in before the guest runs; dump-guest-core=off
keeps RAM out of core dumps (MADV_DONTDUMP).
"""

from __future__ import annotations

import mmap
import os
import weakref
from typing import Sequence

from domain.config import MemoryConfig
from domain.errors import HostResourceError, InvalidArgumentError
from domain.memory import PAGE_SIZE, GuestMemory

_PROT = mmap.PROT_READ | mmap.PROT_WRITE
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)  # RAM is committed when touched, not up front
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable without touching them from here
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)  # frees the file's pages behind a shared mapping


class MmapAllocator:
    def __init__(self, huge_pages: bool = False) -> None:
        """huge_pages: ask for transparent huge pages behind anonymous RAM (for a hypervisor
        that maps guest RAM with them; an interpreter would only pay 2 MiB per touched page)."""
        self._huge_pages = huge_pages
        self._maps: "weakref.WeakKeyDictionary[GuestMemory, list[mmap.mmap]]" = weakref.WeakKeyDictionary()
        self._shared: "weakref.WeakSet[GuestMemory]" = weakref.WeakSet()  # file pages, MAP_SHARED

    def allocate(self, layout: Sequence[tuple[int, int]], backing_file: str | None = None,
                 backend: MemoryConfig | None = None) -> GuestMemory:
        for gpa, size in layout:
            if gpa < 0 or size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
                raise InvalidArgumentError(f"guest RAM region {gpa:#x}+{size:#x} is not page aligned")
        maps: list[mmap.mmap] = []
        try:
            if backing_file is not None:
                maps.extend(self._map_file(layout, backing_file))
            elif backend is not None and backend.mem_path:
                maps.extend(_map_backend(layout, backend.mem_path, backend.mem_share))
            else:
                for _gpa, size in layout:
                    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE, _PROT)
                    maps.append(m)
                    if self._huge_pages:
                        _advise_huge_pages(m)
            if backend is not None:
                _apply_policy(maps, backend)
            memory = GuestMemory([(gpa, m) for (gpa, _size), m in zip(layout, maps)])
        except OSError as e:
            _close_all(maps)
            path = backing_file or (backend.mem_path if backend is not None else None)
            where = f" {path}" if path else ""
            raise HostResourceError(f"cannot map guest RAM{where}: {e.strerror}") from None
        except ValueError as e:  # overlapping layout, from GuestMemory
            _close_all(maps)
            raise InvalidArgumentError(str(e)) from None
        self._maps[memory] = maps
        if backend is not None and backend.mem_path and backend.mem_share:
            self._shared.add(memory)
        return memory

    @staticmethod
    def _map_file(layout: Sequence[tuple[int, int]], path: str) -> list[mmap.mmap]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            need = sum(size for _gpa, size in layout)
            have = os.fstat(fd).st_size
            if have < need:  # touching a page past EOF would kill us with SIGBUS
                raise HostResourceError(f"memory file {path} holds {have} bytes, the layout needs {need}")
            # PROT_WRITE on a read-only fd is fine for MAP_PRIVATE: writes never reach the file.
            return _map_layout(fd, layout, mmap.MAP_PRIVATE)
        finally:
            os.close(fd)

    def discard(self, memory: GuestMemory, gpa: int, length: int) -> None:
        """Give the host memory behind [gpa, gpa+length) back (the balloon took those pages):
        MADV_DONTNEED, after which the guest reads zeros (or the snapshot file's bytes)."""
        maps = self._maps.get(memory)
        if maps is None or length <= 0:
            return
        # DONTNEED only drops this process's view of a shared file's pages; REMOVE frees them.
        advice = _MADV_REMOVE if memory in self._shared else mmap.MADV_DONTNEED
        for region, m in zip(memory.regions, maps):
            # Only whole pages inside the range: a partial page may hold live data.
            start = -(-max(gpa, region.gpa) // PAGE_SIZE) * PAGE_SIZE
            end = min(gpa + length, region.end) // PAGE_SIZE * PAGE_SIZE
            if start < end:
                m.madvise(advice, start - region.gpa, end - start)

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


def _advise_huge_pages(m: mmap.mmap) -> None:
    """Ask for transparent huge pages behind anonymous guest RAM, as QEMU does for its RAM.

    KVM maps guest memory with 2 MiB pages only where the host backs it with huge pages; with
    THP in "madvise" mode (Debian's default) anonymous memory gets them only on request.
    Measured on kvm-pvm with a Linux guest: without it the whole boot ran on 4 KiB pages, with
    it the VMM held the same 34 MiB of huge pages as QEMU 15 s into the boot. Best effort: a
    kernel without THP keeps 4 KiB pages."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            m.madvise(advice)
        except OSError:
            pass


def _map_backend(layout: Sequence[tuple[int, int]], path: str, share: bool) -> list[mmap.mmap]:
    """-mem-path: regions at consecutive offsets of one file, grown to the RAM size."""
    need = sum(size for _gpa, size in layout)
    if os.path.isdir(path):
        # As QEMU does: a file nobody else can open, gone when the VMM exits.
        fd = os.open(path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < need:
            os.ftruncate(fd, need)  # on hugetlbfs the size must be a huge-page multiple: EINVAL
        return _map_layout(fd, layout, mmap.MAP_SHARED if share else mmap.MAP_PRIVATE)
    finally:
        os.close(fd)


def _map_layout(fd: int, layout: Sequence[tuple[int, int]], flags: int) -> list[mmap.mmap]:
    """One mapping per region, at consecutive offsets of fd in layout order; all or none."""
    maps: list[mmap.mmap] = []
    try:
        offset = 0
        for _gpa, size in layout:
            maps.append(mmap.mmap(fd, size, flags, _PROT, offset=offset))
            offset += size
    except BaseException:
        _close_all(maps)
        raise
    return maps


def _apply_policy(maps: list[mmap.mmap], backend: MemoryConfig) -> None:
    for m in maps:
        if not backend.dump_guest_core:
            m.madvise(mmap.MADV_DONTDUMP)
        if backend.prealloc:
            _populate(m)


def _populate(m: mmap.mmap) -> None:
    """-mem-prealloc: every page present and writable before the guest starts."""
    try:
        m.madvise(_MADV_POPULATE_WRITE)
        return
    except OSError:
        pass  # older kernel: touch each page instead, keeping its content (a file may hold data)
    view = memoryview(m)
    try:
        for off in range(0, len(m), PAGE_SIZE):
            view[off] = view[off]
    finally:
        view.release()


def _close_all(maps: list[mmap.mmap]) -> list[mmap.mmap]:
    """Close what can be closed; return the mappings something still exports."""
    busy = []
    for m in maps:
        try:
            m.close()
        except BufferError:
            busy.append(m)
    return busy
