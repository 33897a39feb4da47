"""A proxy for one stream connection (a migration): forwards the source's bytes to the
destination and can cut the stream after N bytes or flip one byte in it; replies flow back
untouched. Used by the engine's contract tests (unix sockets) and the e2e tests (TCP)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class StreamProxy(threading.Thread):
    """Accepts one connection on ``listener`` and forwards it to ``connect()``: at most ``limit``
    source bytes, then both connections are cut (None: everything), with the byte at stream
    offset ``flip_at`` inverted. ``forwarded`` counts the source bytes that went through;
    ``cut`` says the limit was reached. Call start()."""

    def __init__(self, listener: socket.socket, uri: str, connect: Callable[[], socket.socket],
                 limit: int | None = None, flip_at: int | None = None):
        super().__init__(name="stream-proxy", daemon=True)
        self.listener, self.uri, self.connect = listener, uri, connect
        self.limit, self.flip_at = limit, flip_at
        self.forwarded = 0
        self.cut = False

    @classmethod
    def tcp(cls, target: tuple[str, int], limit: int | None = None,
            flip_at: int | None = None) -> StreamProxy:
        listener = socket.create_server(("127.0.0.1", 0))
        return cls(listener, f"tcp:127.0.0.1:{listener.getsockname()[1]}",
                   lambda: socket.create_connection(target), limit, flip_at)

    @classmethod
    def unix(cls, path: str, target: str, limit: int | None = None,
             flip_at: int | None = None) -> StreamProxy:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(target)
            return s

        return cls(listener, f"unix:{path}", connect, limit, flip_at)

    def run(self) -> None:
        src, _ = self.listener.accept()
        self.listener.close()
        dst = self.connect()
        back = threading.Thread(target=self._pump_back, args=(dst, src), daemon=True)
        back.start()
        try:
            while self.limit is None or self.forwarded < self.limit:
                want = 1 << 16 if self.limit is None else min(1 << 16, self.limit - self.forwarded)
                data = src.recv(want)
                if not data:
                    break
                at = None if self.flip_at is None else self.flip_at - self.forwarded
                if at is not None and 0 <= at < len(data):
                    data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
                dst.sendall(data)
                self.forwarded += len(data)
            else:
                self.cut = True
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            back.join(10)
            src.close()
            dst.close()

    @staticmethod
    def _pump_back(dst: socket.socket, src: socket.socket) -> None:
        try:
            while data := dst.recv(1 << 16):
                src.sendall(data)
        except OSError:
            pass
