"""Why a vCPU's run() returned. Mirrors kvm-ioctls' VcpuExit: the caller dispatches on the type.

``data`` of I/O and MMIO exits is a writable memoryview into the hypervisor's run area
(kvm_run for KVM): a read handler fills it in place before the next run().
"""

from __future__ import annotations


class VcpuExit:
    __slots__ = ()


class IoIn(VcpuExit):
    __slots__ = ("port", "data")

    def __init__(self, port: int, data: memoryview):
        self.port = port
        self.data = data


class IoOut(VcpuExit):
    __slots__ = ("port", "data")

    def __init__(self, port: int, data: memoryview):
        self.port = port
        self.data = data


class MmioRead(VcpuExit):
    __slots__ = ("addr", "data")

    def __init__(self, addr: int, data: memoryview):
        self.addr = addr
        self.data = data


class MmioWrite(VcpuExit):
    __slots__ = ("addr", "data")

    def __init__(self, addr: int, data: memoryview):
        self.addr = addr
        self.data = data


class Hlt(VcpuExit):
    __slots__ = ()


class Shutdown(VcpuExit):
    """Triple fault: the guest reset itself."""

    __slots__ = ()


class SystemEvent(VcpuExit):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    __slots__ = ("type",)

    def __init__(self, type: int):
        self.type = type


class FailEntry(VcpuExit):
    __slots__ = ("reason",)

    def __init__(self, reason: int):
        self.reason = reason


class InternalError(VcpuExit):
    __slots__ = ("suberror",)

    def __init__(self, suberror: int):
        self.suberror = suberror


class Interrupted(VcpuExit):
    """run() returned because kick() asked it to (immediate_exit / EINTR)."""

    __slots__ = ()


HLT = Hlt()
SHUTDOWN = Shutdown()
INTERRUPTED = Interrupted()
