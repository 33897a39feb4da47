"""Chardev backends (``-chardev``) for guest consoles: unix socket server, file, stdio.

``ChardevOpener`` implements domain.ports.CharBackendOpener and owns what it opened, so the
composition root closes every chardev (and removes its socket file) when the VM ends.
"""

from __future__ import annotations

from domain.config import ChardevConfig
from domain.errors import ConfigError, HostResourceError
from domain.ports import CharBackend


class ChardevOpener:
    def __init__(self) -> None:
        self._opened: list[CharBackend] = []

    def open(self, config: ChardevConfig) -> CharBackend:
        try:
            backend = _open(config)
        except HostResourceError as e:  # at start-up: a bad -chardev, named as such
            raise ConfigError("-chardev", str(e)) from None
        self._opened.append(backend)
        return backend

    def close(self) -> None:
        while self._opened:
            self._opened.pop().close()


def _open(cfg: ChardevConfig) -> CharBackend:
    opt = "-chardev"
    if cfg.backend == "socket":
        if not cfg.server:
            raise ConfigError(opt, f"socket '{cfg.id}': 'server' is required: pystrato listens, "
                              "client-mode chardevs are refused")
        if not cfg.nowait:
            raise ConfigError(opt, f"socket '{cfg.id}': 'nowait' is required, as in StratoVirt")
        from adapters.chardev.socket import UnixSocketChardev

        return UnixSocketChardev(cfg.id, cfg.path or "")
    if cfg.backend == "file":
        from adapters.chardev.stream import FileChardev

        return FileChardev(cfg.id, cfg.path or "")
    if cfg.backend == "stdio":
        from adapters.chardev.stream import StdioChardev

        return StdioChardev(cfg.id)
    raise ConfigError(opt, f"{cfg.backend} chardev '{cfg.id}' is not supported by pystrato yet "
                      "(use socket, file or stdio)")
