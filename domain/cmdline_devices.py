"""``-device DRIVER,k=v,...``: the drivers pystrato implements, with StratoVirt's property rules.

virtio-mmio drivers (``*-device``) belong to microvm and take no bus/multifunction (StratoVirt:
"Should not set bus"); ``addr=N`` on virtio-blk-device / virtio-net-device picks the replaceable
slot, as QMP device_add does (0 = vda / eth0). PCI drivers belong to q35 and need bus= and
addr=SLOT[.FUNCTION], stored as ``slot << 3 | function``.
"""

from __future__ import annotations

from domain.cmdline_values import (
    MAX_BLK_SERIAL,
    Params,
    parse_host_bdf,
    parse_id,
    parse_mac,
    parse_number,
    parse_pci_addr,
    quote,
)
from domain.config import MICROVM, MICROVM_MAX_BLK, MICROVM_MAX_NET, Q35, DeviceConfig
from domain.errors import ConfigError
from domain.record import record

MMIO = "mmio"
PCI = "pci"
PORT = "virtio-serial port"
ROOT_BUS = "pcie.0"
_PCI_COMMON = frozenset({"bus", "addr", "multifunction"})


@record(frozen=True)
class Driver:
    transport: str
    props: frozenset[str]  # accepted besides id
    required: tuple[str, ...] = ()
    slots: int = 0  # mmio: how many replaceable slots addr= may pick from


DRIVERS: dict[str, Driver] = {
    "virtio-blk-device": Driver(MMIO, frozenset({"drive", "serial", "addr"}), ("drive",), MICROVM_MAX_BLK),
    "virtio-blk-pci": Driver(PCI, _PCI_COMMON | {"drive", "serial"}, ("drive",)),
    "virtio-net-device": Driver(MMIO, frozenset({"netdev", "mac", "addr"}), ("netdev",), MICROVM_MAX_NET),
    "virtio-net-pci": Driver(PCI, _PCI_COMMON | {"netdev", "mac"}, ("netdev",)),
    "virtio-balloon-device": Driver(MMIO, frozenset({"deflate-on-oom", "free-page-reporting"})),
    "virtio-balloon-pci": Driver(PCI, _PCI_COMMON | {"deflate-on-oom", "free-page-reporting"}),
    "pcie-root-port": Driver(PCI, _PCI_COMMON | {"port", "chassis"}, ("id", "port")),
    "vfio-pci": Driver(PCI, _PCI_COMMON | {"host"}, ("id", "host")),
    "virtio-serial-device": Driver(MMIO, frozenset()),
    "virtconsole": Driver(PORT, frozenset({"chardev", "nr"}), ("id", "chardev")),
}
_ALL_PROPS = frozenset({"id"}).union(*(d.props for d in DRIVERS.values()))

# StratoVirt accepts these; pystrato refuses them by name.
UNSUPPORTED_DRIVERS = frozenset({
    "virtio-serial-pci", "virtserialport", "vhost-user-blk-device", "vhost-user-blk-pci",
    "vhost-vsock-device", "vhost-vsock-pci", "virtio-mem-device", "virtio-mem-pci",
    "virtio-pmem-device", "virtio-pmem-pci", "virtio-rng-device", "virtio-rng-pci",
    "virtio-input-device", "virtio-input-pci", "virtio-multitouch-device", "virtio-multitouch-pci",
    "vhost-user-fs-device", "vhost-user-fs-pci", "vhost-user-gpu-pci", "virtio-gpu-pci",
    "virtio-scsi-pci", "scsi-hd", "scsi-cd", "nec-usb-xhci", "usb-kbd", "usb-tablet",
    "usb-consumer", "usb-camera", "usb-storage", "usb-uas", "usb-host", "ramfb", "pvpanic",
    "pcie-demo-dev", "ivshmem-scream",
})
_UNSUPPORTED_PROPS = frozenset({
    "iothread", "rx-iothread", "tx-iothread", "num-queues", "queue-size", "bootindex", "mq",
    "vectors", "auto-balloon", "membuf-percent", "monitor-interval", "sysfsdev", "max-ports",
})
_QMP_NAMES = {"virtio-blk-mmio": "virtio-blk-device", "virtio-net-mmio": "virtio-net-device"}


