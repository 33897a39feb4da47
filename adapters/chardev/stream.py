"""``-chardev file,id=,path=`` (output only) and ``-chardev stdio,id=`` (this terminal).

A file takes guest output appended (as ``-serial file:`` does) and never has input. stdio writes
to stdout and reads stdin on a thread of its own, with the back-pressure of
domain.ports.CharBackend: while the guest has no room the thread waits instead of reading on.
A terminal on stdin is put in raw mode, as StratoVirt does, so keys (Ctrl-C too) reach the
guest; its settings are restored on close and at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import termios
import threading
import tty
from typing import Callable

from domain.errors import HostResourceError

log = logging.getLogger("pystrato.chardev")

READ_SIZE = 4096


class FileChardev:
    def __init__(self, chardev_id: str, path: str):
        self.id = chardev_id
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise HostResourceError(f"chardev '{chardev_id}': file {path}: {exc.strerror or exc}") from None

    def start(self, receive: Callable[[bytes], int]) -> None:
        pass  # a file has no input

    def input_ready(self) -> None:
        pass

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        while data and self._fd >= 0:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StdioChardev:
    def __init__(self, chardev_id: str, in_fd: int = 0, out_fd: int = 1):
        self.id = chardev_id
        self._in, self._out = in_fd, out_fd
        self._room = threading.Event()
        self._closed = False
        self._saved_tty = None
        if os.isatty(in_fd):
            self._saved_tty = termios.tcgetattr(in_fd)
            tty.setraw(in_fd)
            atexit.register(self._restore_tty)

    def start(self, receive: Callable[[bytes], int]) -> None:
        threading.Thread(target=self._pump, args=(receive,), name=f"chardev-{self.id}", daemon=True).start()

    def input_ready(self) -> None:
        self._room.set()

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        try:
            while data and not self._closed:
                data = data[os.write(self._out, data):]
        except OSError:
            pass  # stdout closed: the output has nowhere to go

    def close(self) -> None:
        self._closed = True
        self._room.set()
        self._restore_tty()

    def _pump(self, receive: Callable[[bytes], int]) -> None:
        while not self._closed:
            try:
                data = os.read(self._in, READ_SIZE)
            except OSError:
                return
            if not data:
                return  # stdin ended: the console has no more input
            while data and not self._closed:
                self._room.clear()
                data = data[receive(data):]
                if data:
                    self._room.wait()

    def _restore_tty(self) -> None:
        saved, self._saved_tty = self._saved_tty, None
        if saved is not None:
            try:
                termios.tcsetattr(self._in, termios.TCSADRAIN, saved)
            except termios.error:
                log.warning("chardev %s: could not restore the terminal settings", self.id)
            sys.stdout.flush()
