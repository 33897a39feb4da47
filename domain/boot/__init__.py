"""x86_64 direct Linux boot: memory layout, kernel loader, zero page, MP table, boot CPU state."""

from domain.boot.errors import BootError
from domain.boot.linux import BootInfo, boot_linux, setup_linux_boot

__all__ = ["BootError", "BootInfo", "boot_linux", "setup_linux_boot"]
