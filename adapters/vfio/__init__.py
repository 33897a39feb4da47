"""VFIO device passthrough: host PCI functions handed to the guest (domain.ports.VfioOpener)."""

from adapters.vfio.manager import VfioManager

__all__ = ["VfioManager"]
