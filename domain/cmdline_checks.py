"""Cross-checks over a whole parsed command line, all before anything starts.

Ids are unique per kind (drives, netdevs, chardevs, devices), as in StratoVirt: the manual's own
examples give a drive and its device the same id (``-drive id=rootfs`` + ``-device ...,id=rootfs``).
Devices are checked in command-line order, like StratoVirt realizes them: a bus or a
virtio-serial-device must come before the devices that use it.
"""

from __future__ import annotations

from collections import Counter

from domain.cmdline_devices import ROOT_BUS
from domain.cmdline_values import quote
from domain.config import (
    MICROVM,
    MICROVM_MAX_BLK,
    MICROVM_MAX_NET,
    Q35,
    DeviceConfig,
    VmConfig,
)
from domain.errors import ConfigError

BLK_DRIVERS = ("virtio-blk-device", "virtio-blk-pci")
NET_DRIVERS = ("virtio-net-device", "virtio-net-pci")
BALLOON_DRIVERS = ("virtio-balloon-device", "virtio-balloon-pci")


def check_config(cfg: VmConfig) -> None:
    _unique_ids(cfg)
    _shared_drive_files(cfg)
    _backend_references(cfg, "-drive", "drive", BLK_DRIVERS, [d.id for d in cfg.drives])
    _backend_references(cfg, "-netdev", "netdev", NET_DRIVERS, [n.id for n in cfg.netdevs])
    _singletons(cfg)
    if cfg.machine.type == MICROVM:
        _microvm_slots(cfg)
    if cfg.machine.type == Q35:
        _pci_topology(cfg.devices)
    _virtio_serial(cfg.devices)
    _chardev_users(cfg)
    _stdio(cfg)
    _incoming(cfg)
    # The test hypervisor's guest idles without code, so a management stack can be exercised
    # without a kernel image; on KVM a guest needs something to run.
    if cfg.kernel is None and cfg.machine.accel != "test":
        raise ConfigError("-kernel", f"a kernel is required for the {cfg.machine.type} machine")
    duplicate = _first_duplicate(cfg.qmp)
    if duplicate is not None:
        raise ConfigError("-qmp", f"socket {quote(duplicate)} is given twice")


def _first_duplicate(values) -> str | None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _unique_ids(cfg: VmConfig) -> None:
    for option, ids in (
        ("-drive", [d.id for d in cfg.drives]),
        ("-netdev", [n.id for n in cfg.netdevs]),
        ("-chardev", [c.id for c in cfg.chardevs]),
        ("-device", [d.id for d in cfg.devices if d.id is not None]),
    ):
        duplicate = _first_duplicate(ids)
        if duplicate is not None:
            raise ConfigError(option, f"id {quote(duplicate)} is used twice")


def _shared_drive_files(cfg: VmConfig) -> None:
    """StratoVirt: a file "can only be shared with read_only" (paths compared as written)."""
    by_file: dict[str, str] = {}
    for drive in cfg.drives:
        other = by_file.get(drive.file)
        if other is not None and not (drive.readonly and cfg.drive(other).readonly):
            raise ConfigError("-drive", f"drives {quote(other)} and {quote(drive.id)} share file "
                              f"{quote(drive.file)}; a file can only be shared read-only")
        by_file.setdefault(drive.file, drive.id)


def _backend_references(cfg, option: str, key: str, drivers: tuple[str, ...], ids: list[str]) -> None:
    users: dict[str, str] = {}
    for device in cfg.devices:
        if device.driver not in drivers:
            continue
        ref = getattr(device, key)
        if ref not in ids:
            raise ConfigError("-device", f"{device.driver} {key}={quote(ref)} names no {option}")
        if ref in users:
            raise ConfigError("-device", f"{key} {quote(ref)} is used by two devices")
        users[ref] = device.driver
    for backend_id in ids:
        if backend_id not in users:
            raise ConfigError(option, f"{key} {quote(backend_id)} is not used by any device")


def _singletons(cfg: VmConfig) -> None:
    counts = Counter(d.driver for d in cfg.devices)
    if sum(counts[d] for d in BALLOON_DRIVERS) > 1:
        raise ConfigError("-device", "only one balloon device is supported for each VM")
    if counts["virtio-serial-device"] > 1:
        raise ConfigError("-device", "only one virtio-serial-device is supported")
    if counts["virtconsole"] > 1:
        raise ConfigError("-device", "only one virtconsole: virtio-serial-device has one port")


