"""The host side of `pystrato`'s start-up: checks that every file, directory and address the
options name is usable (so a bad one is refused before anything starts, with one line naming
the option), the pid file, and -daemonize.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat

from domain.config import VmConfig
from domain.errors import ConfigError


def check_host(config: VmConfig) -> None:
    """Raise ConfigError(option, reason) for the first option whose host resource is unusable."""
    from application.container import host_probe

    probe = host_probe()
    for opt, path in (("-kernel", config.kernel), ("-initrd", config.initrd)):
        if path:
            why = probe.file_usable(path, write=False)
            if why:
                raise ConfigError(opt, f"'{path}': {why}")
    for d in config.drives:
        why = probe.file_usable(d.file, write=not d.readonly)
        if why:
            raise ConfigError("-drive", f"id={d.id}: '{d.file}': {why}")
    if config.memory.mem_path:
        _mem_path(config.memory.mem_path)
    for path in config.qmp:
        _parent_dir("-qmp", path)
    for c in config.chardevs:
        if c.backend in ("socket", "file") and c.path:
            _parent_dir("-chardev", c.path)
    if config.incoming:
        _check_incoming(config.incoming)
    if config.logfile:
        _appendable("-D", config.logfile)
    if config.serial.backend == "file" and config.serial.path:
        _appendable("-serial", config.serial.path)
    if config.pidfile:
        _parent_dir("-pidfile", config.pidfile)
        if os.path.isdir(config.pidfile):
            raise ConfigError("-pidfile", f"'{config.pidfile}': Is a directory")


def _mem_path(path: str) -> None:
    """A directory (RAM goes in an unlinked file there) or a file, created if missing; either
    must be writable, as the VMM opens it read-write."""
    if os.path.isdir(path):
        target = path
    else:
        _parent_dir("-mem-path", path)
        target = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
    if not os.access(target, os.W_OK):
        raise ConfigError("-mem-path", f"'{target}': Permission denied")


def _parent_dir(option: str, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    if not os.path.isdir(parent):
        raise ConfigError(option, f"directory '{parent}' does not exist")


def _appendable(option: str, path: str) -> None:
    """Open for append as the VMM will (this creates the file, as the VMM would)."""
    _parent_dir(option, path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ConfigError(option, f"'{path}': {e.strerror}") from None
    os.close(fd)


def _check_incoming(uri: str) -> None:
    opt = "-incoming"
    scheme, _, rest = uri.partition(":")
    if scheme == "file":
        if not os.path.isdir(rest):
            raise ConfigError(opt, f"'{rest}' is not a directory")
    elif scheme == "unix":
        _parent_dir(opt, rest)
        if os.path.lexists(rest) and not stat.S_ISSOCK(os.lstat(rest).st_mode):
            raise ConfigError(opt, f"'{rest}' exists and is not a socket")
    elif scheme == "tcp":
        _probe_tcp_listen(uri)


def _probe_tcp_listen(uri: str) -> None:
    """Bind the address now (and let it go) so that a bad or busy one fails before QMP starts;
    the migration service binds it again moments later."""
    from domain.migration import parse_migration_uri

    u = parse_migration_uri(uri)
    try:
        family, _, _, _, addr = socket.getaddrinfo(u.host or None, u.port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except socket.gaierror as e:
        raise ConfigError("-incoming", f"cannot resolve '{u.host}': {e.strerror}") from None
    except OSError as e:
        raise ConfigError("-incoming", f"cannot listen on {uri}: {e.strerror}") from None


class PidFile:
    """-pidfile: the VMM's pid, written once the process that will run the VM exists, locked
    for its lifetime (a second VMM given the same file is refused, a stale one is reused),
    removed at exit."""

    def __init__(self, path: str):
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError("-pidfile", f"'{path}': {e.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError("-pidfile", f"'{path}' is locked by another running VMM") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        if self._fd < 0:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # not if someone replaced it since
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1


def daemonize(logfile: str | None) -> int | None:
    """Fork twice, as StratoVirt does; the original process waits until the daemon reports
    readiness (``b"OK"``) or a failure (its one line) on a pipe, prints that line and exits
    with 0 or 1. Returns, in the daemon, the write end of that pipe. The daemon's stdin and
    stdout are /dev/null; its stderr is the -D log file if one is given, else /dev/null."""
    r, w = os.pipe2(os.O_CLOEXEC)
    if os.fork() > 0:
        os.close(w)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        if data.startswith(b"OK"):
            os._exit(0)
        msg = data.decode(errors="replace").strip() or "the daemon exited before serving QMP"
        os.write(2, f"pystrato: {msg}\n".encode())
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    err = null
    if logfile:
        err = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    for fd in {null, err}:
        os.close(fd)
    return w


def report_ready(ready_fd: int | None, failure: str | None = None) -> None:
    """Tell the waiting parent of a daemon that QMP is served (or why the daemon gives up)."""
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, b"OK" if failure is None else failure.encode())
    finally:
        os.close(ready_fd)
