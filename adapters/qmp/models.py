"""Shapes of what the QMP server writes: greeting, replies, events."""

from __future__ import annotations

from typing import Any

from domain.version import VERSION

# StratoVirt presents itself as QEMU 5.0.1 so that libvirt accepts it; so do we.
QEMU_VERSION = {"micro": 1, "minor": 0, "major": 5}

# Marks "the request carried no id" (None is a valid id: JSON null).
NO_ID: Any = object()


def package_version() -> str:
    # A constant, not importlib.metadata: that import alone costs tens of ms at start-up.
    return VERSION


def version_info() -> dict[str, Any]:
    return {"qemu": dict(QEMU_VERSION), "package": f"pystrato-{package_version()}"}


def greeting() -> dict[str, Any]:
    return {"QMP": {"version": version_info(), "capabilities": []}}


def return_reply(value: Any, id: Any = NO_ID) -> dict[str, Any]:
    reply: dict[str, Any] = {"return": value}
    if id is not NO_ID:
        reply["id"] = id
    return reply


def error_reply(qmp_class: str, desc: str, id: Any = NO_ID) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": qmp_class, "desc": desc}}
    if id is not NO_ID:
        reply["id"] = id
    return reply


def event_message(name: str, data: dict[str, Any], time_ns: int) -> dict[str, Any]:
    seconds, ns = divmod(time_ns, 1_000_000_000)
    return {"event": name, "data": data, "timestamp": {"seconds": seconds, "microseconds": ns // 1000}}

