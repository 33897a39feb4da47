"""Device manager: the buses, the platform devices, virtio devices and their backends.

Cold-plugged (command line) and hot-plugged (QMP) devices go through the same paths. On microvm
every replaceable virtio-mmio slot gets its transport at start (StratoVirt's design): the guest
sees them all on its command line, and hot-plug fills or empties a slot's backend.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from domain.config import MICROVM, DeviceConfig, VmConfig
from domain.devices.bus import Bus
from domain.devices.virtio.device import VirtioDevice
from domain.errors import (
    DeviceNotActiveError,
    DeviceNotFoundError,
    HostResourceError,
    InvalidArgumentError,
    VmmError,
)
from domain.events import BalloonChanged, DeviceDeleted
from domain.memory import GuestMemory
from domain.ports import (
    BlockOpener,
    CharBackendOpener,
    HostProbe,
    HvVm,
    IoPoller,
    NetOpener,
)
from domain.record import field, record
from domain.topology import BLK, NET, DeviceTopology, NamedRegistry, Placement

log = logging.getLogger("pystrato.devices")

BLK_DRIVERS_MMIO = ("virtio-blk-device", "virtio-blk-mmio")
NET_DRIVERS_MMIO = ("virtio-net-device", "virtio-net-mmio")
BLK_DRIVERS_PCI = ("virtio-blk-pci",)
NET_DRIVERS_PCI = ("virtio-net-pci",)
BALLOON_DRIVERS = ("virtio-balloon-device", "virtio-balloon-pci", "virtio-balloon-mmio")
VFIO_DRIVERS = ("vfio-pci",)


@record
class BlockNode:
    node_name: str
    path: str
    readonly: bool
    direct: bool
    backend: Any


@record
class NetNode:
    id: str
    ifname: str | None
    vhost: bool
    backend: Any


@record
class Attached:
    placement: Placement
    driver: str
    node: str | None = None  # blockdev node-name or netdev id
    model: Any = None  # the virtio device model
    extra: dict = field(default_factory=dict)


class GuestAgent:
    """How the guest reacts to requests that need its cooperation (q35 unplug, balloon).

    With KVM the real guest driver answers through device registers; the fake hypervisor's
    guest answers through this interface (adapters/fake/guest.py)."""

    def request_unplug(self, device_id: str, done: Callable[[], None]) -> None:
        raise NotImplementedError

    def balloon_target(self, target_bytes: int, set_actual: Callable[[int], None]) -> None:
        raise NotImplementedError


class DeviceManager:
    def __init__(self, config: VmConfig, *, block_opener: BlockOpener, net_opener: NetOpener,
                 probe: HostProbe, poller: IoPoller, guest_agent: GuestAgent | None,
                 console_write: Callable[[bytes], None] | None, emit: Callable[[Any], None],
                 read_file: Callable[[str], bytes] | None = None,
                 discard: Callable[[GuestMemory, int, int], None] | None = None, vfio=None,
                 chardevs: CharBackendOpener | None = None):
        self.config = config
        self._blocks = block_opener
        self._nets = net_opener
        self._probe = probe
        self._poller = poller
        self._agent = guest_agent
        self._console_write = console_write
        self._emit = emit
        self.read_file = read_file
        self._discard = discard
        self.vfio = vfio
        self.chardevs = chardevs  # opens the -chardev a virtconsole uses (the caller closes them)
        self.pio = Bus()
        self.mmio = Bus()
        self.topology = DeviceTopology(config.machine.type)
        self.blockdevs = NamedRegistry("Block device node")
        self.netdevs = NamedRegistry("Netdev")
        self.attached: dict[str, Attached] = {}
        self.memory: GuestMemory | None = None
        self.hv_vm: HvVm | None = None
        self.balloon_id: str | None = None
        self._lock = threading.RLock()
        self._pause_lock = threading.Lock()
        self._pause_depth = 0  # nested pause_devices calls (stop, then a snapshot, say)
        self.platform: Any = None  # application.machine.Platform, set by realize()

    # --- start-up ----------------------------------------------------------------------------------

    def realize(self, memory: GuestMemory, hv_vm: HvVm, vm) -> None:
        from application.machine import Platform

        self.memory = memory
        self.hv_vm = hv_vm
        self.platform = Platform(self, memory, hv_vm, vm, self._poller, self._console_write)
        self.platform.create_platform_devices()
        cfg = self.config
        for d in cfg.drives:
            self.blockdev_add(d.id, d.file, readonly=d.readonly, direct=d.direct)
        for n in cfg.netdevs:
            self.netdev_add(n.id, n.ifname, vhost=n.vhost)
        for dev in cfg.devices:
            if dev.driver == "pcie-root-port":
                self.topology.add_root_port(dev.id or f"pcie.{dev.port}", dev.port or 0, dev.addr)
        for dev in cfg.devices:
            if dev.driver != "pcie-root-port":
                self.device_add_config(dev, hotplugged=False)
        self.platform.finish_cold_plug()

    def load_guest(self, memory: GuestMemory, vcpus: list, nr_vcpus: int) -> None:
        self.platform.load_guest(vcpus, nr_vcpus)

    def start(self) -> None:
        self._poller.start()

    def close(self) -> None:
        self._poller.stop()
        for att in list(self.attached.values()):
            # Activated virtqueues hold views of guest RAM: drop them, or RAM cannot be unmapped.
            if hasattr(att.model, "release"):
                att.model.release()
        for node in list(self.blockdevs._items.values()):
            node.backend.close()
        for node in list(self.netdevs._items.values()):
            node.backend.close()

    def discard_memory(self, gpa: int, length: int) -> None:
        """The balloon took these guest pages: give their host memory back."""
        if self._discard is not None and self.memory is not None:
            self._discard(self.memory, gpa, length)

    # --- backends ----------------------------------------------------------------------------------

    def blockdev_add(self, node_name: str, path: str, *, readonly: bool, direct: bool) -> None:
        if self.blockdevs.has(node_name):
            raise InvalidArgumentError(f"Block device node '{node_name}' already exists")
        why = self._probe.file_usable(path, write=not readonly)
        if why:
            raise HostResourceError(f"Could not open '{path}': {why}")
        backend = self._blocks.open(path, readonly=readonly, direct=direct)
        try:
            self.blockdevs.add(node_name, BlockNode(node_name, path, readonly, direct, backend))
        except VmmError:
            backend.close()
            raise

    def blockdev_del(self, node_name: str) -> None:
        node = self.blockdevs.remove(node_name)
        node.backend.close()

    def netdev_add(self, net_id: str, ifname: str | None, *, vhost: bool = False) -> None:
        if self.netdevs.has(net_id):
            raise InvalidArgumentError(f"Netdev '{net_id}' already exists")
        if vhost:
            raise HostResourceError("vhost=on is not supported by pystrato: use a plain tap")
        if not ifname:
            raise InvalidArgumentError("netdev needs 'ifname' (the tap device)")
        backend = self._nets.open_tap(ifname)
        try:
            self.netdevs.add(net_id, NetNode(net_id, ifname, vhost, backend))
        except VmmError:
            backend.close()
            raise

    def netdev_del(self, net_id: str) -> None:
        node = self.netdevs.remove(net_id)
        node.backend.close()

    # --- devices -----------------------------------------------------------------------------------

    def device_add_config(self, dev: DeviceConfig, *, hotplugged: bool) -> Attached:
        drv = dev.driver
        microvm = self.config.machine.type == MICROVM
        dev_id = dev.id
        if drv in BLK_DRIVERS_MMIO or drv in NET_DRIVERS_MMIO:
            if not microvm:
                raise InvalidArgumentError(f"driver '{drv}' needs the microvm machine")
            kind = BLK if drv in BLK_DRIVERS_MMIO else NET
            node = (dev.drive or dev_id) if kind == BLK else (dev.netdev or dev_id)
            if not dev_id:
                dev_id = node
            if not node:
                raise InvalidArgumentError(f"'{drv}' needs 'id' naming its {'blockdev node' if kind == BLK else 'netdev'}")
            registry = self.blockdevs if kind == BLK else self.netdevs
            if not registry.has(node):
                what = "blockdev-add node-name" if kind == BLK else "netdev_add id"
                raise DeviceNotFoundError(
                    f"{registry.what} '{node}' not found: on microvm the device id must match the {what}")
            placement = self.topology.place_in_slot(dev_id, drv, kind, dev.addr, hotplugged)
            try:
                registry.attach(node, dev_id)
            except VmmError:
                self.topology.remove(dev_id)
                raise
            att = Attached(placement, drv, node)
            try:
                att.model = self.platform.fill_slot(att, registry.get(node), dev)
            except Exception:
                registry.detach(node)
                self.topology.remove(dev_id)
                raise
        elif drv in BLK_DRIVERS_PCI or drv in NET_DRIVERS_PCI or drv in VFIO_DRIVERS:
            if microvm:
                raise InvalidArgumentError(f"driver '{drv}' needs the q35 machine")
            if not dev_id:
                raise InvalidArgumentError(f"'{drv}' needs an 'id'")
            node = None
            registry = None
            if drv in BLK_DRIVERS_PCI:
                node, registry = dev.drive, self.blockdevs
                if not node:
                    raise InvalidArgumentError(f"'{drv}' needs 'drive' naming a blockdev node-name")
            elif drv in NET_DRIVERS_PCI:
                node, registry = dev.netdev, self.netdevs
                if not node:
                    raise InvalidArgumentError(f"'{drv}' needs 'netdev' naming a netdev id")
            else:
                self._check_vfio_host(dev)
            placement = self.topology.place_on_bus(dev_id, drv, dev.bus or "pcie.0", dev.addr, hotplugged)
            try:
                if registry is not None:
                    registry.attach(node, dev_id)
            except VmmError:
                self.topology.remove(dev_id)
                raise
            att = Attached(placement, drv, node)
            try:
                att.model = self.platform.add_pci_device(att, registry.get(node) if registry else None, dev)
            except Exception:
                if registry is not None:
                    registry.detach(node)
                self.topology.remove(dev_id)
                raise
        elif drv in BALLOON_DRIVERS:
            if hotplugged:
                raise InvalidArgumentError(f"'{drv}' cannot be hot-plugged: configure it on the command line")
            dev_id = dev_id or "balloon0"
            placement = Placement(dev_id, drv)
            if self.topology.find(dev_id):
                raise InvalidArgumentError(f"Duplicate ID '{dev_id}' for device")
            self.topology._devices[dev_id] = placement
            att = Attached(placement, drv)
            att.model = self.platform.add_balloon(att, dev, self._balloon_actual_changed)
            self.balloon_id = dev_id
        elif drv in ("virtio-serial-device", "virtconsole", "virtio-serial-pci"):
            if hotplugged:
                raise InvalidArgumentError(f"'{drv}' cannot be hot-plugged")
            dev_id = dev_id or drv
            placement = Placement(dev_id, drv)
            self.topology._devices[dev_id] = placement
            att = Attached(placement, drv)
            att.model = self.platform.add_console_device(att, dev)
        else:
            raise InvalidArgumentError(f"driver '{drv}' is not supported")
        with self._pause_lock:
            if self._pause_depth and isinstance(att.model, VirtioDevice):
                att.model.pause()  # plugged into a stopped VM: held like the others until cont
            with self._lock:
                self.attached[dev_id] = att
        return att

    def _check_vfio_host(self, dev: DeviceConfig) -> None:
        host = dev.host
        if not host:
            raise InvalidArgumentError("vfio-pci needs 'host' (the host PCI address, e.g. 0000:1a:00.3)")
        if not self._probe.pci_device_exists(host):
            raise HostResourceError(f"host PCI device '{host}' not found under /sys/bus/pci/devices")
        if self._probe.iommu_group(host) is None:
            raise HostResourceError(f"host PCI device '{host}' has no IOMMU group: VFIO needs an IOMMU")

    def device_del(self, dev_id: str, *, on_deleted: Callable[[], None] | None = None) -> bool:
        """Remove a device. Returns True when done synchronously (microvm: the event is emitted
        before the reply), False when the guest must acknowledge first (q35 PCIe hot-unplug)."""
        with self._lock:
            att = self.attached.get(dev_id)
            if att is None:
                raise DeviceNotFoundError(f"Device '{dev_id}' not found")
            p = att.placement
            if p.driver in BALLOON_DRIVERS or p.driver in ("virtio-serial-device", "virtconsole"):
                raise InvalidArgumentError(f"device '{dev_id}' ({p.driver}) cannot be hot-unplugged")
            if p.driver == "pcie-root-port":
                raise InvalidArgumentError(f"device '{dev_id}' (pcie-root-port) cannot be hot-unplugged")
            if p.kind is not None:  # microvm slot: empty it now
                self.platform.empty_slot(att)
                self._finish_removal(att, release_backend=True)
                return True
            if p.bus == "pcie.0":
                raise InvalidArgumentError(f"device '{dev_id}' is on pcie.0: only devices in a root port can be hot-unplugged")
            # The test hypervisor's fake guest answers for itself; on KVM the q35 machine asks the
            # real guest through the root port (application.pci.PciPlatform).
            agent = self._agent if self._agent is not None else getattr(self.platform, "unplug_agent", None)
            if agent is None:
                raise DeviceNotActiveError("the guest has no PCIe hot-unplug support on this machine")
            self.topology.mark_pending_removal(dev_id)

        def acked():
            self.platform.remove_pci_device(att)
            self._finish_removal(att, release_backend=False)
            if on_deleted:
                on_deleted()

        try:
            agent.request_unplug(dev_id, acked)
        except BaseException:
            # Refused before the guest was asked: the device stays, and a retry is allowed.
            self.topology.get(dev_id).pending_removal = False
            raise
        return False

    def _finish_removal(self, att: Attached, *, release_backend: bool) -> None:
        dev_id = att.placement.device_id
        with self._lock:
            self.attached.pop(dev_id, None)
            self.topology.remove(dev_id)
            if att.node:
                registry = self.blockdevs if att.driver in BLK_DRIVERS_MMIO + BLK_DRIVERS_PCI else self.netdevs
                registry.detach(att.node)
                if release_backend and registry.has(att.node):
                    # microvm: StratoVirt drops the backend with the device (no blockdev-del).
                    registry.remove(att.node).backend.close()
        self._emit(DeviceDeleted(device=dev_id, path=dev_id))

    # --- balloon -----------------------------------------------------------------------------------

    def balloon_model(self):
        if self.balloon_id is None:
            raise DeviceNotActiveError("No balloon device has been activated")
        return self.attached[self.balloon_id].model

    def balloon_guest_reports(self, guest_bytes: int) -> None:
        """What a guest balloon driver does once it reached a size: write the number of pages
        the balloon holds into the config field 'actual' (virtio_balloon_config, offset 4)."""
        model = self.balloon_model()
        pages = max(0, model.ram_size - guest_bytes) >> 12
        model.write_config(4, memoryview(pages.to_bytes(4, "little")))

    def _balloon_actual_changed(self, actual_bytes: int) -> None:
        self._emit(BalloonChanged(actual=actual_bytes))

    # --- snapshot/migration --------------------------------------------------------------------------

    def migration_blockers(self) -> list[str]:
        out = []
        for att in self.attached.values():
            if att.driver in BALLOON_DRIVERS:
                out.append(f"balloon device '{att.placement.device_id}'")
            if att.driver in VFIO_DRIVERS:
                out.append(f"vfio device '{att.placement.device_id}'")
        for n in self.netdevs._items.values():
            if n.vhost:
                out.append(f"vhost-net netdev '{n.id}'")
        # Memory backends (huge pages, mem-share, mem-path) are configuration only:
        # domain.migration's snapshot_blockers/migration_blockers name them.
        return out

    def virtio_models(self) -> list[VirtioDevice]:
        """Every attached virtio device model, once (virtconsole shares its device's model)."""
        with self._lock:
            models = [att.model for att in self.attached.values() if isinstance(att.model, VirtioDevice)]
        return list({id(m): m for m in models}.values())

    def pause_devices(self) -> None:
        """No device starts new work (queue notifications, tap and chardev input are kept for
        resume_devices) and the work in flight is done: guest RAM and the device state stay as
        they are until resume_devices (`stop`, migration's final pass, a snapshot write).

        Pauses nest: a snapshot or a cancelled migration of a VM the user stopped resumes
        nothing; only the outermost resume_devices lets the devices go."""
        with self._pause_lock:
            self._pause_depth += 1
            if self._pause_depth > 1:
                return
            paused: list[VirtioDevice] = []
            try:
                for model in self.virtio_models():
                    model.pause()
                    paused.append(model)
            except BaseException:
                self._pause_depth -= 1
                for model in paused:
                    model.resume()
                raise

    def resume_devices(self) -> None:
        """Devices take work again, starting with the queues notified while they were paused
        (on a restored VM, never paused here: every active queue, whose notification the
        source may have taken). Inside an outer pause it only undoes the inner one."""
        with self._pause_lock:
            if self._pause_depth > 1:
                self._pause_depth -= 1
                return
            self._pause_depth = 0
            models = self.virtio_models()
        for model in models:  # outside the lock: a resumed disk runs the I/O it was asked for
            model.resume()

    @property
    def devices_paused(self) -> bool:
        return self._pause_depth > 0

    def save_states(self) -> dict[str, tuple[int, Any]]:
        return self.platform.save_states()

    def restore_states(self, states: dict[str, tuple[int, Any]]) -> None:
        self.platform.restore_states(states)
