"""Value syntax of the StratoVirt command line: ``k=v`` lists, numbers, sizes, switches, names.

Shapes follow StratoVirt (machine_manager/src/config/mod.rs and friends): ``0x`` means hex,
sizes take one K/M/G suffix (bare = MiB), switches are on/off/true/false/yes/no. Every refusal
is a ConfigError naming the option; user text is quoted with control characters escaped, so an
error stays on one line whatever the user typed.
"""

from __future__ import annotations

import re

from domain.errors import ConfigError

MAX_STRING_LENGTH = 255  # StratoVirt: ids, names, serial numbers are checked against this
MAX_PATH_LENGTH = 4096
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the terminating NUL
MAX_BLK_SERIAL = 20  # virtio-blk id string (VIRTIO_BLK_ID_BYTES)

# Patterns, not compiled objects: re compiles (and caches) the ones a command line uses.
_DECIMAL = r"[0-9]{1,20}"
_HEX = r"0[xX][0-9a-fA-F]{1,16}"
_SIZE = r"([0-9]{1,20})([KkMmGg]?)"
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_MAC = r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}"
_UUID = r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}"
_HOST_BDF = r"([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])"
_TRUE = frozenset({"on", "true", "yes"})
_FALSE = frozenset({"off", "false", "no"})


def quote(text: str) -> str:
    """User text for an error line: quoted, with newlines and other controls escaped."""
    return "'" + text.encode("unicode_escape").decode("ascii") + "'"


class Params:
    """One option value split StratoVirt's way: ``[head,]k=v,flag,...``.

    Keys are consumed with take()/flag(); finish() refuses whatever nobody consumed, naming
    it, so a typo is never silently ignored.
    """

    def __init__(self, option: str, text: str, *, head: bool):
        self.option = option
        self.head: str | None = None
        self._items: dict[str, str | None] = {}
        if text == "":
            raise ConfigError(option, "needs a value")
        for index, item in enumerate(text.split(",")):
            if item == "":
                raise ConfigError(option, f"empty parameter in {quote(text)}")
            key, eq, value = item.partition("=")
            if not eq and index == 0 and head:
                self.head = item
                continue
            if key == "":
                raise ConfigError(option, f"parameter {quote(item)} has no name")
            if key in self._items:
                raise ConfigError(option, f"parameter {quote(key)} is given twice")
            if eq and value == "":
                raise ConfigError(option, f"parameter {quote(key)} has an empty value")
            self._items[key] = value if eq else None

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def take(self, key: str) -> str | None:
        """The value of ``key=value`` (None when absent); a bare ``key`` is refused."""
        if key not in self._items:
            return None
        value = self._items.pop(key)
        if value is None:
            raise ConfigError(self.option, f"parameter {quote(key)} needs a value ({key}=...)")
        return value

    def require(self, key: str, what: str = "") -> str:
        value = self.take(key)
        if value is None:
            raise ConfigError(self.option, f"{key}= is required{what}")
        return value

    def flag(self, key: str) -> bool:
        """A bare switch such as ``server``; ``server=on`` is refused like StratoVirt does."""
        if key not in self._items:
            return False
        value = self._items.pop(key)
        if value is not None:
            raise ConfigError(self.option, f"{quote(key)} is a bare switch and takes no value")
        return True

    def switch(self, key: str, default: bool) -> bool:
        value = self.take(key)
        return default if value is None else parse_bool(self.option, key, value)

    def keys(self) -> list[str]:
        return list(self._items)

    def finish(self, unsupported: frozenset[str] = frozenset(), context: str = "") -> None:
        """Refuse the first parameter left over, by name."""
        for key in self._items:
            if key in unsupported:
                raise ConfigError(
                    self.option, f"parameter {quote(key)}{context} is not supported by pystrato yet"
                )
            raise ConfigError(self.option, f"unknown parameter {quote(key)}{context}")


