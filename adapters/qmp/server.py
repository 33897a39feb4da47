"""The QMP server: an asyncio unix-socket server speaking QMP to any number of clients.

Each connection gets the greeting, then every value it sends is answered in order. Handlers are
synchronous and run in the loop thread; a handler's AfterReply follow-up runs after its reply is
queued. When a client stops reading, the server stops reading from it (it cannot flood us with
commands whose replies pile up), and a client whose unread backlog passes ``max_backlog`` (for
instance because events keep coming) is dropped so that it cannot hold memory or the others up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from adapters.host.unix_socket import replace_stale_socket
from domain.errors import HostResourceError

from .commands import CommandTable
from .dispatch import Dispatcher, Outcome
from .events import QmpEventBroadcaster
from .models import NO_ID, error_reply, greeting
from .protocol import Frame, JsonStreamParser, encode

log = logging.getLogger(__name__)

MAX_CLIENT_BACKLOG = 4 << 20  # > the largest reply (a 1 MiB request can echo a 1 MiB id)
DRAIN_TIMEOUT = 5.0  # seconds close() waits for clients to take their last replies
LISTEN_BACKLOG = 16
ACCEPT_RETRY = 0.1  # seconds before accepting again after accept() failed (EMFILE)


class _Connection(asyncio.Protocol):
    def __init__(self, server: QmpServer, closed: asyncio.Future[None]):
        self._server = server
        self._parser = JsonStreamParser()
        self._writing_paused = False
        self.transport: asyncio.WriteTransport | None = None
        self.closed = closed

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send(self._server.greeting_line)
        self._server._attach(self)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        self._pump()

    def eof_received(self) -> bool:
        for frame in self._parser.finish():
            self._answer(frame)
        return False  # close our side once the replies are written

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._detach(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its commands until it does.
        self._writing_paused = True
        self.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        self._writing_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()  # type: ignore[attr-defined]
            self._pump()

    # --- ours -----------------------------------------------------------------------------------

    def _pump(self) -> None:
        while not self._writing_paused and not self.transport.is_closing():
            frame = self._parser.next()
            if frame is None:
                return
            self._answer(frame)

    def _answer(self, frame: Frame) -> None:
        if frame.error is not None:  # a parse error never carries an id (QEMU neither)
            outcome = Outcome(error_reply("GenericError", frame.error))
        else:
            outcome = self._server.dispatcher.handle(frame.value)
        try:
            line = encode(outcome.reply)
        except (TypeError, ValueError) as exc:
            log.exception("QMP reply is not JSON: %r", outcome.reply)
            line = encode(error_reply("GenericError", f"reply is not JSON: {exc}",
                                      outcome.reply.get("id", NO_ID)))
        self.send(line)
        if outcome.then is not None:
            try:
                outcome.then()
            except Exception:
                log.exception("QMP after-reply action failed")

    def send(self, line: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(line)
        if transport.get_write_buffer_size() > self._server.max_backlog:
            log.warning("QMP client dropped: %d bytes unread", transport.get_write_buffer_size())
            transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # writes what is queued, then closes

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _listen_socket(path: str) -> socket.socket:
    replace_stale_socket(path, f"QMP socket {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen(): until then nobody can connect, so there is no window with wider
        # permissions and no process-wide umask change.
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise HostResourceError(f"QMP socket {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


class QmpServer:
    def __init__(self, path: str | os.PathLike[str], table: CommandTable, api: Any, *,
                 loop: asyncio.AbstractEventLoop | None = None,
                 events: QmpEventBroadcaster | None = None,
                 max_backlog: int = MAX_CLIENT_BACKLOG,
                 drain_timeout: float = DRAIN_TIMEOUT):
        self.path = os.fspath(path)
        self.table = table
        self.dispatcher = Dispatcher(table, api)
        self.events = events if events is not None else QmpEventBroadcaster(loop)
        self.max_backlog = max_backlog
        self.drain_timeout = drain_timeout
        self.greeting_line = encode(greeting())
        self._loop = loop
        self._listener: socket.socket | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None
        self._connections: list[_Connection] = []
        self._closing = False

    @property
    def clients(self) -> int:
        return len(self._connections)

    @property
    def serving(self) -> bool:
        return self._listener is not None and not self._closing

    async def start(self) -> None:
        if self._listener is not None or self._closing:
            raise RuntimeError("QMP server already started")
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        self.events.bind(loop)
        sock = _listen_socket(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        sock.listen(LISTEN_BACKLOG)
        self._listener = sock
        loop.add_reader(sock.fileno(), self._accept)
        log.info("QMP listening on %s", self.path)

    # Our own accept rather than loop.create_unix_server(): close() then knows every accepted
    # socket. (Python 3.11's Server.close() leaks a connection accepted just before it.)

    def _accept(self) -> None:
        for _ in range(LISTEN_BACKLOG):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: pause accepting, keep serving
                log.warning("QMP accept on %s failed: %s", self.path, exc)
                self._loop.remove_reader(self._listener.fileno())
                self._loop.call_later(ACCEPT_RETRY, self._resume_accepting)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    def _resume_accepting(self) -> None:
        if not self._closing:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    async def _adopt(self, conn: socket.socket) -> None:
        loop = self._loop
        try:
            await loop.connect_accepted_socket(lambda: _Connection(self, loop.create_future()), conn)
        except BaseException:
            conn.close()
            raise

    async def close(self) -> None:
        """Stop accepting, let every client take the replies and events already queued for it
        (up to drain_timeout), close them, remove the socket file."""
        if self._listener is None or self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        if self._adopting:  # accepted, transport not made yet: never cancelled, that would leak
            await asyncio.gather(*self._adopting, return_exceptions=True)
        connections = list(self._connections)
        for conn in connections:
            conn.close()
        if connections:
            _, late = await asyncio.wait([c.closed for c in connections], timeout=self.drain_timeout)
            if late:
                for conn in connections:
                    if not conn.closed.done():
                        conn.abort()
                await asyncio.wait(late)
        self._unlink()

    async def __aenter__(self) -> QmpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- connection bookkeeping (loop thread) --------------------------------------------------

    def _attach(self, conn: _Connection) -> None:
        self._connections.append(conn)
        self.events.attach(conn)

    def _detach(self, conn: _Connection) -> None:
        if conn in self._connections:
            self._connections.remove(conn)
        self.events.detach(conn)

    def _unlink(self) -> None:
        """Remove the socket file, unless someone replaced it with another since we bound it."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
