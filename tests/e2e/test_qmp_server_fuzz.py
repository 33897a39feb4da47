"""Random input against the QMP server over a socket: every message gets one well-formed reply,
and no call reaches the API with arguments of the wrong type."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.qmp.commands import standard_table
from adapters.qmp.schema import Schema

from .test_qmp_server_kit import BlockingClient, ThreadedServer

MIN_MESSAGES = 2000
ERROR_CLASSES = {"GenericError", "CommandNotFound", "DeviceNotFound", "DeviceNotActive", "KVMMissingCap"}
TABLE = standard_table()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=10,
)

_SAMPLE = {"str": st.text(max_size=12), "int": st.integers(-(1 << 65), 1 << 65), "bool": st.booleans(),
           "number": st.floats(allow_nan=False, allow_infinity=False), "array": st.lists(st.text(max_size=5), max_size=3),
           "object": st.dictionaries(st.text(max_size=5), json_values, max_size=3), "any": json_values}

# Values of another type that a lax check would let through.
_CONFUSABLE = {
    "int": st.booleans() | st.sampled_from([1.0, -0.0, 1 << 64, -(1 << 63) - 1]),
    "bool": st.sampled_from([0, 1, "true", "false"]),
    "str": st.integers() | st.booleans(),
    "number": st.booleans() | st.sampled_from(["1.5"]),
    "object": st.lists(st.integers(), max_size=2) | st.sampled_from(["{}"]),
    "array": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2) | st.sampled_from(["[]"]),
}


def valid_value(arg):
    if arg.members is not None:
        return valid_args(arg.members)
    if arg.type == "int":
        return st.integers(-(1 << 63), (1 << 64) - 1)
    if arg.type == "array" and arg.items is not None:
        return st.lists(_SAMPLE[arg.items], max_size=3)
    return _SAMPLE[arg.type]


@st.composite
def valid_args(draw, schema: Schema) -> dict:
    out = {arg.name: draw(valid_value(arg)) for arg in schema.args if arg.required or draw(st.booleans())}
    if schema.open:
        out.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return out


@st.composite
def mutated_args(draw, schema: Schema) -> dict:
    """Valid arguments with one thing wrong: a member missing, of another type, a stray, or one
    of these inside a nested object."""
    out = draw(valid_args(schema))
    how = draw(st.sampled_from(["drop", "retype", "retype", "retype", "stray", "nested"]))
    if how == "drop" and out:
        del out[draw(st.sampled_from(sorted(out)))]
    elif how == "retype" and schema.args:
        arg = draw(st.sampled_from(schema.args))
        pick = draw(st.integers(0, 3))
        if pick < 2:
            out[arg.name] = draw(_CONFUSABLE[arg.type])
        elif pick == 2:
            other = draw(st.sampled_from([t for t in _SAMPLE if t not in (arg.type, "any")]))
            out[arg.name] = draw(_SAMPLE[other])
        else:
            out[arg.name] = None
    elif how == "nested" and any(a.members for a in schema.args):
        arg = draw(st.sampled_from([a for a in schema.args if a.members]))
        out[arg.name] = draw(mutated_args(arg.members))
    else:
        out[draw(st.text(max_size=8))] = draw(json_values)
    return out


@st.composite
def commands(draw) -> dict:
    name = draw(st.sampled_from(TABLE.names()) | st.text(max_size=15))
    command = TABLE.get(name)
    shape = draw(st.integers(0, 9))
    msg: dict = {"execute": draw(json_values) if shape == 0 else name}
    if shape == 1:
        msg["arguments"] = draw(json_values)
    elif command is not None and (command.schema.args or draw(st.booleans())):
        msg["arguments"] = draw(valid_args(command.schema) if shape < 5 else mutated_args(command.schema))
    if draw(st.booleans()):
        msg["id"] = draw(json_values)
    if draw(st.integers(0, 19)) == 0:
        msg[draw(st.sampled_from(["exec", "exec-oob", "control", "x"]))] = draw(json_values)
    if draw(st.integers(0, 19)) == 0:
        del msg["execute"]
    return msg


messages = st.one_of(commands(), commands(), commands(), json_values)
separators = st.sampled_from([b"\n", b"\r\n", b" ", b"\t"])


def check_shape(reply) -> None:
    assert type(reply) is dict
    body = {k: v for k, v in reply.items() if k != "id"}
    assert len(body) == 1, reply
    if "error" in body:
        err = body["error"]
        assert set(err) == {"class", "desc"} and err["class"] in ERROR_CLASSES
        assert type(err["desc"]) is str and err["desc"]
    else:
        assert "return" in body, reply


def check_reply(line: bytes, msg) -> None:
    reply = json.loads(line)
    check_shape(reply)
    if isinstance(msg, dict) and "id" in msg:
        assert "id" in reply and reply["id"] == msg["id"]
    else:
        assert "id" not in reply


def check_event(event: dict) -> None:
    assert set(event) == {"event", "data", "timestamp"}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadedServer(tmp_path_factory.mktemp("fuzz") / "qmp.sock") as s:
        yield s


def test_random_messages_each_get_one_well_formed_reply(server):
    client = BlockingClient(server.server.path)
    sent = 0

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(st.tuples(messages, separators), min_size=20, max_size=30))
    def one_batch(batch):
        nonlocal sent
        for msg, sep in batch:
            client.send(json.dumps(msg).encode() + sep)
            while True:
                line = client.readline()
                obj = json.loads(line)
                if isinstance(obj, dict) and "event" in obj and "return" not in obj and "error" not in obj:
                    check_event(obj)  # a stop/cont/quit/device_del's event
                    continue
                check_reply(line, msg)
                break
            sent += 1

    try:
        one_batch()
    finally:
        client.close()
    assert sent >= MIN_MESSAGES
    assert server.api.calls, "no message ever reached the API"
    assert server.api.violations == []


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_random_bytes_get_only_well_formed_lines_and_the_server_survives(server, data):
    client = BlockingClient(server.server.path)
    try:
        client.send(data)
        client.sock.shutdown(socket.SHUT_WR)
        for line in client.lines_until_eof():
            obj = json.loads(line)
            if "event" in obj:
                check_event(obj)
            else:
                check_shape(obj)
    finally:
        client.close()
    assert server.api.violations == []
