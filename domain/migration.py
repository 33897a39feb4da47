"""Snapshot and live-migration rules: the status machine, what forbids them, what must match.

Pure: the services feed in figures and times; nothing here reads a clock or touches a file.
Status names are the manual's (none/setup/active/completed/failed) plus QEMU's cancelling and
cancelled for migrate_cancel; the progress figures follow QEMU's MigrationInfo/MigrationStats.
"""

from __future__ import annotations

import enum
import json
import threading
from dataclasses import fields
from typing import Any, Callable

from domain.config import VmConfig
from domain.errors import (
    IncompatibleConfigError,
    InvalidArgumentError,
    InvalidStateError,
    SnapshotFormatError,
)
from domain.memory import PAGE_SIZE, GuestMemory
from domain.record import field, record


class MigrationStatus(str, enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


M = MigrationStatus
_TERMINAL = frozenset({M.NONE, M.COMPLETED, M.FAILED, M.CANCELLED})
_TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    M.NONE: frozenset({M.SETUP}),
    M.SETUP: frozenset({M.ACTIVE, M.FAILED, M.CANCELLING}),
    M.ACTIVE: frozenset({M.COMPLETED, M.FAILED, M.CANCELLING}),
    # A cancel that meets a broken connection still ends; a committed completion cannot be
    # cancelled (MigrationState.commit), so cancelling never leads to completed.
    M.CANCELLING: frozenset({M.CANCELLED, M.FAILED}),
    # A finished job leaves its result visible until the next one starts.
    M.COMPLETED: frozenset({M.SETUP}),
    M.FAILED: frozenset({M.SETUP}),
    M.CANCELLED: frozenset({M.SETUP}),
}

KIND_SNAPSHOT = "snapshot"
KIND_MIGRATION = "migration"
KIND_INCOMING = "incoming"


def can_transition(src: MigrationStatus, dst: MigrationStatus) -> bool:
    return dst in _TRANSITIONS[src]


@record
class MigrationStats:
    """Figures of the current job, QEMU's names in query_migrate_info(). Times in ms."""

    total: int = 0  # bytes of guest RAM
    transferred: int = 0  # bytes put on the wire (page data and headers)
    remaining: int = 0  # dirty bytes still to send
    duplicate: int = 0  # zero pages (sent as a flag, or skipped)
    normal: int = 0  # pages sent with data
    dirty_pages_rate: int = 0  # pages per second the guest dirtied in the last round
    mbps: float = 0.0
    dirty_sync_count: int = 0  # dirty-log reads (rounds)
    setup_time: int = 0
    total_time: int = 0
    downtime: int = 0
    expected_downtime: int = 0


