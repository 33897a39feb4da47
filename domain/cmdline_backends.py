"""Backends on the command line: ``-drive``, ``-netdev``, ``-chardev`` (StratoVirt forms)."""

from __future__ import annotations

from domain.cmdline_values import (
    MAX_BLK_SERIAL,
    Params,
    parse_id,
    parse_number,
    parse_path,
    parse_socket_path,
    quote,
)
from domain.config import ChardevConfig, DriveConfig, NetdevConfig
from domain.errors import ConfigError

# StratoVirt knows these; pystrato refuses them by name rather than ignoring them.
_DRIVE_UNSUPPORTED = frozenset(
    {"unit", "throttling.iops-total", "aio", "media", "discard", "detect-zeroes",
     "l2-cache-size", "refcount-cache-size"}
)
_NETDEV_UNSUPPORTED = frozenset({"fds", "vhostfd", "vhostfds", "path", "chardev", "macnat"})
MAX_QUEUE_PAIRS = 16  # StratoVirt: MAX_VIRTIO_QUEUE / 2
MAX_IFNAME = 15  # IFNAMSIZ - 1


def parse_drive(value: str) -> tuple[DriveConfig, str | None]:
    """``-drive id=,file=[,readonly=][,direct=][,format=raw][,if=none][,serial=]``.

    Returns the drive and its legacy ``serial=`` (StratoVirt moved serial to -device in 2021;
    the parser hands it to the virtio-blk device that uses this drive).
    """
    opt = "-drive"
    params = Params(opt, value, head=False)
    interface = params.take("if") or "none"
    if interface == "pflash":
        raise ConfigError(opt, "if=pflash is not supported by pystrato yet")
    if interface != "none":
        raise ConfigError(opt, f"if={quote(interface)} is not a drive interface (none)")
    drive_id = parse_id(opt, "id", params.require("id"))
    path = parse_path(opt, "file", params.require("file"))
    fmt = params.take("format") or "raw"
    if fmt == "qcow2":
        raise ConfigError(opt, "format=qcow2 is not supported by pystrato yet (only raw)")
    if fmt != "raw":
        raise ConfigError(opt, f"format={quote(fmt)} is not a disk format (raw)")
    readonly = params.switch("readonly", False)
    direct = params.switch("direct", True)
    serial = params.take("serial")
    if serial is not None and len(serial) > MAX_BLK_SERIAL:
        raise ConfigError(opt, f"serial is longer than {MAX_BLK_SERIAL} characters")
    params.finish(_DRIVE_UNSUPPORTED)
    drive = DriveConfig(id=drive_id, file=path, readonly=readonly, direct=direct, format=fmt)
    return drive, serial


def parse_netdev(value: str) -> NetdevConfig:
    """``-netdev tap,id=,ifname=|fd=[,vhost=on|off][,queues=N]``."""
    opt = "-netdev"
    params = Params(opt, value, head=True)
    kind = params.head
    if kind is None:
        raise ConfigError(opt, "needs a type first (tap)")
    if kind == "vhost-user":
        raise ConfigError(opt, "vhost-user is not supported by pystrato yet")
    if kind != "tap":
        raise ConfigError(opt, f"{quote(kind)} is not a netdev type (tap)")
    netdev_id = parse_id(opt, "id", params.require("id"))
    ifname = params.take("ifname")
    fd_text = params.take("fd")
    vhost = params.switch("vhost", False)
    queues_text = params.take("queues")
    params.finish(_NETDEV_UNSUPPORTED)
    if ifname is None and fd_text is None:
        raise ConfigError(opt, f"netdev {quote(netdev_id)}: a tap needs ifname= or fd=")
    if ifname is not None and fd_text is not None:
        raise ConfigError(opt, f"netdev {quote(netdev_id)}: ifname= and fd= exclude each other")
    if ifname is not None and (len(ifname.encode("utf-8", "surrogatepass")) > MAX_IFNAME or "/" in ifname):
        raise ConfigError(opt, f"ifname {quote(ifname)} is not a Linux interface name "
                          f"(at most {MAX_IFNAME} bytes, no '/')")
    fd = None if fd_text is None else parse_number(opt, "fd", fd_text, 0, 2**31 - 1)
    queues = 1 if queues_text is None else parse_number(opt, "queues", queues_text, 1, MAX_QUEUE_PAIRS)
    if fd is not None and queues > 1:
        raise ConfigError(opt, f"netdev {quote(netdev_id)}: fd= is one queue pair; "
                          "queues>1 needs fds=, which is not supported by pystrato yet")
    return NetdevConfig(id=netdev_id, type="tap", ifname=ifname, fd=fd, vhost=vhost, queues=queues)


def parse_chardev(value: str) -> ChardevConfig:
    """``-chardev stdio|pty,id=`` / ``file,id=,path=`` / ``socket,id=,path=[,server][,nowait]``."""
    params = Params("-chardev", value, head=True)
    chardev_id = parse_id("-chardev", "id", params.require("id"))
    return chardev_from_params(params, chardev_id)


def chardev_from_params(params: Params, chardev_id: str) -> ChardevConfig:
    """The backend part shared by -chardev and the implicit chardev of -serial."""
    opt = params.option
    kind = params.head
    if kind is None:
        raise ConfigError(opt, "needs a backend type first (stdio, pty, file or socket)")
    if kind in ("stdio", "pty"):
        params.finish()
        return ChardevConfig(id=chardev_id, backend=kind)
    if kind == "file":
        path = parse_path(opt, "path", params.require("path"))
        params.finish()
        return ChardevConfig(id=chardev_id, backend="file", path=path)
    if kind == "socket":
        if "host" in params or "port" in params:
            raise ConfigError(opt, "tcp sockets (host=, port=) are not supported by pystrato yet")
        path = parse_socket_path(opt, "path", params.require("path", " (unix socket)"))
        server = params.flag("server")
        nowait = params.flag("nowait")
        params.finish()
        return ChardevConfig(id=chardev_id, backend="socket", path=path, server=server, nowait=nowait)
    raise ConfigError(opt, f"{quote(kind)} is not a chardev backend (stdio, pty, file, socket)")
