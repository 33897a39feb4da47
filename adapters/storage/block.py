"""Raw disk images: preadv/pwritev straight into guest memory views."""

from __future__ import annotations

import errno
import os
import stat
from typing import Sequence

from domain.errors import HostResourceError


class RawImage:
    """A raw image file opened read-only or read-write, optionally with O_DIRECT."""

    def __init__(self, path: str, fd: int, readonly: bool, direct: bool, buffered_fd: int = -1):
        self.path = path
        self._fd = fd
        # With direct=on, guest buffers that are not sector-aligned (a 1-byte status, a small
        # GET_ID) make O_DIRECT fail with EINVAL: those go through a buffered descriptor.
        self._bfd = buffered_fd if buffered_fd >= 0 else fd
        self.readonly = readonly
        self.direct = direct
        self.size = os.fstat(fd).st_size

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
        if self._bfd >= 0 and self._bfd != self._fd:
            os.close(self._bfd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = self._bfd = -1


class RawImageOpener:
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
        img = RawImage(path, fd, readonly, direct, bfd)
        if stat.S_ISBLK(st.st_mode):
            img.size = os.lseek(fd, 0, os.SEEK_END)  # fstat reports 0 for block devices
        return img
