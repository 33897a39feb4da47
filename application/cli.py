"""`pystrato` entry point: argv -> VmConfig -> container -> build -> serve QMP until the end.

Composition root (with application/container.py): the only application modules that import
adapters. Every invalid value is refused before anything starts, with one line and exit 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from domain.errors import ConfigError, VmmError

log = logging.getLogger("pystrato")

EXIT_OK = 0
EXIT_USAGE = 1


def _die(msg: str, code: int = EXIT_USAGE) -> "NoReturn":  # noqa: F821
    sys.stderr.write(f"pystrato: {msg}\n")
    sys.stderr.flush()
    os._exit(code) if _in_daemon_child else sys.exit(code)


_in_daemon_child = False


def _setup_logging(logfile: str | None) -> None:
    level = logging.INFO if logfile is not None else logging.WARNING
    fmt = "%(asctime)s %(name)s %(levelname)s: %(message)s"
    if logfile:
        handler: logging.Handler = logging.FileHandler(logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _check_host_files(config) -> None:
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
    if config.incoming and config.incoming.startswith("file:"):
        d = config.incoming[5:]
        if not os.path.isdir(d):
            raise ConfigError("-incoming", f"'{d}' is not a directory")
    for path in config.qmp:
        parent = os.path.dirname(os.path.abspath(path)) or "/"
        if not os.path.isdir(parent):
            raise ConfigError("-qmp", f"directory '{parent}' does not exist")


def _daemonize() -> int:
    """Fork; the parent waits until the daemon serves QMP (or fails) and exits with its code.
    Returns the write end of the readiness pipe in the daemon."""
    global _in_daemon_child
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"OK"):
            os._exit(EXIT_OK)
        msg = data.decode(errors="replace").strip() or "the daemon exited before serving QMP"
        sys.stderr.write(f"pystrato: {msg}\n")
        os._exit(EXIT_USAGE)
    os.close(r)
    _in_daemon_child = True
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    return w


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from domain.cmdline import parse_cmdline

    try:
        config = parse_cmdline(argv)
        _check_host_files(config)
        if config.daemonize and config.serial.backend == "stdio":
            raise ConfigError("-daemonize", "cannot be combined with -serial stdio")
        if not config.qmp and config.daemonize:
            raise ConfigError("-daemonize", "needs a -qmp socket to be managed through")
    except ConfigError as e:
        _die(str(e))

    ready_fd = _daemonize() if config.daemonize else None
    _setup_logging(config.logfile)
    if ready_fd is not None and config.logfile is None:
        os.dup2(os.open(os.devnull, os.O_RDWR), 2)

    from application.container import build_runtime

    try:
        runtime = build_runtime(config)
    except VmmError as e:
        _report_startup_failure(ready_fd, str(e))
    except OSError as e:
        _report_startup_failure(ready_fd, f"{e.strerror or e}")

    code = asyncio.run(_serve(runtime, config, ready_fd))
    return code


def _report_startup_failure(ready_fd: int | None, msg: str) -> None:
    if ready_fd is not None:
        os.write(ready_fd, msg.encode())
        os.close(ready_fd)
    _die(msg)


async def _serve(runtime, config, ready_fd: int | None) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def request_exit(code: int) -> None:
        def _set():
            if not done.done():
                done.set_result(code)
        loop.call_soon_threadsafe(_set)

    try:
        await runtime.start(loop, request_exit)
    except (VmmError, OSError) as e:
        await runtime.abort()
        msg = str(e) if isinstance(e, VmmError) else (e.strerror or str(e))
        if ready_fd is not None:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)
        sys.stderr.write(f"pystrato: {msg}\n")
        return EXIT_USAGE

    if config.pidfile:
        with open(config.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    if ready_fd is not None:
        os.write(ready_fd, b"OK")
        os.close(ready_fd)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, runtime.on_signal)

    code = await done
    await runtime.finish()
    if config.pidfile:
        try:
            os.unlink(config.pidfile)
        except OSError:
            pass
    return code


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
