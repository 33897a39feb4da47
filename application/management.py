"""The management use cases behind every QMP command (implements application.api.VmApi)."""

from __future__ import annotations

import logging
from typing import Any

from domain.config import MICROVM, DeviceConfig
from domain.errors import ConfigError, InvalidArgumentError, InvalidStateError
from domain.lifecycle import RunState
from domain.topology import parse_addr

from application.api import AfterReply
from application.devices import BLK_DRIVERS_MMIO, NET_DRIVERS_MMIO
from application.vm import VirtualMachine

log = logging.getLogger("pystrato.qmp")

# device_add properties we understand, by QMP name -> DeviceConfig field.
_DEVICE_PROPS = {
    "driver": "driver", "id": "id", "bus": "bus", "addr": "addr", "lun": "addr",
    "drive": "drive", "netdev": "netdev", "mac": "mac", "host": "host", "chardev": "chardev",
    "multifunction": "multifunction", "serial": "serial",
}
# Accepted for compatibility with StratoVirt/libvirt callers; they change nothing here.
_IGNORED_PROPS = {"iothread", "num-queues", "queue-size", "bootindex", "mq", "vectors", "romfile",
                  "port", "chassis", "boot"}


class Management:
    def __init__(self, vm: VirtualMachine, *, snapshots=None, migration=None, guest_agent=None):
        self.vm = vm
        self.devices = vm.devices
        self._snapshots = snapshots
        self._migration = migration
        self._agent = guest_agent

    # --- queries -----------------------------------------------------------------------------------

    def query_status(self) -> dict:
        return self.vm.lifecycle.status_info()

    def query_cpus(self) -> list[dict]:
        return self.vm.vcpu_info()

    def query_hotpluggable_cpus(self) -> list[dict]:
        out = []
        for c in self.vm.cpus:
            entry: dict[str, Any] = {"props": c.props()}
            if c.online:
                entry["qom-path"] = c.qom_path
            entry["type"] = "host-x86-cpu"
            entry["vcpus-count"] = 1
            out.append(entry)
        return out

    def query_balloon(self) -> dict:
        return {"actual": self.devices.balloon_model().actual_bytes()}

    def query_migrate(self) -> dict:
        if self._migration is None:
            return {"status": "none"}
        return self._migration.query()

    # --- lifecycle ---------------------------------------------------------------------------------

    def stop(self) -> dict:
        self.vm.stop()
        return {}

    def cont(self) -> dict:
        # The memory must not change under a snapshot writer (it has no dirty log), nor during
        # a migration's final pass. QEMU refuses the latter ("Migration is not finalized yet");
        # the lifecycle refuses both anyway, these are the clear words.
        st = self.vm.run_state
        if st is RunState.SAVE_VM:
            raise InvalidStateError("a snapshot is being written: the VM cannot be resumed until "
                                    "it completes or migrate_cancel stops it")
        if st is RunState.FINISH_MIGRATE:
            raise InvalidStateError("Migration is not finalized yet: the VM cannot be resumed")
        self.vm.cont()
        return {}

    def quit(self) -> AfterReply:
        return AfterReply({}, lambda: self.vm.shutdown(guest=False, reason="host-qmp-quit"))

    # --- hotplug -----------------------------------------------------------------------------------

    def _check_hotplug_state(self) -> None:
        st = self.vm.run_state.value
        if st not in ("running", "paused", "prelaunch"):
            raise InvalidStateError(f"devices cannot be changed while the VM is '{st}'")

    def blockdev_add(self, node_name: str, file: dict, read_only: bool | None = None,
                     cache: dict | None = None, driver: str | None = None) -> dict:
        self._check_hotplug_state()
        if driver not in (None, "raw", "file"):
            raise InvalidArgumentError(f"blockdev driver '{driver}' is not supported (use raw)")
        fdrv = file.get("driver", "file")
        if fdrv not in ("file", "host_device"):
            raise InvalidArgumentError(f"file driver '{fdrv}' is not supported (use file)")
        filename = file.get("filename")
        if not isinstance(filename, str) or not filename:
            raise InvalidArgumentError("Parameter 'file.filename' is missing")
        direct = True
        if cache is not None:
            d = cache.get("direct", True)
            if not isinstance(d, bool):
                raise InvalidArgumentError("Invalid parameter type for 'cache.direct', expected: boolean")
            direct = d
        self.devices.blockdev_add(node_name, filename, readonly=bool(read_only), direct=direct)
        return {}

    def blockdev_del(self, node_name: str) -> dict:
        self.devices.blockdev_del(node_name)
        return {}

    def netdev_add(self, id: str, ifname: str | None = None, type: str | None = None,
                   fd: str | None = None, vhost: bool | None = None, queues: int | None = None) -> dict:
        self._check_hotplug_state()
        if type not in (None, "tap"):
            raise InvalidArgumentError(f"netdev type '{type}' is not supported (use tap)")
        if fd is not None:
            raise InvalidArgumentError("netdev 'fd' is not supported: pass 'ifname'")
        if queues not in (None, 1, 2):
            raise InvalidArgumentError("multi-queue netdevs are not supported")
        self.devices.netdev_add(id, ifname, vhost=bool(vhost))
        return {}

    def netdev_del(self, id: str) -> dict:
        self.devices.netdev_del(id)
        return {}

    def device_add(self, args: dict) -> dict:
        self._check_hotplug_state()
        cfg = self._device_config(args)
        self.devices.device_add_config(cfg, hotplugged=True)
        return {}

    def _device_config(self, args: dict) -> DeviceConfig:
        fields: dict[str, Any] = {}
        for key, value in args.items():
            if key in _IGNORED_PROPS:
                continue
            name = _DEVICE_PROPS.get(key)
            if name is None:
                raise InvalidArgumentError(f"Parameter '{key}' is unexpected")
            if name == "addr":
                slot = parse_addr(value)
                if key == "lun":  # the manual: lun=0 is vdb
                    slot += 1
                fields["addr"] = slot
            elif name == "multifunction":
                if value not in (True, False, "on", "off"):
                    raise InvalidArgumentError("Invalid parameter 'multifunction'")
                fields[name] = value in (True, "on")
            else:
                if not isinstance(value, str):
                    raise InvalidArgumentError(f"Invalid parameter type for '{key}', expected: string")
                fields[name] = value
        driver = fields.get("driver")
        if self.vm.config.machine.type == MICROVM and driver in BLK_DRIVERS_MMIO + NET_DRIVERS_MMIO:
            if "bus" in fields:
                raise InvalidArgumentError("microvm has no PCI buses: drop 'bus'")
        if "mac" in fields:
            from domain.cmdline_values import parse_mac

            try:
                fields["mac"] = parse_mac("mac", fields["mac"])
            except ConfigError as e:
                raise InvalidArgumentError(e.reason) from None
        return DeviceConfig(**fields)

    def device_del(self, id: str) -> dict:
        self._check_hotplug_state()
        self.devices.device_del(id)
        return {}

    # --- balloon -----------------------------------------------------------------------------------

    def balloon(self, value: int) -> dict:
        model = self.devices.balloon_model()
        if value <= 0:
            raise InvalidArgumentError("Parameter 'value' must be a positive number of bytes")
        target = min(value, self.vm.config.memory.size)  # the manual: capped at the boot size
        model.set_target_bytes(target)
        if self._agent is not None:
            self._agent.balloon_target(target, self.devices.balloon_guest_reports)
        return {}

    # --- snapshot / migration -------------------------------------------------------------------------

    def migrate(self, uri: str, extra: dict) -> dict:
        if self._migration is None:
            raise InvalidStateError("migration is not available")
        self._migration.migrate(uri, **extra)
        return {}

    def migrate_cancel(self) -> dict:
        if self._migration is None:
            return {}
        self._migration.cancel()
        return {}
