"""Typed errors of the VMM. One root; each subclass names the QMP error class it maps to."""

from __future__ import annotations


class VmmError(Exception):
    """Root of every error the VMM reports to a user (CLI line or QMP error)."""

    qmp_class = "GenericError"

    @property
    def desc(self) -> str:
        return str(self)


class ConfigError(VmmError):
    """An invalid command-line option or value. ``str()`` is the one line printed."""

    def __init__(self, option: str, reason: str):
        self.option = option
        self.reason = reason
        super().__init__(f"{option}: {reason}" if option else reason)


class InvalidArgumentError(VmmError):
    """A QMP argument that is missing, unexpected, of the wrong type or out of range."""


class CommandNotFoundError(VmmError):
    qmp_class = "CommandNotFound"


class InvalidStateError(VmmError):
    """A lifecycle, hotplug or migration request that the current state does not allow."""


class DeviceNotFoundError(VmmError):
    qmp_class = "DeviceNotFound"


class DeviceNotActiveError(VmmError):
    qmp_class = "DeviceNotActive"


class DuplicateIdError(VmmError):
    """An id or node-name that is already in use."""


class ResourceExhaustedError(VmmError):
    """No free slot, port, GSI or address window left."""


class HostResourceError(VmmError):
    """The host side of a device is unusable: missing image, bad tap, no such PCI device."""


class HypervisorError(VmmError):
    """The hypervisor refused or failed an operation."""


class MissingCapabilityError(HypervisorError):
    qmp_class = "KVMMissingCap"


class GuestMemoryError(VmmError):
    """A guest physical address range outside guest RAM (hostile or buggy guest)."""


class MigrationError(VmmError):
    """A snapshot, restore or live migration failed or was refused."""


class SnapshotFormatError(MigrationError):
    """A snapshot file or migration stream that is corrupt, truncated or foreign."""


class IncompatibleConfigError(MigrationError):
    """Source and destination configurations differ where they must agree."""