def parse_bool(option: str, key: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(option, f"{key}={quote(value)} is not a switch (on|off|true|false|yes|no)")


def parse_decimal(option: str, key: str, value: str, lo: int, hi: int) -> int:
    """A decimal integer in [lo, hi] (StratoVirt parses -smp values as plain u8)."""
    if not re.fullmatch(_DECIMAL, value):
        raise ConfigError(option, f"{key}={quote(value)} is not a decimal number")
    return _in_range(option, key, int(value), lo, hi)


def parse_number(option: str, key: str, value: str, lo: int, hi: int) -> int:
    """Decimal or ``0x`` hex, like StratoVirt's str_to_num."""
    if re.fullmatch(_HEX, value):
        number = int(value, 16)
    elif re.fullmatch(_DECIMAL, value):
        number = int(value)
    else:
        raise ConfigError(option, f"{key}={quote(value)} is not a number (decimal or 0x hex)")
    return _in_range(option, key, number, lo, hi)


def _in_range(option: str, key: str, number: int, lo: int, hi: int) -> int:
    if not lo <= number <= hi:
        raise ConfigError(option, f"{key}={number} is out of range [{lo}, {hi}]")
    return number


def parse_size(option: str, key: str, value: str) -> int:
    """Bytes from ``N[K|M|G]``, a bare number being MiB (StratoVirt memory_unit_conversion)."""
    match = re.fullmatch(_SIZE, value)
    if match is None:
        raise ConfigError(option, f"{key}={quote(value)} is not a size (N, NK, NM or NG; bare N is MiB)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_id(option: str, key: str, value: str) -> str:
    if len(value) > MAX_STRING_LENGTH:
        raise ConfigError(option, f"{key} is longer than {MAX_STRING_LENGTH} characters")
    return value


def parse_path(option: str, key: str, value: str, limit: int = MAX_PATH_LENGTH) -> str:
    """A host path: shape only. Whether it exists is the application's business (no I/O here)."""
    if value == "":
        raise ConfigError(option, f"{key} is empty")
    if "\x00" in value:
        raise ConfigError(option, f"{key} {quote(value)} contains a NUL character")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ConfigError(option, f"{key} is {size} bytes long, longer than {limit}")
    return value


def parse_socket_path(option: str, key: str, value: str) -> str:
    return parse_path(option, key, value, MAX_SOCKET_PATH)


def parse_mac(option: str, value: str) -> str:
    """``xx:xx:xx:xx:xx:xx`` with the group bit clear (a NIC needs a unicast address)."""
    if not re.fullmatch(_MAC, value):
        raise ConfigError(option, f"mac {quote(value)} is not of the form xx:xx:xx:xx:xx:xx")
    if int(value[:2], 16) & 1:
        raise ConfigError(option, f"mac {quote(value)} is a multicast address, not a unicast one")
    return value.lower()


def parse_pci_addr(option: str, value: str) -> tuple[int, int]:
    """StratoVirt's ``addr=SLOT[.FUNCTION]`` (get_pci_df): slot 0..31, function 0..7."""
    parts = value.split(".")
    if len(parts) > 2:
        raise ConfigError(option, f"addr {quote(value)} has more than slot.function")
    slot = parse_number(option, "addr slot", parts[0], 0, 31)
    function = parse_number(option, "addr function", parts[1], 0, 7) if len(parts) == 2 else 0
    return slot, function


def parse_host_bdf(option: str, value: str) -> str:
    """A host PCI address ``DDDD:BB:SS.F`` as sysfs names it (format only)."""
    match = re.fullmatch(_HOST_BDF, value)
    if match is None or int(match.group(3), 16) > 0x1F:
        raise ConfigError(option, f"host {quote(value)} is not a PCI address DDDD:BB:SS.F")
    return value.lower()


def parse_uuid(option: str, value: str) -> str:
    if not re.fullmatch(_UUID, value):
        raise ConfigError(option, f"{quote(value)} is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    return value.lower()
