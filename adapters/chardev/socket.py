"""``-chardev socket,id=,path=,server,nowait``: a unix socket server for a guest console.

As in StratoVirt: the socket is bound (mode 0600) when the VM is built, the VM starts without
waiting for a client (nowait), one client is served at a time (the next one waits in the listen
backlog until the first leaves), and the file is removed when the VM ends.

One thread per chardev polls the listener, the client and a wake-up pipe. Input goes to the
consumer with back-pressure (domain.ports.CharBackend): while the guest has no room, the client
is not read, so a fast writer fills its own socket buffer rather than our memory. Output never
blocks the device: it is sent at once when the socket takes it, otherwise queued up to
OUT_LIMIT bytes and flushed by the thread; the excess, and everything written while no client
is connected, is dropped and counted in ``dropped``.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from typing import Callable

from adapters.host.unix_socket import replace_stale_socket
from domain.errors import HostResourceError

log = logging.getLogger("pystrato.chardev")

OUT_LIMIT = 1 << 20
READ_SIZE = 4096
_HUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


class UnixSocketChardev:
    def __init__(self, chardev_id: str, path: str):
        self.id = chardev_id
        self.path = path
        self.dropped = 0
        self._lock = threading.Lock()  # guards the client socket's lifetime and _out
        self._client: socket.socket | None = None
        self._out = bytearray()
        self._pending = b""  # input the guest had no room for (thread only)
        self._receive: Callable[[bytes], int] | None = None
        self._closed = False
        self._listener = _listen(chardev_id, path)
        st = os.stat(path)
        self._inode = (st.st_dev, st.st_ino)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=f"chardev-{chardev_id}", daemon=True)
        self._thread.start()

    # --- CharBackend ---------------------------------------------------------------------------

    def start(self, receive: Callable[[bytes], int]) -> None:
        self._receive = receive
        self._wake()

    def input_ready(self) -> None:
        self._wake()

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        if not data:
            return
        wake = False
        with self._lock:
            client = self._client
            if client is None:
                self.dropped += len(data)
                return
            sent = 0
            if not self._out:
                try:
                    sent = client.send(data, socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    pass
                except OSError:  # the client is gone; the thread sees the hang-up
                    self.dropped += len(data)
                    return
            rest = data[sent:]
            if rest:
                keep = rest[:max(0, OUT_LIMIT - len(self._out))]
                self._out += keep
                self.dropped += len(rest) - len(keep)
                wake = True
        if wake:
            self._wake()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            self._drop_client()
            self._listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # unless someone replaced it since
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    @property
    def connected(self) -> bool:
        return self._client is not None

    # --- the chardev thread --------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:  # never write into the fd number of a pipe close() already closed
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending anyway

    def _run(self) -> None:
        listener = self._listener.fileno()
        while True:
            with self._lock:
                if self._closed:
                    return
                client, want_out = self._client, bool(self._out)
            paused = self._receive is None or bool(self._pending)
            poll = select.poll()
            poll.register(self._wake_r, select.POLLIN)
            if client is None:
                poll.register(listener, select.POLLIN)
            elif not paused or want_out:
                # While paused the client is not read; it is polled only to flush output.
                poll.register(client, (0 if paused else select.POLLIN) | (select.POLLOUT if want_out else 0))
            for fd, events in poll.poll():
                if fd == self._wake_r:
                    _drain(self._wake_r)
                elif fd == listener:
                    self._accept()
                elif client is not None:
                    self._client_events(client, events, paused)
            self._offer_pending()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:  # EMFILE and the like: the client stays in the backlog
            log.warning("chardev %s: accept failed: %s", self.id, exc)
            return
        conn.setblocking(False)
        with self._lock:
            self._client = conn
            self._out.clear()
        log.info("chardev %s: client connected on %s", self.id, self.path)

    def _client_events(self, client: socket.socket, events: int, paused: bool) -> None:
        if events & select.POLLOUT and not self._flush(client):
            return
        if not paused and events & (select.POLLIN | _HUP):
            self._read(client)
        elif events & _HUP:  # gone while the guest was not reading: unread input is lost
            self._disconnect()

    def _flush(self, client: socket.socket) -> bool:
        with self._lock:
            try:
                sent = client.send(self._out, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return True
            except OSError:
                sent = -1
            if sent >= 0:
                del self._out[:sent]
                return True
        self._disconnect()
        return False

    def _read(self, client: socket.socket) -> None:
        try:
            data = client.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect()
            return
        self._pending = data

    def _offer_pending(self) -> None:
        """Hand kept input to the guest; what does not fit stays, and reading stays paused."""
        if self._pending and self._receive is not None:
            try:
                taken = self._receive(self._pending)
            except Exception:  # a device bug must not kill the console thread
                log.exception("chardev %s: input consumer failed; input dropped", self.id)
                taken = len(self._pending)
            self._pending = self._pending[taken:]

    def _disconnect(self) -> None:
        with self._lock:
            self._drop_client()
        log.info("chardev %s: client disconnected", self.id)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._out.clear()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass


def _listen(chardev_id: str, path: str) -> socket.socket:
    what = f"chardev '{chardev_id}': socket {path}"
    replace_stale_socket(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # before listen(): nobody can connect through wider permissions
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise HostResourceError(f"{what}: {exc.strerror or exc}") from None
    return sock
