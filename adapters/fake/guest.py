"""The fake hypervisor's guest "drivers": what a cooperative Linux guest would answer.

A real guest acknowledges a PCIe hot-unplug request (attention button -> the driver releases the
device -> slot powered off) some milliseconds later, and its balloon driver inflates to the
target. The fake answers the same way so that management stacks see the same event flow.
"""

from __future__ import annotations

import threading
from typing import Callable


class FakeGuestAgent:
    def __init__(self, unplug_delay: float = 0.05):
        self.unplug_delay = unplug_delay
        self.unplug_requests: list[str] = []

    def request_unplug(self, device_id: str, done: Callable[[], None]) -> None:
        self.unplug_requests.append(device_id)
        t = threading.Timer(self.unplug_delay, done)
        t.daemon = True
        t.start()

    def balloon_target(self, target_bytes: int, set_actual: Callable[[int], None]) -> None:
        # The guest's balloon driver reaches the target (the fake has memory to give back).
        set_actual(target_bytes)
