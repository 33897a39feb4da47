"""vCPU threads: run -> dispatch the exit -> run again; park on pause.

Pause protocol (the design's "immediate_exit + kick"): pause() sets a flag and kicks the vCPU,
whose run() then returns Interrupted at once even if the kick raced ahead of KVM_RUN; the thread
sees the flag and parks until resume(). Only when every vCPU is parked is the VM paused.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

from domain import vcpu_exit as ve
from domain.ports import HvVcpu

log = logging.getLogger("pystrato.vcpu")


class IoBus(Protocol):
    def read(self, addr: int, data: memoryview) -> bool: ...

    def write(self, addr: int, data: memoryview) -> bool: ...


class VcpuRunner:
    """Owns one vCPU's thread. Callbacks run in the vCPU thread."""

    def __init__(self, vcpu: HvVcpu, pio: IoBus, mmio: IoBus, *,
                 on_reset: Callable[[], None], on_poweroff: Callable[[], None],
                 on_error: Callable[[str], None]):
        self.vcpu = vcpu
        self.index = vcpu.index
        self._pio = pio
        self._mmio = mmio
        self._on_reset = on_reset
        self._on_poweroff = on_poweroff
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pause_requested = True  # created parked; start() + resume() let it run
        self._parked = False
        self._exit_requested = False
        self.halted = False
        self._thread = threading.Thread(target=self._loop, name=f"vcpu{self.index}", daemon=True)
        self.native_id: int | None = None

    # --- control (any thread) ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def pause(self, timeout: float = 5.0) -> bool:
        self.request_pause()
        return self.wait_parked(timeout)

    def request_pause(self) -> None:
        """The first half of pause(): ask and kick, without waiting for the thread to park."""
        with self._cond:
            self._pause_requested = True
            self._cond.notify_all()  # wakes a vCPU halted in _loop
        self.vcpu.kick()

    def wait_parked(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._parked or not self._thread.is_alive(), timeout)

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._exit_requested = True
            self._cond.notify_all()
        self.vcpu.kick()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def parked(self) -> bool:
        return self._parked

    # --- the vCPU thread -----------------------------------------------------------------------

    def _park_if_requested(self) -> bool:
        """Returns False when the thread must exit. The loop reads the flags lock-free before
        calling this: they are set before the kick, and the kick makes the next run() return
        Interrupted, so a flag read stale there is seen on the next exit."""
        with self._cond:
            if not (self._pause_requested or self._exit_requested):
                return True
            self._parked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause_requested or self._exit_requested)
            self._parked = False
            return not self._exit_requested

    def _loop(self) -> None:
        self.native_id = threading.get_native_id()
        vcpu, pio, mmio = self.vcpu, self._pio, self._mmio
        IoOut, IoIn, MmioW, MmioR, Interrupted = ve.IoOut, ve.IoIn, ve.MmioWrite, ve.MmioRead, ve.Interrupted
        try:
            while True:
                # Checked inline (no call) on every exit; _park_if_requested re-checks under the lock.
                if (self._pause_requested or self._exit_requested) and not self._park_if_requested():
                    break
                exit_ = vcpu.run()
                t = type(exit_)
                if t is IoOut:
                    pio.write(exit_.port, exit_.data)
                elif t is IoIn:
                    if not pio.read(exit_.port, exit_.data):
                        exit_.data[:] = b"\xff" * len(exit_.data)
                elif t is MmioW:
                    mmio.write(exit_.addr, exit_.data)
                elif t is MmioR:
                    if not mmio.read(exit_.addr, exit_.data):
                        exit_.data[:] = b"\xff" * len(exit_.data)
                elif t is Interrupted:
                    vcpu.clear_kick()
                elif t is ve.Hlt:
                    # Only without an in-kernel irqchip: nothing can wake the CPU but us.
                    self.halted = True
                    with self._cond:
                        self._cond.wait_for(lambda: self._pause_requested or self._exit_requested)
                    self.halted = False
                elif t is ve.Shutdown:
                    log.info("vcpu%d: triple fault, guest reset", self.index)
                    self._on_reset()
                    break
                elif t is ve.SystemEvent:
                    if exit_.type == ve.SystemEvent.RESET:
                        self._on_reset()
                    else:
                        self._on_poweroff()
                    break
                else:
                    reason = f"vcpu{self.index}: unhandled exit {t.__name__} {getattr(exit_, '__slots__', ())}"
                    detail = getattr(exit_, "suberror", getattr(exit_, "reason", None))
                    log.error("%s (%s)", reason, detail)
                    self._on_error(f"{reason} ({detail})")
                    break
        except Exception as e:  # a device bug must not leave a zombie vCPU silently
            log.exception("vcpu%d crashed", self.index)
            self._on_error(f"vcpu{self.index}: {e}")
        finally:
            with self._cond:
                self._parked = True
                self._cond.notify_all()
