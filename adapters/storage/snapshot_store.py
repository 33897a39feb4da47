"""Snapshot files: DIR/memory (raw guest pages, holes for zero pages) and DIR/state.

Both are written under temporary names and renamed into place, so a failed save (ENOSPC,
EACCES, ...) leaves no half file and never replaces a good snapshot. Renaming (instead of
rewriting in place) also keeps VMs that were started from the old files safe: they map the
old memory file MAP_PRIVATE, and truncating it under them would SIGBUS their guests.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import Callable

Progress = Callable[[int, int], None]

from domain.errors import MigrationError, SnapshotFormatError
from domain.memory import GuestMemory
from domain.snapshot_format import MAX_STATE_FILE, PREFIX_SIZE, check_state_prefix, nonzero_runs

MEMORY_FILE = "memory"
STATE_FILE = "state"
# Progress is reported (and a cancel noticed) after each chunk of this many bytes of RAM.
CHUNK = 16 << 20

ZeroScanner = Callable[[memoryview], list[tuple[int, int]]]


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_sync_file_range = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Hand what was just written to the disk now rather than all at the final fsync: the
    writeback of one chunk overlaps the copy of the next, and the fsync finds little left.
    (os has no sync_file_range; ctypes is loaded on the first save only.)"""
    global _sync_file_range
    if _sync_file_range is None:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _sync_file_range = fn
        except (AttributeError, OSError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # best effort: fsync decides


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


class FileSnapshotStore:
    def __init__(self, zero_scanner: ZeroScanner | None = None, *, durable: bool = True):
        """``durable``: fsync the files and the directory before the save counts as done."""
        self._scan = zero_scanner or nonzero_runs
        self._durable = durable

    # --- save ---------------------------------------------------------------------------------

    def check_target(self, directory: str) -> None:
        """OSError unless DIR is an existing directory this process may create files in."""
        st = os.stat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    def save(self, directory: str, state: bytes, memory: GuestMemory, *,
             progress: Progress | None = None, publish: Callable[[], None] | None = None) -> None:
        """See application.services.snapshot.SnapshotStore.save. An exception from progress or
        publish (a cancel) removes the temporary files: a cancelled save leaves DIR as it was."""
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        mem_tmp = os.path.join(directory, f".{MEMORY_FILE}.tmp-{token}")
        state_tmp = os.path.join(directory, f".{STATE_FILE}.tmp-{token}")
        report = progress or (lambda data, done: None)
        try:
            self._write_memory(mem_tmp, memory, report)
            self._write_file(state_tmp, memoryview(state))
            if publish is not None:
                publish()
            state_path = os.path.join(directory, STATE_FILE)
            # Drop the old state first: a crash between the two renames then leaves no state
            # file (refused clearly) rather than an old state paired with new memory.
            try:
                os.unlink(state_path)
            except FileNotFoundError:
                pass
            os.rename(mem_tmp, os.path.join(directory, MEMORY_FILE))
            os.rename(state_tmp, state_path)
            if self._durable:
                dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException:
            for p in (mem_tmp, state_tmp):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise

    def _create(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def _write_memory(self, path: str, memory: GuestMemory, report: Progress) -> None:
        fd = self._create(path)
        try:
            # The full size first (sparse), then only the non-zero runs: zero pages stay holes,
            # which read back as zeros through the MAP_PRIVATE mapping of a restore.
            os.ftruncate(fd, memory.size)
            report(0, 0)
            base = data = 0
            for region in memory.regions:
                for off, length in self._scan(region.view):
                    end = off + length
                    while off < end:
                        n = min(CHUNK, end - off)
                        _pwrite_all(fd, region.view[off : off + n], base + off)
                        if self._durable:
                            _start_writeback(fd, base + off, n)
                        off += n
                        data += n
                        report(data, base + off)
                base += region.size
                report(data, base)
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _write_file(self, path: str, data: memoryview) -> None:
        fd = self._create(path)
        try:
            _pwrite_all(fd, data, 0)
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    # --- load ---------------------------------------------------------------------------------

    def read_state(self, directory: str) -> bytes:
        path = os.path.join(directory, STATE_FILE)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise MigrationError(f"cannot read snapshot state file {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotFormatError(f"snapshot state file {path} is not a regular file")
            if st.st_size > MAX_STATE_FILE:
                raise SnapshotFormatError(
                    f"snapshot state file {path} has {st.st_size} bytes (at most {MAX_STATE_FILE})")
            # Refuse a foreign file from its first bytes before reading the rest.
            prefix = os.pread(fd, PREFIX_SIZE, 0)
            check_state_prefix(prefix)
            data = bytearray()
            while len(data) < st.st_size:
                chunk = os.pread(fd, st.st_size - len(data), len(data))
                if not chunk:
                    break
                data += chunk
            return bytes(data)
        except OSError as e:
            raise MigrationError(f"cannot read snapshot state file {path}: {e.strerror}") from None
        finally:
            os.close(fd)

    def memory_file(self, directory: str) -> tuple[str, int]:
        path = os.path.join(directory, MEMORY_FILE)
        try:
            st = os.stat(path)
        except OSError as e:
            raise MigrationError(f"cannot use snapshot memory file {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotFormatError(f"snapshot memory file {path} is not a regular file")
        return path, st.st_size
