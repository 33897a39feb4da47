"""Errors of the KVM adapter: a refused ioctl carries its name and errno."""

from __future__ import annotations

import errno as _errno
import os

from domain.errors import HypervisorError


class KvmIoctlError(HypervisorError, OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed. ``errno`` is the kernel's answer."""

    def __init__(self, ioctl: str, err: int, detail: str = ""):
        OSError.__init__(self, err, os.strerror(err))
        self.ioctl = ioctl
        self.detail = detail

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.ioctl} failed: {self.strerror} [{name}]{extra}"


def check(rc: int, ioctl: str, detail: str = "") -> int:
    """Turn a helper's ``-errno`` answer into KvmIoctlError; pass results through."""
    if rc < 0:
        raise KvmIoctlError(ioctl, -rc, detail)
    return rc