class MigrationState:
    """Thread-safe holder of one VM's snapshot/migration status and figures.

    The QMP thread reads it (query-migrate) and cancels; one worker thread drives it.
    ``listener`` (optional) is called with each new status outside the lock, e.g. to emit
    a MIGRATION event.
    """

    def __init__(self, listener: Callable[[MigrationStatus], None] | None = None):
        self._lock = threading.Lock()
        self._status = MigrationStatus.NONE
        self._kind = KIND_MIGRATION
        self._stats = MigrationStats()
        self._error: str | None = None
        self._committed = False
        self._listener = listener

    @property
    def status(self) -> MigrationStatus:
        return self._status

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def error(self) -> str | None:
        return self._error

    def in_progress(self) -> bool:
        return self._status not in _TERMINAL

    def check_idle(self) -> None:
        """Refuse a new job while one runs (before anything else is looked at)."""
        st = self._status
        if st not in _TERMINAL:
            raise InvalidStateError(
                f"a migration or snapshot is already in progress (status '{st.value}')")

    def begin(self, kind: str) -> None:
        """Start a new job (-> setup). Refused while another one runs."""
        with self._lock:
            self.check_idle()
            self._kind = kind
            self._stats = MigrationStats(total=0)
            self._error = None
            self._committed = False
            self._set(MigrationStatus.SETUP)
        self._notify(MigrationStatus.SETUP)

    def transition(self, dst: MigrationStatus) -> None:
        with self._lock:
            self._set(dst)
        self._notify(dst)

    def activate(self) -> bool:
        """setup -> active, unless a cancel came first (then False: the job must wind up)."""
        with self._lock:
            if self._status is not MigrationStatus.SETUP:
                return False
            self._set(MigrationStatus.ACTIVE)
        self._notify(MigrationStatus.ACTIVE)
        return True

    def fail(self, reason: str) -> None:
        """End the running job as failed (no-op when it already ended)."""
        with self._lock:
            if self._status in _TERMINAL:
                return
            self._error = reason
            self._set(MigrationStatus.FAILED)
        self._notify(MigrationStatus.FAILED)

    def request_cancel(self) -> bool:
        """migrate_cancel: setup/active -> cancelling unless the job passed its point of no
        return (commit). Returns whether the job will be cancelled."""
        with self._lock:
            if self._status not in (MigrationStatus.SETUP, MigrationStatus.ACTIVE) or self._committed:
                return False
            self._set(MigrationStatus.CANCELLING)
        self._notify(MigrationStatus.CANCELLING)
        return True

    @property
    def cancel_requested(self) -> bool:
        return self._status is MigrationStatus.CANCELLING

    def commit(self) -> bool:
        """Point of no return (the destination may start running). False when a cancel won."""
        with self._lock:
            if self._status is not MigrationStatus.ACTIVE:
                return False
            self._committed = True
            return True

    def update(self, **figures: Any) -> None:
        with self._lock:
            for name, value in figures.items():
                if not hasattr(self._stats, name):
                    raise AttributeError(name)
                setattr(self._stats, name, value)

    def stats(self) -> MigrationStats:
        with self._lock:
            return MigrationStats(**{f.name: getattr(self._stats, f.name) for f in fields(MigrationStats)})

    def query_migrate_info(self) -> dict:
        """query-migrate's reply. The status alone before and after a snapshot, exactly as the
        manual shows, and on the destination side; QEMU's progress figures while a snapshot
        is written and during and after a live migration."""
        with self._lock:
            st, s, kind, err = self._status, self._stats, self._kind, self._error
            info: dict[str, Any] = {"status": st.value}
            if st is MigrationStatus.FAILED and err:
                info["error-desc"] = err
            shown = {KIND_MIGRATION: (M.ACTIVE, M.CANCELLING, M.COMPLETED),
                     KIND_SNAPSHOT: (M.ACTIVE, M.CANCELLING)}.get(kind, ())
            if st not in shown:
                return info
            info["total-time"] = s.total_time
            info["setup-time"] = s.setup_time
            if st is M.COMPLETED:
                info["downtime"] = s.downtime
            else:
                info["expected-downtime"] = s.expected_downtime
            info["ram"] = {
                "total": s.total,
                "transferred": s.transferred,
                "remaining": s.remaining,
                "duplicate": s.duplicate,
                "normal": s.normal,
                "normal-bytes": s.normal * PAGE_SIZE,
                "dirty-pages-rate": s.dirty_pages_rate,
                "mbps": round(s.mbps, 3),
                "dirty-sync-count": s.dirty_sync_count,
                "page-size": PAGE_SIZE,
            }
            return info

    def _set(self, dst: MigrationStatus) -> None:
        if not can_transition(self._status, dst):
            raise InvalidStateError(
                f"migration cannot go from '{self._status.value}' to '{dst.value}'")
        self._status = dst

    def _notify(self, st: MigrationStatus) -> None:
        if self._listener is not None:
            self._listener(st)


# ---------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------


@record(frozen=True)
class MigrationUri:
    scheme: str  # "file" | "tcp" | "unix"
    path: str = ""  # file: directory, unix: socket path
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.scheme}:{self.path}"


def parse_migration_uri(uri: str) -> MigrationUri:
    """'file:DIR', 'tcp:HOST:PORT' (HOST may be [v6]), 'unix:PATH'."""
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise InvalidArgumentError(f"invalid migration URI '{uri}': expected file:, tcp: or unix:")
    if scheme in ("file", "unix"):
        return MigrationUri(scheme, path=rest)
    if scheme == "tcp":
        # An empty host ("tcp::4446", as QEMU allows for -incoming) listens on every address.
        host, sep, port_s = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
            raise InvalidArgumentError(f"invalid migration URI '{uri}': expected tcp:HOST:PORT")
        return MigrationUri("tcp", host=host, port=int(port_s))
    raise InvalidArgumentError(f"invalid migration URI '{uri}': unsupported scheme '{scheme}'")


# ---------------------------------------------------------------------------------------------
# Exclusion rules (the manual's 互斥特性 / 约束与限制)
# ---------------------------------------------------------------------------------------------