def _microvm_slots(cfg: VmConfig) -> None:
    for driver, limit in (("virtio-blk-device", MICROVM_MAX_BLK), ("virtio-net-device", MICROVM_MAX_NET)):
        devices = [d for d in cfg.devices if d.driver == driver]
        if len(devices) > limit:
            raise ConfigError("-device", f"{len(devices)} {driver}s: microvm has {limit} slots")
        taken: set[int] = set()
        for device in devices:
            if device.addr in taken:
                raise ConfigError("-device", f"two {driver}s at addr={device.addr:#x}")
            if device.addr is not None:
                taken.add(device.addr)


def _pci_topology(devices: tuple[DeviceConfig, ...]) -> None:
    """Buses exist before use, root ports hang off pcie.0, one device per bus+devfn, and
    StratoVirt's multifunction rule: function 0 without multifunction=on owns its slot."""
    buses = {ROOT_BUS}
    placed: dict[tuple[str, int], DeviceConfig] = {}
    for device in devices:
        if device.bus is None or device.addr is None:
            continue
        where = f"{device.driver} {quote(device.id or '')}"
        if device.bus not in buses:
            raise ConfigError("-device", f"{where}: bus {quote(device.bus)} is neither {ROOT_BUS} "
                              "nor a pcie-root-port defined before it")
        if device.driver == "pcie-root-port" and device.bus != ROOT_BUS:
            raise ConfigError("-device", f"{where}: a pcie-root-port must be on {ROOT_BUS}")
        slot, function = device.addr >> 3, device.addr & 7
        if device.bus != ROOT_BUS and slot != 0:
            raise ConfigError("-device", f"{where}: a pcie-root-port's bus has only slot 0, "
                              f"not addr={slot:#x}.{function}")
        key = (device.bus, device.addr)
        if key in placed:
            raise ConfigError("-device", f"{where}: {device.bus} addr={slot:#x}.{function} is "
                              f"already used by {quote(placed[key].id or placed[key].driver)}")
        first = placed.get((device.bus, slot << 3))
        if function != 0 and first is not None and not first.multifunction:
            raise ConfigError("-device", f"{where}: {device.bus} {slot:#x}.0 is a single-function "
                              f"device, so {slot:#x}.{function} cannot be populated")
        if function == 0 and not device.multifunction:
            busy = [k for k in placed if k[0] == device.bus and k[1] >> 3 == slot]
            if busy:
                raise ConfigError("-device", f"{where}: {slot:#x}.0 without multifunction=on, but "
                                  f"{device.bus} slot {slot:#x} already has other functions")
        placed[key] = device
        if device.driver == "pcie-root-port":
            buses.add(device.id or "")


def _virtio_serial(devices: tuple[DeviceConfig, ...]) -> None:
    have_serial = False
    for device in devices:
        have_serial = have_serial or device.driver == "virtio-serial-device"
        if device.driver == "virtconsole" and not have_serial:
            raise ConfigError("-device", f"virtconsole {quote(device.id or '')} needs a "
                              "-device virtio-serial-device before it")


def _chardev_users(cfg: VmConfig) -> None:
    """Every chardev reference resolves, and a chardev has one user (StratoVirt takes it)."""
    ids = {c.id for c in cfg.chardevs}
    users: list[tuple[str, str]] = [("-device", d.chardev) for d in cfg.devices if d.chardev is not None]
    if cfg.serial.backend == "chardev" and cfg.serial.chardev is not None:
        users.append(("-serial", cfg.serial.chardev))
    seen: set[str] = set()
    for option, chardev in users:
        if chardev not in ids:
            raise ConfigError(option, f"chardev {quote(chardev)} is not defined by any -chardev")
        if chardev in seen:
            raise ConfigError(option, f"chardev {quote(chardev)} is already in use")
        seen.add(chardev)


def _stdio(cfg: VmConfig) -> None:
    count = sum(c.backend == "stdio" for c in cfg.chardevs) + (cfg.serial.backend == "stdio")
    if count > 1:
        raise ConfigError("-chardev", "only one device can be redirected to stdio")
    if count and cfg.daemonize:
        raise ConfigError("-daemonize", "a device redirected to stdio and -daemonize exclude each other")


def _incoming(cfg: VmConfig) -> None:
    """The manual's exclusions (vhost-net, vfio, balloon, mem-share, mem-path...) forbid a
    restore or an incoming migration too; domain.migration owns the list."""
    if cfg.incoming is None:
        return
    from domain.migration import (  # only with -incoming
        migration_blockers,
        snapshot_blockers,
    )

    file = cfg.incoming.startswith("file:")
    blockers = snapshot_blockers(cfg) if file else migration_blockers(cfg)
    if blockers:
        what = "restore a snapshot into" if file else "migrate into"
        raise ConfigError("-incoming", f"cannot {what} a VM with {', '.join(blockers)}")
