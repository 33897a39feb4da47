"""Errors of the boot code."""

from __future__ import annotations

from domain.errors import ConfigError


class BootError(ConfigError):
    """The kernel, initrd or command line cannot be booted (corrupt image, too large, ...).

    A ConfigError so the CLI prints it as the offending option: "-kernel: <reason>"."""

    def __init__(self, reason: str, option: str = "-kernel"):
        super().__init__(option, reason)
