"""Composition root: the dependency-injector container that picks the adapters.

`-accel kvm|test` selects the hypervisor (and, for test, the fake guest's cooperative drivers).
Tests override providers (container.hypervisor.override(...)) instead of patching modules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from dependency_injector import containers, providers

from domain.config import ACCEL_KVM, ACCEL_TEST, VmConfig
from domain.errors import ConfigError, HostResourceError
from domain.lifecycle import RunState

log = logging.getLogger("pystrato")


def _kvm_hypervisor():
    from adapters.kvm.hypervisor import KvmHypervisor

    return KvmHypervisor()


def _fake_hypervisor():
    from adapters.fake.hypervisor import FakeHypervisor

    return FakeHypervisor()


def _fake_agent():
    from adapters.fake.guest import FakeGuestAgent

    return FakeGuestAgent()


def _allocator(huge_pages: bool):
    from adapters.host.memory import MmapAllocator

    return MmapAllocator(huge_pages=huge_pages)


def _block_opener():
    from adapters.storage.block import RawImageOpener

    return RawImageOpener()


def _net_opener():
    from adapters.net.tap import TapOpener

    return TapOpener()


def _chardev_opener():
    from adapters.chardev import ChardevOpener

    return ChardevOpener()


def _vfio_manager(memory):
    from adapters.vfio import VfioManager

    return VfioManager(memory)


def _poller():
    from adapters.host.poller import EpollPoller

    return EpollPoller()


def _zero_scanner():
    from adapters.migration.zero_scan import PagemapZeroScanner

    return PagemapZeroScanner()


def _snapshot_store(zero_scanner):
    from adapters.storage.snapshot_store import FileSnapshotStore

    return FileSnapshotStore(zero_scanner)


def _migration_channels():
    from adapters.migration.channels import SocketChannelFactory

    return SocketChannelFactory()


def host_probe():
    from adapters.host.probe import HostProbe

    return HostProbe()


class Container(containers.DeclarativeContainer):
    accel = providers.Object(ACCEL_KVM)
    hypervisor = providers.Selector(
        accel,
        kvm=providers.Singleton(_kvm_hypervisor),
        test=providers.Singleton(_fake_hypervisor),
    )
    guest_agent = providers.Selector(
        accel,
        kvm=providers.Object(None),
        test=providers.Singleton(_fake_agent),
    )
    # Guest RAM asks for transparent huge pages, as QEMU's does: KVM maps it with 2 MiB pages
    # where the host has them, and on either hypervisor a migration destination filling fresh
    # RAM takes one fault per 2 MiB instead of 512 (256 MiB fully written, -accel test:
    # 211-267 -> 115-130 ms in most runs).
    allocator = providers.Singleton(_allocator, True)
    block_opener = providers.Singleton(_block_opener)
    net_opener = providers.Singleton(_net_opener)
    chardev_opener = providers.Singleton(_chardev_opener)
    probe = providers.Singleton(host_probe)
    poller = providers.Singleton(_poller)
    zero_scanner = providers.Singleton(_zero_scanner)
    snapshot_store = providers.Singleton(_snapshot_store, zero_scanner)
    migration_channels = providers.Singleton(_migration_channels)


def choose_accel(config: VmConfig) -> str:
    accel = config.machine.accel
    if accel in (ACCEL_KVM, ACCEL_TEST):
        if accel == ACCEL_KVM:
            _require_kvm()
        return accel
    _require_kvm(hint=True)
    return ACCEL_KVM


def _require_kvm(hint: bool = False) -> None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        extra = " (use -accel test for the in-memory test hypervisor)" if hint else ""
        raise ConfigError("-accel", f"cannot open /dev/kvm: {e.strerror}{extra}") from None
    os.close(fd)


class Runtime:
    """One VMM process: the VM, its QMP servers, and the background services."""

    def __init__(self, config: VmConfig, container: Container):
        self.config = config
        self.container = container
        self.vm = None
        self.servers: list = []
        self.events = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.migration = None
        self._serial_chardev = None  # -serial chardev:ID / socket: its backend, for input

    async def start(self, loop, request_exit) -> None:
        from adapters.qmp.events import QmpEventBroadcaster

        self.loop = loop
        self.events = QmpEventBroadcaster(loop)
        self._request_exit = request_exit
        self._build_vm()
        await self._start_qmp()
        self._start_vm()

    def _build_vm(self) -> None:
        from application.devices import DeviceManager
        from application.vm import VirtualMachine

        c, cfg = self.container, self.config
        memory_file = None
        records = None
        if cfg.incoming and cfg.incoming.startswith("file:"):
            from application.services.snapshot import load_snapshot

            records, memory_file = load_snapshot(cfg.incoming[5:], cfg, c.hypervisor().kind,
                                                 c.snapshot_store())
        console, self._serial_chardev = _console_output(cfg, c.chardev_opener())
        devices = DeviceManager(
            cfg, block_opener=c.block_opener(), net_opener=c.net_opener(), probe=c.probe(),
            poller=c.poller(), guest_agent=c.guest_agent(), console_write=console,
            emit=self.events.emit, read_file=_read_file,
            discard=getattr(c.allocator(), "discard", None), chardevs=c.chardev_opener(),
            # VFIO maps guest RAM for device DMA: the lambda reads it once realize() allocated it.
            vfio=_Lazy(lambda: _vfio_manager(lambda: devices.memory)))
        self.vm = VirtualMachine(cfg, hypervisor=c.hypervisor(), allocator=c.allocator(),
                                 events=self.events, devices=devices,
                                 request_exit=self._request_exit, memory_file=memory_file)
        try:
            self.vm.build()
        except BaseException:
            self._release_quietly()
            raise
        self._records = records

    async def _start_qmp(self) -> None:
        from adapters.qmp.commands import standard_table
        from adapters.qmp.schema import Schema, opt, req
        from adapters.qmp.server import QmpServer
        from application.guest_test_control import GuestTestControl
        from application.management import Management

        c = self.container
        self.migration = _Lazy(self._migration_service)
        self.api = Management(self.vm, migration=self.migration, guest_agent=c.guest_agent())
        table = standard_table()
        ctl = GuestTestControl(self.vm, write_file=_write_file,
                               populated_runs=getattr(c.zero_scanner(), "populated_runs", None))
        table.register("x-query-memory-digest", Schema(), lambda api, a: ctl.memory_digest())
        table.register("pmemsave", Schema(req("val", "int"), req("size", "int"), req("filename", "str")),
                       lambda api, a: ctl.pmemsave(a["val"], a["size"], a["filename"]))
        if c.accel() == ACCEL_TEST:
            table.register("x-guest-touch", Schema(req("pages", "int"), opt("seed", "int")),
                           lambda api, a: ctl.touch(a["pages"], a.get("seed", 0)))
        for path in self.config.qmp:
            srv = QmpServer(path, table, self.api, events=self.events)
            await srv.start()
            self.servers.append(srv)

    def _migration_service(self):
        from application.services.migration import MigrationFacade

        c = self.container
        return MigrationFacade(self.vm, store=c.snapshot_store(), channels=c.migration_channels(),
                               zero_scanner=c.zero_scanner(), log=logging.getLogger("pystrato.migration"))

    def _start_vm(self) -> None:
        cfg = self.config
        if cfg.incoming and not cfg.incoming.startswith("file:"):
            self.vm.start(None)  # vCPUs parked until the migration completes
            self.migration.incoming(cfg.incoming)
        elif self._records is not None:
            self.vm.start(None)
            self.migration.snapshots.restore(self._records, start=True)
        else:
            self.vm.start(RunState.RUNNING)
        if cfg.serial.backend == "stdio":
            _start_stdin_reader(self.vm)
        elif self._serial_chardev is not None:
            serial = getattr(self.vm.devices.platform, "serial", None)
            if serial is not None:
                serial.on_room = self._serial_chardev.input_ready
                self._serial_chardev.start(serial.offer_input)

    def on_signal(self) -> None:
        if self.vm is not None:
            self.vm.shutdown(guest=False, reason="host-signal")
        else:
            self._request_exit(0)

    async def abort(self) -> None:
        for s in self.servers:
            await s.close()
        self._release_quietly()

    async def finish(self) -> None:
        if self.migration is not None and self.migration.built:
            self.migration.shutdown()
        # Let queued events (SHUTDOWN) reach the clients before the sockets close.
        await asyncio.sleep(0)
        for s in self.servers:
            await s.close()
        self._release_quietly()

    def _release_quietly(self) -> None:
        if self.vm is None:
            return
        try:
            for r in self.vm.runners:
                r.stop(timeout=1.0)
            self.vm.release()
        except Exception:
            log.exception("teardown failed")
        finally:
            self.container.chardev_opener().close()


class _Lazy:
    """Builds its target on first use: the migration engine costs start-up time that a VM which
    never migrates should not pay."""

    def __init__(self, factory):
        self._factory = factory
        self._target = None

    @property
    def built(self) -> bool:
        return self._target is not None

    @property
    def target(self):
        if self._target is None:
            self._target = self._factory()
        return self._target

    def __getattr__(self, name):
        return getattr(self.target, name)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read '{path}': {e.strerror}") from None


def _write_file(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise HostResourceError(f"cannot write '{path}': {e.strerror}") from None


def _console_output(cfg: VmConfig, chardevs):
    """(write function for the serial's output, the chardev it uses or None)."""
    s = cfg.serial
    if s.backend == "stdio":
        out = sys.stdout.buffer

        def write(data: bytes) -> None:
            out.write(data)
            out.flush()

        return write, None
    if s.backend == "file":
        f = open(s.path, "ab", buffering=0)
        return f.write, None
    if s.backend == "chardev":
        chardev = next(c for c in cfg.chardevs if c.id == s.chardev)  # the parser checked the id
        backend = chardevs.open(chardev)
        return backend.write, backend
    return None, None


def _start_stdin_reader(vm) -> None:
    import threading

    serial = getattr(vm.devices.platform, "serial", None)
    if serial is None or not sys.stdin or sys.stdin.closed:
        return

    def pump():
        fd = sys.stdin.fileno()
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            serial.enqueue_input(data)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


def build_runtime(config: VmConfig) -> Runtime:
    container = Container()
    accel = choose_accel(config)
    container.accel.override(accel)
    container.hypervisor()  # opens /dev/kvm now: a missing capability fails before anything starts
    return Runtime(config, container)
