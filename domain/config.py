"""The VM configuration as parsed from the StratoVirt-style command line (domain.cmdline).

Frozen plain data. Limits and cross-checks live in domain.cmdline (parse time) so that every
invalid value is refused before anything starts.
"""

from __future__ import annotations

from domain.record import field, record

MICROVM = "microvm"
Q35 = "q35"

ACCEL_KVM = "kvm"
ACCEL_TEST = "test"

# StratoVirt's limits (machine_manager/src/config): vCPUs and memory.
MIN_VCPUS = 1
MAX_VCPUS = 254
MIN_MEMORY = 128 << 20
MAX_MEMORY = 512 << 30

MICROVM_MAX_BLK = 6
MICROVM_MAX_NET = 2


@record(frozen=True)
class CpuTopology:
    cpus: int = 1
    maxcpus: int = 1
    sockets: int = 1
    dies: int = 1
    clusters: int = 1
    cores: int = 1
    threads: int = 1


@record(frozen=True)
class MemoryConfig:
    size: int = 256 << 20  # bytes
    mem_path: str | None = None
    mem_share: bool = False
    hugepages: bool = False
    prealloc: bool = False  # -mem-prealloc: touch every page before the guest starts
    dump_guest_core: bool = True  # -machine dump-guest-core=on|off (MADV_DONTDUMP when off)


@record(frozen=True)
class MachineConfig:
    type: str = MICROVM
    accel: str | None = None  # None: kvm when /dev/kvm opens (decided by the CLI)
    # CPUID features hidden from the guest (-cpu host,-avx2,... ; needed on kvm-pvm hosts).
    hidden_cpu_features: tuple[str, ...] = ()


@record(frozen=True)
class DriveConfig:
    id: str
    file: str
    readonly: bool = False
    direct: bool = True  # StratoVirt's default is direct=on
    format: str = "raw"


@record(frozen=True)
class NetdevConfig:
    id: str
    type: str = "tap"
    ifname: str | None = None
    fd: int | None = None
    vhost: bool = False
    queues: int = 1  # queue pairs (-netdev ...,queues=N)


@record(frozen=True)
class ChardevConfig:
    id: str
    backend: str  # "socket" | "stdio" | "file" | "pty"
    path: str | None = None
    server: bool = False
    nowait: bool = False


@record(frozen=True)
class DeviceConfig:
    driver: str
    id: str | None = None
    bus: str | None = None
    addr: int | None = None  # slot (q35: slot<<3|function as StratoVirt's "0x1.0"), microvm: index
    multifunction: bool = False
    drive: str | None = None
    netdev: str | None = None
    mac: str | None = None
    host: str | None = None  # vfio-pci: "0000:1a:00.3"
    chardev: str | None = None
    port: int | None = None  # pcie-root-port: port number
    chassis: int | None = None
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    serial: str | None = None  # virtio-blk serial number
    extra: tuple[tuple[str, str], ...] = ()


@record(frozen=True)
class SerialConfig:
    backend: str = "none"  # "stdio" | "file" | "none" | "chardev"
    path: str | None = None
    chardev: str | None = None


@record(frozen=True)
class VmConfig:
    machine: MachineConfig = field(default_factory=MachineConfig)
    smp: CpuTopology = field(default_factory=CpuTopology)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    drives: tuple[DriveConfig, ...] = ()
    netdevs: tuple[NetdevConfig, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    chardevs: tuple[ChardevConfig, ...] = ()
    serial: SerialConfig = field(default_factory=SerialConfig)
    qmp: tuple[str, ...] = ()  # unix socket paths
    incoming: str | None = None  # "file:DIR" | "tcp:HOST:PORT" | "unix:PATH"
    logfile: str | None = None  # -D [LOGFILE]; "" means stderr
    pidfile: str | None = None
    daemonize: bool = False
    name: str | None = None
    uuid: str | None = None

    def drive(self, drive_id: str) -> DriveConfig | None:
        return next((d for d in self.drives if d.id == drive_id), None)

    def netdev(self, netdev_id: str) -> NetdevConfig | None:
        return next((n for n in self.netdevs if n.id == netdev_id), None)
