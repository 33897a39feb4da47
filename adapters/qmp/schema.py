"""Argument schemas of QMP commands: presence and JSON type of each member.

Checked the way QEMU's input visitor checks them, with its wording: members in schema order
(missing, then wrong type), then anything left over is unexpected. Nested members are named
with their path (``file.filename``, ``enable[0]``). ``null`` is not a value of any type, and a
boolean is not an integer. Ranges and meaning are the application's business.
"""

from __future__ import annotations

from typing import Any, Callable

from domain.errors import InvalidArgumentError
from domain.record import record

# An "int" must fit what QEMU's JSON parser reads as an integer (int64 or uint64); a larger
# number is a float to QEMU, so it is a type error there too.
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


def _is_int(v: Any) -> bool:
    return type(v) is int and _INT_MIN <= v <= _INT_MAX


# schema type -> (name in QEMU's error text, check)
TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("string", lambda v: type(v) is str),
    "int": ("integer", _is_int),
    "bool": ("boolean", lambda v: type(v) is bool),
    "number": ("number", lambda v: type(v) in (int, float)),
    "object": ("object", lambda v: type(v) is dict),
    "array": ("array", lambda v: type(v) is list),
    "any": ("value", lambda v: True),
}


@record(frozen=True)
class Arg:
    name: str
    type: str
    required: bool = False
    members: Schema | None = None  # for "object": its own schema (None: any object)
    items: str | None = None  # for "array": the element type (None: any)

    def __post_init__(self) -> None:
        if self.type not in TYPES or (self.items is not None and self.items not in TYPES):
            raise ValueError(f"unknown schema type for {self.name!r}")
        if self.members is not None and self.type != "object":
            raise ValueError(f"members given for non-object {self.name!r}")


def req(name: str, type: str, **kw: Any) -> Arg:
    return Arg(name, type, True, **kw)


def opt(name: str, type: str, **kw: Any) -> Arg:
    return Arg(name, type, False, **kw)


def _type_error(path: str, type: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"Invalid parameter type for '{path}', expected: {TYPES[type][0]}")


class Schema:
    """The members of one command's ``arguments`` (or of a nested object)."""

    def __init__(self, *args: Arg, open: bool = False):
        self.args = tuple(args)
        self._known = frozenset(a.name for a in args)
        if len(self._known) != len(self.args):
            raise ValueError("duplicate argument in schema")
        # Members not listed are passed through unchecked (device_add: properties depend on
        # the driver, so the application checks them).
        self.open = open

    def __repr__(self) -> str:
        return f"Schema({', '.join(self.names())}{', open' if self.open else ''})"

    def names(self) -> list[str]:
        return [a.name for a in self.args]

    def validate(self, value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """Return the checked arguments (a new dict) or raise InvalidArgumentError."""
        out: dict[str, Any] = {}
        for arg in self.args:
            path = prefix + arg.name
            if arg.name not in value:
                if arg.required:
                    raise InvalidArgumentError(f"Parameter '{path}' is missing")
                continue
            out[arg.name] = _check(arg, value[arg.name], path)
        for key, item in value.items():
            if key not in self._known:
                if not self.open:
                    raise InvalidArgumentError(f"Parameter '{prefix}{key}' is unexpected")
                out[key] = item
        return out


def _check(arg: Arg, v: Any, path: str) -> Any:
    if not TYPES[arg.type][1](v):
        raise _type_error(path, arg.type)
    if arg.members is not None:
        return arg.members.validate(v, path + ".")
    if arg.type == "array" and arg.items is not None:
        ok = TYPES[arg.items][1]
        for i, item in enumerate(v):
            if not ok(item):
                raise _type_error(f"{path}[{i}]", arg.items)
    return v