def parse_device(value: str, machine: str) -> DeviceConfig:
    opt = "-device"
    params = Params(opt, value, head=True)
    name = params.head
    if name is None:
        raise ConfigError(opt, "needs a driver first (e.g. virtio-blk-device,drive=...)")
    if name in UNSUPPORTED_DRIVERS:
        raise ConfigError(opt, f"driver {quote(name)} is not supported by pystrato yet")
    driver = DRIVERS.get(name)
    if driver is None:
        hint = f" (on the command line it is {_QMP_NAMES[name]})" if name in _QMP_NAMES else ""
        raise ConfigError(opt, f"unknown driver {quote(name)}{hint}")
    if driver.transport == PCI and machine != Q35:
        raise ConfigError(opt, f"{name} is a PCI device: it needs -machine q35")
    if driver.transport == MMIO and machine != MICROVM:
        raise ConfigError(opt, f"{name} is a virtio-mmio device: it needs -machine microvm "
                          "(use the -pci driver on q35)")
    _refuse_foreign_props(params, name, driver)

    dev_id = params.take("id")
    if dev_id is None and "id" in driver.required:
        raise ConfigError(opt, f"{name}: id= is required")
    if dev_id is None and machine == Q35:
        raise ConfigError(opt, f"{name}: id= is required on q35 (device_del needs it)")
    if dev_id is not None:
        parse_id(opt, "id", dev_id)
    for key in driver.required:
        if key != "id" and key not in params:
            raise ConfigError(opt, f"{name}: {key}= is required")

    bus, addr, multifunction = _placement(params, name, driver)
    if name == "pcie-root-port" and dev_id == ROOT_BUS:
        raise ConfigError(opt, f"pcie-root-port: id {quote(ROOT_BUS)} is the root bus's name")
    serial = params.take("serial")
    if serial is not None and len(serial) > MAX_BLK_SERIAL:
        raise ConfigError(opt, f"{name}: serial is longer than {MAX_BLK_SERIAL} characters")
    mac = params.take("mac")
    host = params.take("host")
    port = params.take("port")
    chassis = params.take("chassis")
    nr = params.take("nr")
    if nr is not None and parse_number(opt, "nr", nr, 0, 2**32 - 1) != 0:
        raise ConfigError(opt, "virtconsole: nr= must be 0 (virtio-serial-device has one port)")
    config = DeviceConfig(
        driver=name,
        id=dev_id,
        bus=bus,
        addr=addr,
        multifunction=multifunction,
        drive=_name(params, "drive"),
        netdev=_name(params, "netdev"),
        mac=None if mac is None else parse_mac(opt, mac),
        host=None if host is None else parse_host_bdf(opt, host),
        chardev=_name(params, "chardev"),
        port=None if port is None else parse_number(opt, "port", port, 0, 255),
        chassis=None if chassis is None else parse_number(opt, "chassis", chassis, 0, 255),
        deflate_on_oom=params.switch("deflate-on-oom", False),
        free_page_reporting=params.switch("free-page-reporting", False),
        serial=serial,
    )
    params.finish()
    return config


def _refuse_foreign_props(params: Params, name: str, driver: Driver) -> None:
    """Name the first property this driver does not take, before reading any value."""
    for key in params.keys():
        if key == "id" or key in driver.props:
            continue
        if driver.transport == MMIO and key in _PCI_COMMON:
            raise ConfigError("-device", f"{quote(key)} is not allowed for virtio-mmio device {name}")
        if key in _ALL_PROPS:
            raise ConfigError("-device", f"parameter {quote(key)} does not apply to {name}")
        if key in _UNSUPPORTED_PROPS:
            raise ConfigError("-device", f"parameter {quote(key)} of {name} is not supported by pystrato yet")
        raise ConfigError("-device", f"unknown parameter {quote(key)} for {name}")


def _placement(params: Params, name: str, driver: Driver) -> tuple[str | None, int | None, bool]:
    opt = "-device"
    if driver.transport == PCI:
        bus = params.require("bus", f" for {name} ({ROOT_BUS} or a pcie-root-port id)")
        slot, function = parse_pci_addr(opt, params.require("addr", f" for {name} (SLOT[.FUNCTION])"))
        return bus, slot << 3 | function, params.switch("multifunction", False)
    index = params.take("addr")
    if index is None:
        return None, None, False
    return None, parse_number(opt, f"{name} addr", index, 0, driver.slots - 1), False


def _name(params: Params, key: str) -> str | None:
    value = params.take(key)
    return None if value is None else parse_id("-device", key, value)
