"""The StratoVirt-style command line -> VmConfig (pure: no file or socket is touched here).

``parse_cmdline(argv)`` takes the arguments after the program name. Syntax as StratoVirt's
(machine_manager/src/cmdline.rs): ``-opt value``; an option given twice is refused unless it is
repeatable; ``-append`` also gathers the bare words after it. Whether files exist is for the
application to check. Errors are ConfigError(option, reason): one line.
"""

from __future__ import annotations

import dataclasses
import re

from domain.cmdline_backends import (
    chardev_from_params,
    parse_chardev,
    parse_drive,
    parse_netdev,
)
from domain.cmdline_checks import check_config
from domain.cmdline_devices import parse_device
from domain.cmdline_values import (
    MAX_STRING_LENGTH,
    Params,
    parse_decimal,
    parse_id,
    parse_path,
    parse_size,
    parse_socket_path,
    parse_uuid,
    quote,
)
from domain.config import (
    ACCEL_KVM,
    ACCEL_TEST,
    MAX_MEMORY,
    MAX_VCPUS,
    MICROVM,
    MIN_MEMORY,
    MIN_VCPUS,
    Q35,
    CpuTopology,
    MachineConfig,
    MemoryConfig,
    SerialConfig,
    VmConfig,
)
from domain.errors import ConfigError

__all__ = ["parse_cmdline", "OPTIONS", "UNSUPPORTED_OPTIONS"]

FLAG, VALUE, OPTIONAL, REPEATED = "flag", "value", "optional value", "repeated"

# Every option pystrato implements, with how it takes its value.
OPTIONS: dict[str, str] = {
    "-machine": VALUE, "-accel": VALUE, "-cpu": VALUE, "-smp": VALUE, "-m": VALUE,
    "-mem-path": VALUE, "-mem-prealloc": FLAG, "-kernel": VALUE, "-initrd": VALUE,
    "-append": REPEATED, "-drive": REPEATED, "-netdev": REPEATED, "-chardev": REPEATED,
    "-device": REPEATED, "-qmp": REPEATED, "-serial": VALUE, "-incoming": VALUE,
    "-D": OPTIONAL, "-pidfile": VALUE, "-daemonize": FLAG, "-name": VALUE, "-uuid": VALUE,
}

# StratoVirt (or QEMU, for a few the StratoVirt manual readers reach for) accepts these;
# pystrato refuses them by name instead of calling them unknown.
UNSUPPORTED_OPTIONS = frozenset({
    "-S", "-freeze", "-numa", "-object", "-mon", "-global", "-boot", "-bios", "-display", "-usb",
    "-iothread", "-windows_emu_pid", "-mod-test", "-disable-seccomp", "-overcommit",
    "-no-user-config", "-nodefaults", "-sandbox", "-msg", "-rtc", "-no-shutdown", "-battery",
    "-nographic", "-realtime", "-trace", "-hardware-signature", "-smbios", "-cameradev", "-vnc",
    "-h", "-help", "-version",
})

_CPU_FEATURE = r"[a-z0-9][a-z0-9_.-]*"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zeros, like Rust's Ipv4Addr
_IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"(?=.*[A-Za-z-]){_LABEL}(\.{_LABEL})*"  # a name, not a bad IPv4
_SERIAL_CHARDEV = "serial_chardev"  # StratoVirt's name for the chardev -serial makes itself
_PAGE = 4096


def parse_cmdline(argv: list[str]) -> VmConfig:
    """Parse argv (without the program name) and cross-check it; raise ConfigError."""
    opts = _collect(argv)
    first = {name: values[0] for name, values in opts.items() if values}
    machine, dump, share = _machine(first.get("-machine"), first.get("-accel"), first.get("-cpu"))
    memory = _memory(first.get("-m"), first.get("-mem-path"), "-mem-prealloc" in opts, dump, share)
    drives_and_serials = [parse_drive(v) for v in opts.get("-drive", [])]
    chardevs = [parse_chardev(v) for v in opts.get("-chardev", [])]
    serial, implicit = _serial(first.get("-serial"))
    cfg = VmConfig(
        machine=machine,
        smp=_smp(first["-smp"]) if "-smp" in first else CpuTopology(),
        memory=memory,
        kernel=_path("-kernel", first.get("-kernel")),
        initrd=_path("-initrd", first.get("-initrd")),
        append=" ".join(opts.get("-append", [])),
        drives=tuple(d for d, _ in drives_and_serials),
        netdevs=tuple(parse_netdev(v) for v in opts.get("-netdev", [])),
        devices=tuple(parse_device(v, machine.type) for v in opts.get("-device", [])),
        chardevs=tuple(chardevs + implicit),
        serial=serial,
        qmp=tuple(_qmp(v) for v in opts.get("-qmp", [])),
        incoming=_incoming(first["-incoming"]) if "-incoming" in first else None,
        logfile=_logfile(opts),
        pidfile=_path("-pidfile", first.get("-pidfile")),
        daemonize="-daemonize" in opts,
        name=_name(first.get("-name")),
        uuid=parse_uuid("-uuid", first["-uuid"]) if "-uuid" in first else None,
    )
    check_config(cfg)
    return _fold_drive_serials(cfg, {d.id: s for d, s in drives_and_serials if s is not None})


