"""Validation of device state restored from a snapshot or a migration stream (untrusted input)."""

from __future__ import annotations

from domain.errors import SnapshotFormatError


def check_state(state, schema: dict[str, type]) -> None:
    """Raise SnapshotFormatError unless ``state`` is a dict with these keys of these types."""
    if not isinstance(state, dict):
        raise SnapshotFormatError("device state is not a mapping")
    for key, typ in schema.items():
        value = state.get(key)
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            raise SnapshotFormatError(f"device state field '{key}' is missing or not {typ.__name__}")


def check_range(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise SnapshotFormatError(f"device state field '{name}' = {value} is out of range")
    return value
