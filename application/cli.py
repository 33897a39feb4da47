"""`pystrato` entry point: argv -> VmConfig -> container -> build -> serve QMP until the end.

Composition root (with application/container.py): the only application modules that import
adapters. Every invalid value is refused before anything starts (no QMP socket, no daemon),
with one line on stderr naming the option, and exit 1. -h/-help and -version print and exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import NoReturn

from domain.errors import ConfigError, VmmError

log = logging.getLogger("pystrato")

EXIT_OK = 0
EXIT_USAGE = 1

HELP_OPTIONS = ("-h", "-help", "--help")
VERSION_OPTIONS = ("-version", "--version", "-V")

USAGE = """\
Usage: pystrato [OPTION]...
A virtual machine monitor with StratoVirt's command line, managed over QMP.

  -machine [type=]microvm|q35[,dump-guest-core=on|off][,mem-share=on|off]
                        machine type (default microvm)
  -accel kvm|test       KVM (the default), or the in-memory test hypervisor
  -cpu host[,-FEATURE|,FEATURE=off]...
                        hide host CPU features from the guest
  -smp [cpus=]N[,maxcpus=N][,sockets=N][,dies=N][,clusters=N][,cores=N][,threads=N]
                        vCPUs (1..254); sockets*dies*clusters*cores*threads = maxcpus
  -m [size=]N[K|M|G]    guest RAM, 128 MiB..512 GiB (a bare N is MiB; default 256 MiB)
  -mem-path PATH        file or directory backing guest RAM
  -mem-prealloc         touch all guest RAM before the guest starts
  -kernel PATH          Linux kernel (bzImage or ELF vmlinux)
  -initrd PATH          initial ramdisk
  -append CMDLINE       kernel command line
  -drive file=PATH,id=ID[,readonly=on|off][,direct=on|off]
                        a disk image for a virtio-blk device
  -netdev tap,id=ID,ifname=NAME
                        a tap interface for a virtio-net device
  -device DRIVER[,PROPERTY=VALUE]...
                        virtio-blk-device|virtio-blk-pci, virtio-net-device|virtio-net-pci,
                        virtio-balloon-device|virtio-balloon-pci, pcie-root-port, vfio-pci,
                        virtio-serial-device, virtconsole,chardev=ID
  -chardev socket,id=ID,path=PATH,server,nowait | file,id=ID,path=PATH | stdio,id=ID
                        a backend for virtconsole
  -serial stdio|file:PATH|none
                        the COM1 serial port
  -qmp unix:PATH,server,nowait
                        a QMP socket (repeatable)
  -incoming file:DIR|tcp:HOST:PORT|unix:PATH
                        start from a snapshot or wait for an incoming migration
  -D [LOGFILE]          log to LOGFILE (to stderr without one)
  -pidfile PATH         write the VMM's process id to PATH (removed at exit)
  -daemonize            run in the background once QMP is served (needs -qmp)
  -name NAME            the VM's name
  -uuid UUID            the VM's UUID
  -h, -help             print this help and exit
  -version              print the version and exit
"""


def _die(msg: str) -> NoReturn:
    sys.stderr.write(f"pystrato: {msg}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USAGE)


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


def info_request(argv: list[str]) -> str | None:
    """The help or version text if -h/-help/-version stands where an option does (not as the
    value of another option), else None."""
    from domain.cmdline import OPTIONS

    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in HELP_OPTIONS:
            return USAGE
        if arg in VERSION_OPTIONS:
            from domain.version import VERSION

            return f"pystrato {VERSION}\n"
        kind = OPTIONS.get(arg)
        if kind in ("value", "repeated") or (kind == "optional value" and i < len(argv)
                                             and not argv[i].startswith("-")):
            i += 1
    return None


def _parse(argv: list[str]):
    from application.cli_host import check_host
    from domain.cmdline import parse_cmdline

    config = parse_cmdline(argv)
    if config.daemonize and not config.qmp:
        raise ConfigError("-daemonize", "needs a -qmp socket to be managed through")
    check_host(config)
    return config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    text = info_request(argv)
    if text is not None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        config = _parse(argv)
    except ConfigError as e:
        _die(str(e))

    from application.cli_host import PidFile, daemonize

    ready_fd = daemonize(config.logfile) if config.daemonize else None
    _setup_logging(config.logfile)
    pidfile = None
    try:
        pidfile = PidFile(config.pidfile) if config.pidfile else None
        from application.container import build_runtime

        runtime = build_runtime(config)
    except (VmmError, OSError) as e:
        return _fail_start(ready_fd, pidfile, e)
    try:
        return asyncio.run(_serve(runtime, ready_fd, pidfile))
    finally:
        if pidfile is not None:
            pidfile.remove()


def _fail_start(ready_fd: int | None, pidfile, error: Exception) -> int:
    """Clean up first, then report: a daemon's parent exits the moment it reads the reason."""
    from application.cli_host import report_ready

    if pidfile is not None:
        pidfile.remove()
    msg = str(error) if isinstance(error, VmmError) else (getattr(error, "strerror", None) or str(error))
    if ready_fd is not None:
        report_ready(ready_fd, msg)  # the waiting parent prints it
    else:
        sys.stderr.write(f"pystrato: {msg}\n")
    return EXIT_USAGE


async def _serve(runtime, ready_fd: int | None, pidfile) -> int:
    from application.cli_host import report_ready

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
        return _fail_start(ready_fd, pidfile, e)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, runtime.on_signal)
    _end_startup()
    report_ready(ready_fd)

    code = await done
    await runtime.finish()
    return code


def _end_startup() -> None:
    """The launcher (application.launch) kept the garbage collector off during start-up: keep
    what start-up built out of later collections, and collect again from here on."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