def _collect(argv: list[str]) -> dict[str, list[str]]:
    """argv -> {option: [values]}; arity and repetition checked, unknown options refused."""
    opts: dict[str, list[str]] = {}
    last: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-"):
            if last == "-append":  # StratoVirt gathers every bare word after -append
                opts[last].append(arg)
                continue
            if last is None:
                raise ConfigError(quote(arg)[1:-1], "unexpected argument: options start with '-'")
            raise ConfigError(last, f"unexpected argument {quote(arg)} after {last} "
                              "(quote values that contain spaces)")
        kind = OPTIONS.get(arg)
        if kind is None:
            if arg in UNSUPPORTED_OPTIONS:
                raise ConfigError(arg, "not supported by pystrato yet")
            if arg.startswith("--") and arg[1:] in OPTIONS:
                raise ConfigError(arg, f"unknown option (StratoVirt spells it {arg[1:]})")
            # The name is user text: escape it so the error stays one line.
            raise ConfigError(quote(arg)[1:-1], "unknown option")
        if arg in opts and kind != REPEATED:
            raise ConfigError(arg, "given more than once")
        values = opts.setdefault(arg, [])
        last = arg
        if kind in (VALUE, REPEATED):
            if i >= len(argv):
                raise ConfigError(arg, "needs a value")
            values.append(argv[i])
            i += 1
        elif kind == OPTIONAL and i < len(argv) and not argv[i].startswith("-"):
            values.append(argv[i])
            i += 1
    return opts


def _machine(
    text: str | None, accel_text: str | None, cpu_text: str | None
) -> tuple[MachineConfig, bool, bool]:
    """-machine [type=]microvm|q35[,dump-guest-core=][,mem-share=][,accel=][,usb=off], -accel, -cpu.

    Returns the machine and the two memory switches -machine carries (dump-guest-core, mem-share).
    """
    opt = "-machine"
    kind, accel, dump, share = MICROVM, None, True, False
    if text is not None:
        params = Params(opt, text, head=True)
        named = params.take("type")
        if params.head is not None and named is not None:
            raise ConfigError(opt, "the machine type is given twice")
        kind = (params.head or named or "").lower()
        if kind == "":
            raise ConfigError(opt, "needs a machine type (microvm or q35)")
        if kind == "none":
            raise ConfigError(opt, "machine type none is not supported by pystrato yet")
        if kind not in (MICROVM, Q35):
            raise ConfigError(opt, f"{quote(kind)} is not a machine type (microvm or q35)")
        dump = params.switch("dump-guest-core", True)
        share = params.switch("mem-share", False)
        accel_value = params.take("accel")
        accel = None if accel_value is None else _accel_name(opt, accel_value)
        usb = params.take("usb")
        if usb is not None and usb != "off":
            raise ConfigError(opt, f"usb={quote(usb)}: only usb=off is accepted")
        params.finish()
    if accel_text is not None:
        params = Params("-accel", accel_text, head=True)
        if params.head is None:
            raise ConfigError("-accel", "needs an accelerator (kvm or test)")
        params.finish()
        chosen = _accel_name("-accel", params.head)
        if accel is not None and accel != chosen:
            raise ConfigError("-accel", f"{chosen} contradicts -machine accel={accel}")
        accel = chosen
    hidden = () if cpu_text is None else _cpu(cpu_text)
    return MachineConfig(type=kind, accel=accel, hidden_cpu_features=hidden), dump, share


def _accel_name(option: str, value: str) -> str:
    if value in ("kvm", "kvm:tcg"):  # kvm:tcg is libvirt's spelling; StratoVirt maps it to kvm
        return ACCEL_KVM
    if value == "test":
        return ACCEL_TEST
    raise ConfigError(option, f"{quote(value)} is not an accelerator (kvm or test)")


