"""QMP argument schemas: presence, JSON types and QEMU's wording."""

from __future__ import annotations

import pytest

from adapters.qmp.commands import BLOCKDEV_ADD, DEVICE_ADD, MIGRATE, NETDEV_ADD
from adapters.qmp.schema import Arg, Schema, opt, req
from domain.errors import InvalidArgumentError


def error_of(schema: Schema, args: dict) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        schema.validate(args)
    assert info.value.qmp_class == "GenericError"
    return str(info.value)


def test_missing_required():
    assert error_of(MIGRATE, {}) == "Parameter 'uri' is missing"


def test_unexpected_member():
    assert error_of(Schema(), {"bogus": 1}) == "Parameter 'bogus' is unexpected"
    assert error_of(MIGRATE, {"uri": "x", "speed": 1}) == "Parameter 'speed' is unexpected"


@pytest.mark.parametrize("type_, good, bad, expected", [
    ("int", 5, True, "integer"),
    ("int", -(1 << 63), 1 << 64, "integer"),
    ("int", (1 << 64) - 1, 1.0, "integer"),
    ("bool", False, 0, "boolean"),
    ("str", "", None, "string"),
    ("number", 1.5, False, "number"),
    ("object", {}, [], "object"),
    ("array", [], {}, "array"),
])
def test_types(type_, good, bad, expected):
    schema = Schema(opt("value", type_))
    assert schema.validate({"value": good}) == {"value": good}
    assert error_of(schema, {"value": bad}) == f"Invalid parameter type for 'value', expected: {expected}"


def test_optional_members_may_be_absent_and_null_is_not_absent():
    schema = Schema(opt("x", "str"))
    assert schema.validate({}) == {}
    assert error_of(schema, {"x": None}) == "Invalid parameter type for 'x', expected: string"


def test_nested_members_are_named_by_path():
    base = {"node-name": "d0", "file": {"driver": "file", "filename": "/img"}}
    assert BLOCKDEV_ADD.validate(base) == base
    assert error_of(BLOCKDEV_ADD, {"node-name": "d0", "file": {"driver": "file"}}) == \
        "Parameter 'file.filename' is missing"
    assert error_of(BLOCKDEV_ADD, {**base, "file": {**base["file"], "x": 1}}) == "Parameter 'file.x' is unexpected"
    assert error_of(BLOCKDEV_ADD, {**base, "cache": {"direct": "yes"}}) == \
        "Invalid parameter type for 'cache.direct', expected: boolean"
    assert error_of(BLOCKDEV_ADD, {**base, "file": "img"}) == "Invalid parameter type for 'file', expected: object"


def test_array_items_are_checked():
    schema = Schema(opt("enable", "array", items="str"))
    assert schema.validate({"enable": ["oob"]}) == {"enable": ["oob"]}
    assert error_of(schema, {"enable": ["oob", 3]}) == "Invalid parameter type for 'enable[1]', expected: string"


def test_members_are_checked_in_schema_order_before_leftovers():
    # QEMU's visitor: a missing member is reported before an unexpected one.
    assert error_of(MIGRATE, {"bogus": 1}) == "Parameter 'uri' is missing"
    assert error_of(NETDEV_ADD, {"id": 1, "ifname": 2}) == "Invalid parameter type for 'id', expected: string"


def test_open_schema_passes_unknown_members_through():
    args = {"driver": "virtio-blk-mmio", "id": "d0", "addr": "0x1", "bootindex": 1, "x": None}
    assert DEVICE_ADD.validate(args) == args
    assert error_of(DEVICE_ADD, {"driver": "virtio-blk-mmio"}) == "Parameter 'id' is missing"
    assert error_of(DEVICE_ADD, {"driver": 1, "id": "d0"}) == "Invalid parameter type for 'driver', expected: string"


def test_validate_returns_a_new_dict():
    args = {"uri": "file:/x"}
    out = MIGRATE.validate(args)
    assert out == args and out is not args


def test_schema_definition_errors():
    with pytest.raises(ValueError):
        Schema(req("a", "str"), opt("a", "int"))
    with pytest.raises(ValueError):
        Arg("a", "integer")
    with pytest.raises(ValueError):
        Arg("a", "str", members=Schema())
