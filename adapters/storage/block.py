"""Raw disk images: preadv/pwritev straight into guest memory views, on the image's own I/O
threads when the device submits requests (QEMU's aio=threads: the syscalls release the GIL, so
the requests of a batch overlap in the host kernel)."""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
from typing import Any, Callable, Sequence

from domain.errors import HostResourceError

log = logging.getLogger("pystrato.block")

IO_THREADS = 2  # backend threads per image: with the caller, 3 requests of a batch in flight


class IoThreads:
    """A fixed set of threads running submitted ``fn(arg)`` calls, started on first use."""

    def __init__(self, count: int, name: str):
        self._count = count
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[Any], object], arg: Any) -> None:
        if not self._threads:
            self._start()
        if self._closed:
            fn(arg)  # the image is closing: nobody would run it later
            return
        self._jobs.put((fn, arg))

    def _start(self) -> None:
        with self._lock:
            if self._threads or self._closed:
                return
            for i in range(self._count):
                t = threading.Thread(target=self._run, name=f"{self._name}-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def _run(self) -> None:
        get = self._jobs.get
        while (job := get()) is not None:
            try:
                job[0](job[1])
            except Exception:  # a device bug must not kill the image's I/O
                log.exception("block I/O job failed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            if t is not threading.current_thread():
                t.join(5)


class RawImage:
    """A raw image file opened read-only or read-write, optionally with O_DIRECT."""

    def __init__(self, path: str, fd: int, readonly: bool, direct: bool, buffered_fd: int = -1,
                 native: bool = True):
        self.path = path
        self._fd = fd
        # With direct=on, guest buffers that are not sector-aligned (a 1-byte status, a small
        # GET_ID) make O_DIRECT fail with EINVAL: those go through a buffered descriptor.
        self._bfd = buffered_fd if buffered_fd >= 0 else fd
        self.readonly = readonly
        self.direct = direct
        self.size = os.fstat(fd).st_size
        self._threads = IoThreads(IO_THREADS, f"blk-{os.path.basename(path)}"[:15])
        self._native = native

    def native_queue(self, regions: Sequence[tuple[int, memoryview]]):
        """virtio-blk's request loop in C over this image (adapters/storage/native_queue.py), for
        guest RAM ``regions`` (gpa, view); None when it is off or not built."""
        from adapters.storage import native_queue

        if not self._native or self._fd < 0 or not native_queue.available():
            return None
        return native_queue.NativeBlockQueue(regions, self._fd, self._bfd, self.size, self.readonly)

    def submit(self, fn: Callable[[Any], object], arg: Any) -> None:
        """Run ``fn(arg)`` on one of this image's I/O threads (the caller does not wait)."""
        self._threads.submit(fn, arg)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self._bfd != self._fd:
            try:
                return os.preadv(self._fd, bufs, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        return os.preadv(self._bfd, bufs, offset)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only image")
        if self._bfd != self._fd:
            try:
                return os.pwritev(self._fd, bufs, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        return os.pwritev(self._bfd, bufs, offset)

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self._bfd)

    def close(self) -> None:
        self._threads.close()
        if self._bfd >= 0 and self._bfd != self._fd:
            os.close(self._bfd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = self._bfd = -1


class RawImageOpener:
    def __init__(self, native: bool = True):
        self._native = native  # False: every virtio-blk request goes through the Python model

    def open(self, path: str, *, readonly: bool, direct: bool) -> RawImage:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise HostResourceError(f"cannot open '{path}' with direct=on: the file system does not support O_DIRECT") from None
            raise HostResourceError(f"cannot open '{path}': {e.strerror}") from None
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise HostResourceError(f"cannot use '{path}': Is a directory")
        bfd = os.open(path, flags & ~os.O_DIRECT) if direct else -1
        img = RawImage(path, fd, readonly, direct, bfd, self._native)
        if stat.S_ISBLK(st.st_mode):
            img.size = os.lseek(fd, 0, os.SEEK_END)  # fstat reports 0 for block devices
        return img