def _cpu(text: str) -> tuple[str, ...]:
    """-cpu host[,-feature][,feature=off]: features hidden from the guest's CPUID."""
    opt = "-cpu"
    items = text.split(",")
    if items[0] != "host":
        raise ConfigError(opt, f"{quote(items[0])} is not a CPU model (only host)")
    hidden: list[str] = []
    for item in items[1:]:
        name, eq, value = item.partition("=")
        if name in ("pmu", "sve", "kvm-steal-time"):
            raise ConfigError(opt, f"{name}= is not supported by pystrato yet")
        if item.startswith("+") or (eq and value == "on"):
            raise ConfigError(opt, f"enabling {quote(item.lstrip('+').partition('=')[0])} is not "
                              "supported by pystrato yet (host already offers every host feature)")
        if item.startswith("-") and not eq:
            name = item[1:]
        elif not (eq and value == "off"):
            raise ConfigError(opt, f"{quote(item)} is not -feature or feature=off")
        name = name.lower()
        if not re.fullmatch(_CPU_FEATURE, name):
            raise ConfigError(opt, f"{quote(name)} is not a CPU feature name")
        if name not in hidden:
            hidden.append(name)
    return tuple(hidden)


def _smp(text: str) -> CpuTopology:
    """-smp [cpus=]N[,maxcpus=][,sockets=][,dies=][,clusters=][,cores=][,threads=].

    Missing values are derived sockets first, then cores, then threads (0 = derive).
    """
    opt = "-smp"
    params = Params(opt, text, head=True)
    named = params.take("cpus")
    if params.head is not None and named is not None:
        raise ConfigError(opt, "cpus is given twice")
    cpus_text = params.head if params.head is not None else named
    if cpus_text is None:
        raise ConfigError(opt, "needs a vCPU count ([cpus=]N)")
    cpus = parse_decimal(opt, "cpus", cpus_text, MIN_VCPUS, MAX_VCPUS)

    def get(key: str, lo: int) -> int:  # absent: lo, i.e. 0 ("derive") or 1 for dies/clusters
        value = params.take(key)
        return lo if value is None else parse_decimal(opt, key, value, lo, MAX_VCPUS)

    maxcpus, sockets, dies = get("maxcpus", 0), get("sockets", 0), get("dies", 1)
    clusters, cores, threads = get("clusters", 1), get("cores", 0), get("threads", 0)
    params.finish()
    if maxcpus == 0:
        maxcpus = sockets * dies * clusters * cores * threads or cpus
    # The manual's query-cpus example (-smp 2: CPU 1 is socket-id 1) fills sockets first, as
    # QEMU did for x86 before 6.2; StratoVirt's own code fills cores first. The manual wins.
    if sockets == 0:
        cores, threads = cores or 1, threads or 1
        sockets = maxcpus // (dies * clusters * cores * threads)
    elif cores == 0:
        threads = threads or 1
        cores = maxcpus // (sockets * dies * clusters * threads)
    if threads == 0:
        threads = maxcpus // (sockets * dies * clusters * cores)
    if not cpus <= maxcpus <= MAX_VCPUS:
        raise ConfigError(opt, f"maxcpus ({maxcpus}) must be in [cpus ({cpus}), {MAX_VCPUS}]")
    product = sockets * dies * clusters * cores * threads
    if product != maxcpus:
        raise ConfigError(opt, f"sockets ({sockets}) * dies ({dies}) * clusters ({clusters}) * "
                          f"cores ({cores}) * threads ({threads}) = {product} must equal "
                          f"maxcpus ({maxcpus})")
    return CpuTopology(cpus, maxcpus, sockets, dies, clusters, cores, threads)


def _memory(text: str | None, mem_path: str | None, prealloc: bool, dump: bool, share: bool) -> MemoryConfig:
    """-m [size=]N[K|M|G] (bare N is MiB), -mem-path, -mem-prealloc."""
    opt = "-m"
    size = MemoryConfig().size
    if text is not None:
        params = Params(opt, text, head=True)
        named = params.take("size")
        if params.head is not None and named is not None:
            raise ConfigError(opt, "size is given twice")
        value = params.head if params.head is not None else named
        if value is None:
            raise ConfigError(opt, "needs a size ([size=]N[K|M|G])")
        params.finish(frozenset({"maxmem"}))
        size = parse_size(opt, "size", value)
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ConfigError(opt, f"memory size {size} bytes is outside [128 MiB, 512 GiB] "
                          "(a bare number is MiB)")
    if size % _PAGE:
        raise ConfigError(opt, f"memory size {size} bytes is not a multiple of 4 KiB "
                          "(KVM maps guest RAM in pages)")
    path = None if mem_path is None else parse_path("-mem-path", "path", mem_path)
    return MemoryConfig(size=size, mem_path=path, mem_share=share, prealloc=prealloc,
                        dump_guest_core=dump)


def _path(option: str, value: str | None) -> str | None:
    return None if value is None else parse_path(option, "path", value)