def _common_blockers(config: VmConfig) -> list[str]:
    out: list[str] = []
    for nd in config.netdevs:
        if nd.vhost:
            out.append(f"vhost-net netdev '{nd.id}'")
        if nd.type.startswith("vhost-user"):
            out.append(f"vhost-user-net netdev '{nd.id}'")
    for d in config.devices:
        name = d.id or d.driver
        if d.driver.startswith("vfio"):
            out.append(f"vfio device '{name}'")
        elif "balloon" in d.driver:
            out.append(f"balloon device '{name}'")
        elif d.driver.startswith("vhost-user-net"):
            out.append(f"vhost-user-net device '{name}'")
    if config.memory.hugepages:
        out.append("huge pages")
    if config.memory.mem_share:
        out.append("shared memory (mem-share=on)")
    if config.memory.mem_path:
        out.append(f"memory backend file (mem-path={config.memory.mem_path})")
    return out


def snapshot_blockers(config: VmConfig) -> list[str]:
    """Configured devices/features that forbid a memory snapshot or a restore from one."""
    return _common_blockers(config)


def migration_blockers(config: VmConfig) -> list[str]:
    """Configured devices/features that forbid a live migration. Shared backend storage is
    not visible in the configuration; the VM reports it through MigratableVm.migration_blockers."""
    return _common_blockers(config)


