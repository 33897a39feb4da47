"""Domain events. Each knows its QMP event name and data; the QMP adapter adds the timestamp."""

from __future__ import annotations

from typing import Any

from domain.record import record


@record(frozen=True)
class DomainEvent:
    name = ""

    def data(self) -> dict[str, Any]:
        return {}


@record(frozen=True)
class Stopped(DomainEvent):
    name = "STOP"


@record(frozen=True)
class Resumed(DomainEvent):
    name = "RESUME"


@record(frozen=True)
class ShutdownEvent(DomainEvent):
    guest: bool = False
    reason: str = "host-qmp-quit"
    name = "SHUTDOWN"

    def data(self) -> dict[str, Any]:
        return {"guest": self.guest, "reason": self.reason}


@record(frozen=True)
class DeviceDeleted(DomainEvent):
    device: str = ""
    path: str = ""
    name = "DEVICE_DELETED"

    def data(self) -> dict[str, Any]:
        return {"device": self.device, "path": self.path or self.device}


@record(frozen=True)
class BalloonChanged(DomainEvent):
    actual: int = 0
    name = "BALLOON_CHANGED"

    def data(self) -> dict[str, Any]:
        return {"actual": self.actual}


@record(frozen=True)
class MigrationStatusChanged(DomainEvent):
    status: str = "none"
    name = "MIGRATION"

    def data(self) -> dict[str, Any]:
        return {"status": self.status}
