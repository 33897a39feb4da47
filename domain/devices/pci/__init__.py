"""PCI Express for the q35 machine: configuration space, the root complex (0xCF8/0xCFC and
ECAM), root ports with native hot-plug, MSI/MSI-X, and the virtio-pci transport.

Pure models: interrupts leave through an injected ``send_msi(address, data)``, BAR placement is
reported through ``PciDevice.on_bar_moved``; the machine (application/machine.py) wires both.
"""