def merge_blockers(*lists: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for lst in lists:
        for b in lst:
            seen.setdefault(b, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------
# Compatibility (the manual: MAC addresses, BDFs, smp, memory must match)
# ---------------------------------------------------------------------------------------------


_SMP_FIELDS = ("cpus", "maxcpus", "sockets", "dies", "clusters", "cores", "threads")
_DEV_FIELDS = ("driver", "bus", "addr", "mac", "multifunction", "port", "chassis")
_MAX_DEVICES = 4096


@record(frozen=True)
class DeviceFingerprint:
    key: str  # the id, or "driver#n" for the n-th id-less device of that driver
    driver: str
    bus: str | None = None
    addr: int | None = None
    mac: str | None = None
    multifunction: bool = False
    port: int | None = None
    chassis: int | None = None


@record(frozen=True)
class ConfigFingerprint:
    """What source and destination must agree on, derived from the configuration alone
    (host-side details such as image paths and tap names may differ)."""

    hypervisor: str
    machine: str
    smp: tuple[int, ...]  # _SMP_FIELDS order
    memory: int
    cpu_hidden: tuple[str, ...] = ()
    devices: tuple[DeviceFingerprint, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "hypervisor": self.hypervisor,
            "machine": self.machine,
            "smp": list(self.smp),
            "memory": self.memory,
            "cpu-hidden": list(self.cpu_hidden),
            "devices": [
                {"key": d.key, **{f: getattr(d, f) for f in _DEV_FIELDS}} for d in self.devices
            ],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ConfigFingerprint":
        """Parse an untrusted fingerprint (snapshot header, HELLO)."""
        try:
            d = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise SnapshotFormatError("configuration fingerprint is not valid JSON") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> "ConfigFingerprint":
        def bad(what: str) -> SnapshotFormatError:
            return SnapshotFormatError(f"configuration fingerprint: invalid {what}")

        def want(v: Any, typ: type | tuple, what: str) -> Any:
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise bad(what)
            return v

        want(d, dict, "object")
        smp = want(d.get("smp"), list, "smp")
        if len(smp) != len(_SMP_FIELDS) or any(type(x) is not int for x in smp):
            raise bad("smp")
        hidden = want(d.get("cpu-hidden", []), list, "cpu-hidden")
        if any(not isinstance(x, str) for x in hidden):
            raise bad("cpu-hidden")
        devs = want(d.get("devices"), list, "devices")
        if len(devs) > _MAX_DEVICES:
            raise bad("devices (too many)")
        devices = []
        for dv in devs:
            want(dv, dict, "device")
            key = want(dv.get("key"), str, "device key")
            driver = want(dv.get("driver"), str, "device driver")
            opt = {}
            for f, typ in (("bus", str), ("addr", int), ("mac", str), ("port", int), ("chassis", int)):
                v = dv.get(f)
                if v is not None:
                    want(v, typ, f"device {f}")
                opt[f] = v
            mf = want(dv.get("multifunction", False), bool, "device multifunction")
            devices.append(DeviceFingerprint(key, driver, multifunction=mf, **opt))
        return cls(
            hypervisor=want(d.get("hypervisor"), str, "hypervisor"),
            machine=want(d.get("machine"), str, "machine"),
            smp=tuple(smp),
            memory=want(d.get("memory"), int, "memory"),
            cpu_hidden=tuple(hidden),
            devices=tuple(devices),
        )


def config_fingerprint(config: VmConfig, hypervisor_kind: str) -> ConfigFingerprint:
    counts: dict[str, int] = {}
    devices = []
    for d in config.devices:
        if d.id:
            key = d.id
        else:
            n = counts.get(d.driver, 0)
            counts[d.driver] = n + 1
            key = f"{d.driver}#{n}"
        devices.append(DeviceFingerprint(
            key=key, driver=d.driver, bus=d.bus, addr=d.addr,
            mac=d.mac.lower() if d.mac else None, multifunction=d.multifunction,
            port=d.port, chassis=d.chassis))
    return ConfigFingerprint(
        hypervisor=hypervisor_kind,
        machine=config.machine.type,
        smp=tuple(getattr(config.smp, f) for f in _SMP_FIELDS),
        memory=config.memory.size,
        cpu_hidden=tuple(sorted(config.machine.hidden_cpu_features)),
        devices=tuple(devices),
    )


def _fmt(field_name: str, v: Any) -> str:
    if v is None:
        return "none"
    if field_name == "addr" and isinstance(v, int):
        return f"{v >> 3:#x}.{v & 7}"
    return str(v)


def compatibility_differences(src: ConfigFingerprint, dst: ConfigFingerprint) -> list[str]:
    diffs: list[str] = []
    if src.hypervisor != dst.hypervisor:
        diffs.append(f"hypervisor differs: source {src.hypervisor}, destination {dst.hypervisor}")
    if src.machine != dst.machine:
        diffs.append(f"machine type differs: source {src.machine}, destination {dst.machine}")
    if src.smp != dst.smp:
        def smp(t: tuple[int, ...]) -> str:
            return ",".join(f"{k}={v}" for k, v in zip(_SMP_FIELDS, t))
        diffs.append(f"smp differs: source {smp(src.smp)}, destination {smp(dst.smp)}")
    if src.memory != dst.memory:
        diffs.append(f"memory size differs: source {src.memory}, destination {dst.memory}")
    if src.cpu_hidden != dst.cpu_hidden:
        diffs.append(f"hidden CPU features differ: source [{','.join(src.cpu_hidden)}], "
                     f"destination [{','.join(dst.cpu_hidden)}]")
    s_by = {d.key: d for d in src.devices}
    d_by = {d.key: d for d in dst.devices}
    for key, sd in s_by.items():
        dd = d_by.get(key)
        if dd is None:
            diffs.append(f"device '{key}' ({sd.driver}) is missing on the destination")
            continue
        for f in _DEV_FIELDS:
            a, b = getattr(sd, f), getattr(dd, f)
            if a != b:
                diffs.append(f"device '{key}' {f} differs: source {_fmt(f, a)}, destination {_fmt(f, b)}")
    for key, dd in d_by.items():
        if key not in s_by:
            diffs.append(f"device '{key}' ({dd.driver}) is not on the source")
    if not diffs:
        s_order = [d.key for d in src.devices]
        d_order = [d.key for d in dst.devices]
        if s_order != d_order:
            # microvm hands out transport slots in command-line order.
            diffs.append(f"device order differs: source {','.join(s_order)}, destination {','.join(d_order)}")
    return diffs


def check_compatible(src: ConfigFingerprint, dst: ConfigFingerprint) -> None:
    diffs = compatibility_differences(src, dst)
    if diffs:
        raise IncompatibleConfigError("; ".join(diffs))


# ---------------------------------------------------------------------------------------------
# Integrity
# ---------------------------------------------------------------------------------------------


def memory_digest(memory: GuestMemory) -> bytes:
    """SHA-256 over guest RAM, region by region (address and size included), so the digest of
    a migrated or restored VM can be compared with the source's at the moment it paused."""
    import hashlib  # only verify and the test helpers digest memory

    h = hashlib.sha256()
    for r in memory.regions:
        h.update(r.gpa.to_bytes(8, "little") + r.size.to_bytes(8, "little"))
        h.update(r.view)
    return h.digest()
