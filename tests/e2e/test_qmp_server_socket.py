"""The QMP server over a real unix socket, driven by raw clients, with a stand-in VmApi."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat

import pytest

from adapters.qmp.commands import standard_table
from adapters.qmp.models import package_version
from adapters.qmp.protocol import MAX_MESSAGE_BYTES
from adapters.qmp.server import QmpServer
from domain.errors import HostResourceError
from domain.events import Stopped
from .test_qmp_server_kit import TIMEOUT, FakeApi, RawClient, running_server, sock_path  # noqa: F401


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 3))


async def until(predicate) -> None:
    """Let the loop run until predicate() holds (bounded by the test's wait_for)."""
    while not predicate():
        await asyncio.sleep(0.001)


def test_greeting_is_exactly_stratovirts_shape(sock_path):
    async def main():
        async with running_server(sock_path):
            client, greeting = await RawClient.connect(sock_path)
            await client.close()
            return greeting

    expected = ('{"QMP":{"version":{"qemu":{"micro":1,"minor":0,"major":5},"package":"pystrato-%s"},'
                '"capabilities":[]}}\r\n' % package_version())
    assert run(main()) == expected.encode()


def test_socket_file_is_0600_and_removed_on_close(sock_path):
    async def main():
        async with running_server(sock_path):
            mode = os.stat(sock_path).st_mode
        return mode

    mode = run(main())
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not os.path.exists(sock_path)


def test_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(sock_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens

    async def main():
        async with running_server(sock_path):
            client, _ = await RawClient.connect(sock_path)
            assert (await client.execute("query-status"))["return"]["running"] is True
            with pytest.raises(HostResourceError, match="in use by another process"):
                await QmpServer(sock_path, standard_table(), FakeApi()).start()
            await client.close()
        sock_path.write_text("not a socket")
        with pytest.raises(HostResourceError, match="exists and is not a socket"):
            await QmpServer(sock_path, standard_table(), FakeApi()).start()
        assert sock_path.read_text() == "not a socket"

    run(main())


def test_commands_work_without_negotiation_and_qmp_capabilities_anytime(sock_path):
    async def main():
        async with running_server(sock_path):
            client, _ = await RawClient.connect(sock_path)
            r1 = await client.execute("query-status")
            r2 = await client.execute("qmp_capabilities")
            r3 = await client.execute("qmp_capabilities", {})
            r4 = await client.execute("query-status", id=1)
            await client.close()
            return r1, r2, r3, r4

    r1, r2, r3, r4 = run(main())
    assert r1 == {"return": {"running": True, "singlestep": False, "status": "running"}}
    assert r2 == r3 == {"return": {}}
    assert r4["id"] == 1


ID = {"k": ["any", 1, None, {"json": True}]}


@pytest.mark.parametrize("request_, error", [
    ({"execute": "no-such-command"}, {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}),
    ({"execute": "migrate"}, {"class": "GenericError", "desc": "Parameter 'uri' is missing"}),
    ({"execute": "query-status", "arguments": {"bogus": 1}}, {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}),
    ({"execute": "balloon", "arguments": {"value": True}},
     {"class": "GenericError", "desc": "Invalid parameter type for 'value', expected: integer"}),
    ({"exec": "query-status"}, {"class": "GenericError", "desc": "QMP input member 'exec' is unexpected"}),
    ({"execute": 42}, {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}),
    ({"execute": "stop", "arguments": "x"}, {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}),
    ({"execute": "device_del", "arguments": {"id": "missing"}}, {"class": "DeviceNotFound", "desc": "Device 'missing' not found"}),
    (None, {"class": "GenericError", "desc": "boom"}),
])
def test_every_error_echoes_the_id(sock_path, request_, error):
    async def main():
        async with running_server(sock_path) as server:
            client, _ = await RawClient.connect(sock_path)
            msg = request_
            if msg is None:
                server.api.fail["query_cpus"] = RuntimeError("boom")
                msg = {"execute": "query-cpus"}
            await client.send(json.dumps({**msg, "id": ID}).encode())
            reply = await client.line()
            after = await client.execute("query-balloon", id="next")  # still serving
            await client.close()
            return reply, after

    reply, after = run(main())
    assert reply == {"error": error, "id": ID}
    assert after == {"return": {"actual": 1 << 30}, "id": "next"}


def test_several_commands_in_one_send_answered_in_order(sock_path):
    async def main():
        async with running_server(sock_path) as server:
            client, _ = await RawClient.connect(sock_path)
            await client.send(b'{"execute":"query-balloon","id":1}{"execute":"query-migrate","id":2}\n'
                              b'{"execute":"query-status","id":3}\r\n')
            replies = [await client.line() for _ in range(3)]
            await client.close()
            return replies, [c[0] for c in server.api.calls]

    replies, calls = run(main())
    assert [r["id"] for r in replies] == [1, 2, 3]
    assert calls == ["query_balloon", "query_migrate", "query_status"]


def test_one_command_split_byte_by_byte(sock_path):
    msg = b'{"execute": "blockdev-add", "arguments": {"node-name": "d}0", "file": {"driver": "file", ' \
          b'"filename": "/p/\\"x{"}}, "id": "s"}'

    async def main():
        async with running_server(sock_path) as server:
            client, _ = await RawClient.connect(sock_path)
            for i in range(len(msg)):
                await client.send(msg[i:i + 1])
                await asyncio.sleep(0)
            reply = await client.line()
            await client.close()
            return reply, server.api.calls

    reply, calls = run(main())
    assert reply == {"return": {}, "id": "s"}
    assert calls == [("blockdev_add", {"node_name": "d}0", "file": {"driver": "file", "filename": '/p/"x{'},
                                       "read_only": None, "cache": None, "driver": None})]


def test_malformed_and_non_object_input_as_qemu_answers(sock_path):
    async def main():
        async with running_server(sock_path):
            client, _ = await RawClient.connect(sock_path)
            await client.send(b'{"execute": "query-status"}}\nthis is not json\n[1, 2]\n{"execute": bad}\n"s" 7\n')
            replies = [await client.line() for _ in range(9)]
            await client.close()
            return replies

    replies = run(main())
    generic = lambda desc: {"error": {"class": "GenericError", "desc": desc}}  # noqa: E731
    assert replies[0]["return"]["status"] == "running"
    assert replies[1] == generic("JSON parse error, expecting value")
    assert replies[2:6] == [generic(f"JSON parse error, invalid keyword '{w}'") for w in ("this", "is", "not", "json")]
    assert replies[6] == generic("QMP input must be a JSON object")
    assert replies[7]["error"]["desc"].startswith("JSON parse error, ")
    assert replies[8] == generic("QMP input must be a JSON object")


def test_oversized_line_then_a_valid_command_is_still_answered(sock_path):
    big = b'{"execute":"device_add","arguments":{"driver":"x","id":"y","pad":"' + b"{[" * MAX_MESSAGE_BYTES + b'"}}'

    async def main():
        async with running_server(sock_path) as server:
            client, _ = await RawClient.connect(sock_path)
            await client.send(big + b'\n{"execute":"query-status","id":"after"}\n')
            r1 = await client.line()
            r2 = await client.line()
            await client.close()
            return r1, r2, server.api.calls

    r1, r2, calls = run(main())
    assert r1 == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
    assert r2["id"] == "after" and "return" in r2
    assert [c[0] for c in calls] == ["query_status"]


def test_disconnect_mid_message_and_mid_command_is_cleaned_up(sock_path):
    async def main():
        async with running_server(sock_path) as server:
            a, _ = await RawClient.connect(sock_path)
            await a.send(b'{"execute": "stop", "argu')
            await a.close()
            b, _ = await RawClient.connect(sock_path)
            await b.send(b'{"execute": "stop"}')  # hang up without reading the event or the reply
            await b.close()
            await until(lambda: server.clients == 0)
            c, _ = await RawClient.connect(sock_path)
            reply = await c.execute("query-status")
            await c.close()
            return reply, [name for name, _ in server.api.calls]

    reply, calls = run(main())
    assert reply["return"]["status"] in ("running", "paused")
    assert calls[-1] == "query_status" and calls.count("stop") <= 1


def test_half_closed_client_gets_the_answers_to_its_last_bytes(sock_path):
    async def main():
        async with running_server(sock_path):
            client, _ = await RawClient.connect(sock_path)
            await client.send(b'{"execute":"query-status"} oops')
            client.writer.write_eof()
            lines = await asyncio.wait_for(client.reader.read(), TIMEOUT)
            await client.close()
            return lines

    lines = run(main()).split(b"\r\n")
    assert json.loads(lines[0])["return"]["running"] is True
    assert json.loads(lines[1]) == {"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'oops'"}}
    assert lines[2:] == [b""]


def test_events_precede_the_reply_of_the_command_that_caused_them_and_reach_every_client(sock_path):
    async def main():
        async with running_server(sock_path):
            a, _ = await RawClient.connect(sock_path)
            b, _ = await RawClient.connect(sock_path)
            await a.send(b'{"execute":"stop","id":1}')
            a_lines = [await a.line(), await a.line()]
            b_lines = [await b.line()]
            await b.send(b'{"execute":"device_del","arguments":{"id":"drive-0"}}')
            b_lines += [await b.line(), await b.line()]
            a_lines += [await a.line()]
            await a.close()
            await b.close()
            return a_lines, b_lines

    a_lines, b_lines = run(main())
    assert a_lines[0]["event"] == "STOP" and a_lines[0]["data"] == {}
    assert set(a_lines[0]["timestamp"]) == {"seconds", "microseconds"}
    assert a_lines[1] == {"return": {}, "id": 1}
    assert a_lines[2]["event"] == "DEVICE_DELETED"
    assert b_lines[0] == a_lines[0]
    assert b_lines[1]["event"] == "DEVICE_DELETED" and b_lines[1]["data"] == {"device": "drive-0", "path": "drive-0"}
    assert b_lines[2] == {"return": {}}


def test_after_reply_follow_up_runs_after_the_reply(sock_path):
    async def main():
        async with running_server(sock_path):
            client, _ = await RawClient.connect(sock_path)
            await client.send(b'{"execute":"quit","id":"q"}')
            lines = [await client.line(), await client.line()]
            await client.close()
            return lines

    reply, event = run(main())
    assert reply == {"return": {}, "id": "q"}
    assert event["event"] == "SHUTDOWN" and event["data"] == {"guest": False, "reason": "host-qmp-quit"}


def test_events_from_another_thread_reach_clients_in_order(sock_path):
    async def main():
        async with running_server(sock_path) as server:
            client, _ = await RawClient.connect(sock_path)
            await asyncio.to_thread(lambda: [server.events.emit(Stopped()) for _ in range(200)])
            lines = [await client.line() for _ in range(200)]
            await client.close()
            return lines

    lines = run(main())
    assert all(e["event"] == "STOP" and set(e["timestamp"]) == {"seconds", "microseconds"} for e in lines)


def test_a_client_that_does_not_read_is_dropped_and_others_keep_getting_events(sock_path):
    async def main():
        async with running_server(sock_path, max_backlog=256 << 10) as server:
            slow = socket.socket(socket.AF_UNIX)  # never reads (an asyncio client would)
            slow.connect(str(sock_path))
            await until(lambda: server.clients == 1)
            fast, _ = await RawClient.connect(sock_path)
            received = 0

            async def reader():
                nonlocal received
                while True:
                    await fast.line()
                    received += 1

            task = asyncio.create_task(reader())
            sent = 0
            while server.clients == 2:
                for _ in range(100):
                    server.events.emit(Stopped())
                sent += 100
                await until(lambda: received == sent)  # the reading client keeps up
            await until(lambda: received == sent)
            task.cancel()
            slow.close()
            await fast.close()
            return sent, received

    sent, received = run(main())
    assert received == sent > 0


def test_a_client_that_sends_without_reading_is_paused_not_dropped(sock_path):
    n = 20000

    async def main():
        async with running_server(sock_path) as server:
            greedy, _ = await RawClient.connect(sock_path)
            flood = asyncio.create_task(greedy.send(b'{"execute":"query-migrate"}' * n))
            await until(lambda: len(server.api.calls) > 0)
            other, _ = await RawClient.connect(sock_path)
            assert (await other.execute("query-balloon", id=1))["id"] == 1  # not blocked by the flood
            replies = [await greedy.line() for _ in range(n)]
            await flood
            await greedy.close()
            await other.close()
            return replies

    replies = run(main())
    assert replies == [{"return": {"status": "none"}}] * n


def test_close_delivers_what_is_queued_then_hangs_up(sock_path):
    n = 3000

    async def main():
        server_cm = running_server(sock_path)
        server = await server_cm.__aenter__()
        client, _ = await RawClient.connect(sock_path)
        await client.send(b'{"execute":"query-cpus"}' * n)
        await until(lambda: len(server.api.calls) == n)  # replies queued, the client read none
        await server_cm.__aexit__(None, None, None)
        assert not os.path.exists(sock_path)
        data = await asyncio.wait_for(client.reader.read(), TIMEOUT)  # up to EOF
        await client.close()
        return data

    lines = run(main()).split(b"\r\n")
    assert lines[-1] == b"" and len(lines) - 1 == n
    assert all("return" in json.loads(line) for line in lines[:-1])


def test_many_clients_at_once(sock_path):
    async def main():
        async with running_server(sock_path) as server:
            clients = [(await RawClient.connect(sock_path))[0] for _ in range(20)]
            replies = await asyncio.gather(*(c.execute("query-status", id=i) for i, c in enumerate(clients)))
            count = server.clients
            for c in clients:
                await c.close()
            await until(lambda: server.clients == 0)
            return replies, count

    replies, count = run(main())
    assert [r["id"] for r in replies] == list(range(20)) and count == 20


def test_close_gives_up_on_a_client_that_never_reads(sock_path):
    async def main():
        async with running_server(sock_path, drain_timeout=0.2) as server:
            stuck = socket.socket(socket.AF_UNIX)  # never reads
            stuck.connect(str(sock_path))
            await until(lambda: server.clients == 1)
            for _ in range(20000):  # ~1.7 MB: more than the socket buffers hold
                server.events.emit(Stopped())
            assert server.clients == 1
        stuck.close()
        return server.clients, os.path.exists(sock_path)

    assert run(main()) == (0, False)


def test_close_is_idempotent_and_start_twice_is_refused(sock_path):
    async def main():
        server = QmpServer(sock_path, standard_table(), FakeApi())
        await server.close()  # never started: nothing to do
        await server.start()
        with pytest.raises(RuntimeError):
            await server.start()
        assert server.serving
        await server.close()
        await server.close()
        return server.serving

    assert run(main()) is False
