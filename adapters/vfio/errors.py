"""VFIO failures: one line naming the device, the step that failed, the kernel's answer, and what
the user can do about it."""

from __future__ import annotations

import errno as _errno
import os

from domain.errors import HostResourceError


class VfioIoctlError(OSError):
    """A VFIO ioctl (or open/pread/mmap) refused by the kernel; wrapped into VfioError by callers
    that know which device and step it belongs to."""

    def __init__(self, op: str, err: int):
        super().__init__(err, os.strerror(err))
        self.op = op

    def __str__(self) -> str:
        return f"{self.op}: {errno_text(self.errno)}"


class VfioError(HostResourceError):
    def __init__(self, host: str, step: str, reason: str, hint: str = ""):
        self.host = host
        self.step = step
        self.reason = reason
        self.hint = hint
        text = f"VFIO {host}: {step}: {reason}"
        super().__init__(f"{text}; {hint}" if hint else text)


def errno_text(err: int | None) -> str:
    """'No such file or directory [ENOENT]': the words for the user, the name for a search."""
    if not err:
        return "unknown error"
    return f"{os.strerror(err)} [{_errno.errorcode.get(err, err)}]"