def _serial(text: str | None) -> tuple[SerialConfig, list]:
    """-serial stdio|none|file:PATH|file,path=PATH|chardev:ID|pty|socket,path=...

    pty and socket get a chardev of their own named serial_chardev, as in StratoVirt.
    """
    opt = "-serial"
    if text is None or text == "none":
        return SerialConfig(), []
    if text.startswith("chardev:"):
        return SerialConfig(backend="chardev", chardev=parse_id(opt, "chardev", _nonempty(opt, text, 8))), []
    if text.startswith("file:"):
        return SerialConfig(backend="file", path=parse_path(opt, "path", text[5:])), []
    params = Params(opt, text, head=True)
    chardev = chardev_from_params(params, _SERIAL_CHARDEV)
    if chardev.backend in ("stdio", "file"):
        return SerialConfig(backend=chardev.backend, path=chardev.path), []
    return SerialConfig(backend="chardev", chardev=_SERIAL_CHARDEV), [chardev]


def _nonempty(option: str, text: str, start: int) -> str:
    if text[start:] == "":
        raise ConfigError(option, f"{quote(text)} names nothing after ':'")
    return text[start:]


def _qmp(text: str) -> str:
    """-qmp unix:PATH,server,nowait; StratoVirt requires both switches (it only listens)."""
    opt = "-qmp"
    params = Params(opt, text, head=True)
    uri = params.head
    if uri is None:
        raise ConfigError(opt, "needs a socket first (unix:PATH,server,nowait)")
    if uri.startswith("tcp:"):
        raise ConfigError(opt, "tcp QMP sockets are not supported by pystrato yet")
    if not uri.startswith("unix:"):
        raise ConfigError(opt, f"{quote(uri)} is not a QMP socket (unix:PATH,server,nowait)")
    path = parse_socket_path(opt, "path", uri[5:])
    server, nowait = params.flag("server"), params.flag("nowait")
    params.finish(frozenset({"iothread"}))
    if not server:
        raise ConfigError(opt, "'server' is required: pystrato listens, client-mode QMP is refused")
    if not nowait:
        raise ConfigError(opt, "'nowait' is required, as in StratoVirt")
    return path


def _incoming(text: str) -> str:
    """-incoming file:DIR | tcp:IPV4:PORT | unix:PATH, normalized to a lower-case scheme."""
    opt = "-incoming"
    scheme, colon, rest = text.partition(",")[0].partition(":")
    if "," in text:
        raise ConfigError(opt, f"parameters after the URI ({quote(text.partition(',')[2])}) "
                          "are not supported by pystrato yet")
    scheme = scheme.lower()
    if not colon or scheme not in ("file", "tcp", "unix"):
        if colon and scheme in ("fd", "exec", "rdma", "defer"):
            raise ConfigError(opt, f"{scheme}: URIs are not supported by pystrato yet")
        raise ConfigError(opt, f"{quote(text)} is not file:DIR, tcp:HOST:PORT or unix:PATH")
    if scheme == "file":
        return "file:" + parse_path(opt, "directory", rest)
    if scheme == "unix":
        return "unix:" + parse_socket_path(opt, "path", rest)
    host, colon, port = rest.rpartition(":")
    if not colon or not _tcp_host(host):
        raise ConfigError(opt, f"{quote(rest)} is not HOST:PORT (IPv4, [IPv6], a name, or empty for all)")
    return f"tcp:{host}:{parse_decimal(opt, 'port', port, 1, 65535)}"


def _tcp_host(host: str) -> bool:
    """StratoVirt takes IPv4 only; pystrato also listens on [IPv6], names, and "" (every
    address, QEMU's tcp::PORT) as domain.migration does."""
    if host == "" or re.fullmatch(_IPV4, host) or re.fullmatch(_HOSTNAME, host):
        return True
    if not (host.startswith("[") and host.endswith("]")):
        return False
    try:
        import ipaddress  # rare: only bracketed IPv6 hosts need it

        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        return False
    return True


def _logfile(opts: dict[str, list[str]]) -> str | None:
    if "-D" not in opts:
        return None
    values = opts["-D"]
    return parse_path("-D", "log file", values[0]) if values else ""


def _name(value: str | None) -> str | None:
    if value is not None and not 0 < len(value) <= MAX_STRING_LENGTH:
        raise ConfigError("-name", f"the name must be 1 to {MAX_STRING_LENGTH} characters")
    return value


def _fold_drive_serials(cfg: VmConfig, serials: dict[str, str]) -> VmConfig:
    """Hand a legacy ``-drive ...,serial=`` to the virtio-blk device using that drive."""
    if not serials:
        return cfg
    devices = []
    for device in cfg.devices:
        serial = serials.get(device.drive or "")
        if serial is not None and device.serial not in (None, serial):
            raise ConfigError("-device", f"drive {quote(device.drive or '')} has serial "
                              f"{quote(serial)} but its device says {quote(device.serial or '')}")
        devices.append(device if serial is None else dataclasses.replace(device, serial=serial))
    return dataclasses.replace(cfg, devices=tuple(devices))
