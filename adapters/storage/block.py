"""Raw disk images: preadv/pwritev straight into guest memory views."""

from __future__ import annotations

import errno
import os
from typing import Sequence

from domain.errors import HostResourceError


class RawImage:
    """A raw image file opened read-only or read-write, optionally with O_DIRECT."""

    def __init__(self, path: str, fd: int, readonly: bool, direct: bool):
        self.path = path
        self._fd = fd
        self.readonly = readonly
        self.direct = direct
        self.size = os.fstat(fd).st_size

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        return os.preadv(self._fd, bufs, offset)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only image")
        return os.pwritev(self._fd, bufs, offset)

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
        import stat

        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise HostResourceError(f"cannot use '{path}': Is a directory")
        if stat.S_ISBLK(st.st_mode):
            # Block devices report size 0 through fstat: ask the device.
            size = os.lseek(fd, 0, os.SEEK_END)
            img = RawImage(path, fd, readonly, direct)
            img.size = size
            return img
        return RawImage(path, fd, readonly, direct)
