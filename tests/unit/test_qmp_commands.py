"""QMP command table and dispatcher: argument mapping to the VmApi, envelope checks, errors."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest

from adapters.qmp.commands import CommandTable, standard_table
from adapters.qmp.dispatch import Dispatcher
from adapters.qmp.schema import Schema, req
from application.api import AfterReply
from domain import errors


class RecordingApi:
    """Every VmApi method records (name, kwargs) and returns a marker, or raises ``fail``."""

    METHODS = ("query_status", "query_cpus", "query_hotpluggable_cpus", "query_balloon", "query_migrate",
               "stop", "cont", "quit", "blockdev_add", "blockdev_del", "netdev_add", "netdev_del",
               "device_add", "device_del", "balloon", "migrate", "migrate_cancel")

    def __init__(self, fail: BaseException | None = None, result=None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail = fail
        self.result = result
        for name in self.METHODS:
            setattr(self, name, self._method(name))

    def _method(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if self.fail is not None:
                raise self.fail
            return {"called": name} if self.result is None else self.result
        return call


def run(name: str, arguments: dict | None = None, api=None):
    api = api or RecordingApi()
    result = standard_table().run(api, name, arguments or {})
    return result, api.calls


@pytest.mark.parametrize("name, method", [
    ("query-status", "query_status"), ("query-cpus", "query_cpus"),
    ("query-hotpluggable-cpus", "query_hotpluggable_cpus"), ("query-balloon", "query_balloon"),
    ("query-migrate", "query_migrate"), ("stop", "stop"), ("cont", "cont"), ("quit", "quit"),
    ("migrate_cancel", "migrate_cancel"),
])
def test_commands_without_arguments(name, method):
    result, calls = run(name)
    assert result == {"called": method}
    assert calls == [(method, (), {})]


def test_blockdev_add_maps_member_names():
    args = {"node-name": "drive-0", "file": {"driver": "file", "filename": "/img", "aio": "native"},
            "cache": {"direct": True}, "read-only": False}
    _, calls = run("blockdev-add", args)
    assert calls == [("blockdev_add", (), {"node_name": "drive-0", "file": args["file"], "read_only": False,
                                           "cache": {"direct": True}, "driver": None})]


def test_blockdev_add_accepts_stratovirts_other_members():
    args = {"node-name": "d", "file": {"driver": "file", "filename": "/i"}, "driver": "raw", "media": "disk",
            "detect-zeroes": "off", "discard": "ignore", "throttling.iops-total": 100, "l2-cache-size": "1M"}
    _, calls = run("blockdev-add", args)
    assert calls[0][2]["driver"] == "raw"


def test_netdev_add_maps_members():
    _, calls = run("netdev_add", {"id": "net-0", "ifname": "tap0", "queues": 2, "vhost": True, "script": "no"})
    assert calls == [("netdev_add", (), {"id": "net-0", "ifname": "tap0", "type": None, "fd": None,
                                         "vhost": True, "queues": 2})]


def test_device_add_passes_all_properties_to_the_application():
    args = {"id": "drive-0", "driver": "virtio-blk-pci", "drive": "drive-0", "addr": "0x0", "bus": "pcie.1"}
    _, calls = run("device_add", args)
    assert calls == [("device_add", (args,), {})]


@pytest.mark.parametrize("name, args, call", [
    ("blockdev-del", {"node-name": "d"}, ("blockdev_del", (), {"node_name": "d"})),
    ("netdev_del", {"id": "n"}, ("netdev_del", (), {"id": "n"})),
    ("device_del", {"id": "d"}, ("device_del", (), {"id": "d"})),
    ("balloon", {"value": 2147483648}, ("balloon", (), {"value": 2147483648})),
])
def test_single_argument_commands(name, args, call):
    assert run(name, args)[1] == [call]


def test_migrate_passes_flags_as_extra():
    _, calls = run("migrate", {"uri": "tcp:1.2.3.4:5", "detach": True, "blk": False})
    assert calls == [("migrate", (), {"uri": "tcp:1.2.3.4:5", "extra": {"detach": True, "blk": False}})]


def test_invalid_arguments_never_reach_the_api():
    api = RecordingApi()
    table = standard_table()
    for name, args in [("balloon", {"value": True}), ("migrate", {"uri": "x", "speed": 1}),
                       ("device_add", {"id": "x"}), ("blockdev-add", {"node-name": "d", "file": {}})]:
        with pytest.raises(errors.InvalidArgumentError):
            table.run(api, name, args)
    assert api.calls == []


def test_qmp_capabilities_answers_empty_every_time_and_offers_nothing():
    assert run("qmp_capabilities")[0] == {}
    assert run("qmp_capabilities", {"enable": []})[0] == {}
    assert run("qmp_capabilities")[0] == {}
    with pytest.raises(errors.InvalidArgumentError, match="Capability 'oob' not available"):
        run("qmp_capabilities", {"enable": ["oob"]})


def test_query_version():
    try:
        version = importlib.metadata.version("pystrato")
    except importlib.metadata.PackageNotFoundError:
        version = "0.1.0"
    assert run("query-version")[0] == {"qemu": {"micro": 1, "minor": 0, "major": 5},
                                       "package": f"pystrato-{version}"}


def test_query_commands_lists_the_table_including_later_registrations():
    table = standard_table()
    table.register("x-test", Schema(), lambda api, a: {})
    names = [c["name"] for c in table.run(RecordingApi(), "query-commands", {})]
    assert names == table.names()
    assert {"qmp_capabilities", "query-status", "device_add", "migrate", "query-version", "x-test"} <= set(names)


def test_register_rejects_duplicates_and_unknown_names_are_not_found():
    table = CommandTable()
    table.register("a", Schema(), lambda api, a: 1)
    with pytest.raises(ValueError):
        table.register("a", Schema(), lambda api, a: 2)
    assert "a" in table and len(table) == 1 and [c.name for c in table] == ["a"]
    with pytest.raises(errors.CommandNotFoundError, match="The command b has not been found"):
        table.run(None, "b", {})


# --- dispatcher ----------------------------------------------------------------------------------


def dispatch(request, api=None, table=None):
    return Dispatcher(table or standard_table(), api or RecordingApi()).handle(request)


def test_success_echoes_any_id():
    for id in ["abc-1", 0, None, [1, {"a": None}], {"x": 1.5}, False]:
        assert dispatch({"execute": "stop", "id": id}).reply == {"return": {"called": "stop"}, "id": id}


def test_no_id_no_echo():
    assert dispatch({"execute": "stop"}).reply == {"return": {"called": "stop"}}


@pytest.mark.parametrize("request_, cls, desc", [
    ({"execute": "nope"}, "CommandNotFound", "The command nope has not been found"),
    ({"exec": "stop"}, "GenericError", "QMP input member 'exec' is unexpected"),
    ({"execute": 42}, "GenericError", "QMP input member 'execute' must be a string"),
    ({"execute": "stop", "arguments": []}, "GenericError", "QMP input member 'arguments' must be an object"),
    ({"arguments": {}}, "GenericError", "QMP input lacks member 'execute'"),
    ({"execute": "migrate"}, "GenericError", "Parameter 'uri' is missing"),
    ({"execute": "query-status", "arguments": {"bogus": 1}}, "GenericError", "Parameter 'bogus' is unexpected"),
    ({"execute": "balloon", "arguments": {"value": "1"}}, "GenericError",
     "Invalid parameter type for 'value', expected: integer"),
])
def test_errors_echo_the_id(request_, cls, desc):
    assert dispatch({**request_, "id": "i-7"}).reply == {"error": {"class": cls, "desc": desc}, "id": "i-7"}
    assert dispatch(request_).reply == {"error": {"class": cls, "desc": desc}}


@pytest.mark.parametrize("request_", [[1, 2], "query-status", 42, None, True])
def test_non_object_input(request_):
    assert dispatch(request_).reply == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}


@pytest.mark.parametrize("exc, cls", [
    (errors.DeviceNotFoundError("Device 'x' not found"), "DeviceNotFound"),
    (errors.DeviceNotActiveError("not active"), "DeviceNotActive"),
    (errors.MissingCapabilityError("no cap"), "KVMMissingCap"),
    (errors.InvalidStateError("bad state"), "GenericError"),
    (errors.CommandNotFoundError("gone"), "CommandNotFound"),
])
def test_domain_errors_keep_their_class(exc, cls):
    outcome = dispatch({"execute": "device_del", "arguments": {"id": "x"}, "id": 3}, RecordingApi(fail=exc))
    assert outcome.reply == {"error": {"class": cls, "desc": str(exc)}, "id": 3}


def test_any_other_exception_is_a_logged_generic_error(caplog):
    with caplog.at_level(logging.ERROR):
        outcome = dispatch({"execute": "stop", "id": 1}, RecordingApi(fail=RuntimeError("boom")))
    assert outcome.reply == {"error": {"class": "GenericError", "desc": "boom"}, "id": 1}
    assert any(r.exc_info for r in caplog.records)
    outcome = dispatch({"execute": "stop"}, RecordingApi(fail=KeyError()))
    assert outcome.reply == {"error": {"class": "GenericError", "desc": "KeyError"}}


def test_after_reply_is_split_into_reply_and_follow_up():
    then = lambda: None  # noqa: E731
    outcome = dispatch({"execute": "quit", "id": "q"}, RecordingApi(result=AfterReply({"x": 1}, then)))
    assert outcome.reply == {"return": {"x": 1}, "id": "q"}
    assert outcome.then is then


def test_none_result_is_an_empty_return():
    table = CommandTable()
    table.register("x-none", Schema(req("a", "int")), lambda api, a: None)
    assert dispatch({"execute": "x-none", "arguments": {"a": 1}}, table=table).reply == {"return": {}}
