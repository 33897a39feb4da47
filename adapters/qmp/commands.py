"""The QMP command table: name -> (argument schema, handler(api, args)).

Handlers translate QMP's member names into the VmApi's parameters (``node-name`` ->
``node_name``) and call it; they run only after the schema accepted the arguments. The
composition root can ``register`` more commands (``x-`` test commands, for instance).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from application.api import VmApi
from domain.errors import CommandNotFoundError, InvalidArgumentError
from domain.record import record

from .models import version_info
from .schema import Schema, opt, req

Handler = Callable[[Any, dict[str, Any]], Any]


@record(frozen=True)
class Command:
    name: str
    schema: Schema
    handler: Handler


class CommandTable:
    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def register(self, name: str, schema: Schema, handler: Handler) -> None:
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        self._commands[name] = Command(name, schema, handler)

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def names(self) -> list[str]:
        return list(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(list(self._commands.values()))

    def __len__(self) -> int:
        return len(self._commands)

    def run(self, api: Any, name: str, arguments: dict[str, Any]) -> Any:
        """Validate ``arguments`` against the command's schema and call its handler. Raises
        CommandNotFoundError, InvalidArgumentError, or whatever the handler raises."""
        command = self._commands.get(name)
        if command is None:
            raise CommandNotFoundError(f"The command {name} has not been found")
        return command.handler(api, command.schema.validate(arguments))


# ---------------------------------------------------------------------------------------------
# Schemas. Members StratoVirt's qmp_schema.rs accepts are accepted here too; those the VmApi has
# no parameter for (media, detect-zeroes, ..., downscript, script) are checked and not forwarded.
# ---------------------------------------------------------------------------------------------

NO_ARGS = Schema()

_FILE = Schema(req("driver", "str"), req("filename", "str"), opt("aio", "str"))
_CACHE = Schema(opt("direct", "bool"), opt("no-flush", "bool"))

BLOCKDEV_ADD = Schema(
    req("node-name", "str"),
    req("file", "object", members=_FILE),
    opt("cache", "object", members=_CACHE),
    opt("read-only", "bool"),
    opt("driver", "str"),
    opt("media", "str"),
    opt("detect-zeroes", "str"),
    opt("backing", "str"),
    opt("discard", "str"),
    opt("id", "str"),
    opt("options", "str"),
    opt("throttling.iops-total", "int"),
    opt("l2-cache-size", "str"),
    opt("refcount-cache-size", "str"),
)

NETDEV_ADD = Schema(
    req("id", "str"),
    opt("ifname", "str"),
    opt("type", "str"),
    opt("fd", "str"),
    opt("vhost", "bool"),
    opt("queues", "int"),
    opt("vhostfds", "str"),
    opt("downscript", "str"),
    opt("script", "str"),
)

# "verify" is pystrato's: the destination checks a SHA-256 of guest RAM taken at pause time.
MIGRATE_FLAGS = ("detach", "blk", "inc", "resume", "verify")
MIGRATE = Schema(req("uri", "str"), *(opt(flag, "bool") for flag in MIGRATE_FLAGS))

DEVICE_ADD = Schema(req("driver", "str"), req("id", "str"), open=True)


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


def _qmp_capabilities(api: VmApi, args: dict[str, Any]) -> dict:
    # StratoVirt answers {} at any time, negotiated or not (QEMU answers CommandNotFound after
    # negotiation). The manual types commands without negotiating, so there is no state to keep.
    # No capability is offered (the greeting lists none), so none can be enabled.
    if args.get("enable"):
        raise InvalidArgumentError(f"Capability '{args['enable'][0]}' not available")
    return {}


def _blockdev_add(api: VmApi, a: dict[str, Any]) -> Any:
    return api.blockdev_add(
        node_name=a["node-name"],
        file=a["file"],
        read_only=a.get("read-only"),
        cache=a.get("cache"),
        driver=a.get("driver"),
    )


def _netdev_add(api: VmApi, a: dict[str, Any]) -> Any:
    return api.netdev_add(
        id=a["id"],
        ifname=a.get("ifname"),
        type=a.get("type"),
        fd=a.get("fd"),
        vhost=a.get("vhost"),
        queues=a.get("queues"),
    )


def _migrate(api: VmApi, a: dict[str, Any]) -> Any:
    return api.migrate(uri=a["uri"], extra={k: a[k] for k in MIGRATE_FLAGS if k in a})


def _no_args(method: str) -> Handler:
    return lambda api, a: getattr(api, method)()


def standard_table() -> CommandTable:
    """A new table holding every command pystrato implements."""
    table = CommandTable()
    r = table.register
    r("qmp_capabilities", Schema(opt("enable", "array", items="str")), _qmp_capabilities)
    r("query-status", NO_ARGS, _no_args("query_status"))
    r("query-cpus", NO_ARGS, _no_args("query_cpus"))
    r("query-hotpluggable-cpus", NO_ARGS, _no_args("query_hotpluggable_cpus"))
    r("stop", NO_ARGS, _no_args("stop"))
    r("cont", NO_ARGS, _no_args("cont"))
    r("quit", NO_ARGS, _no_args("quit"))
    r("blockdev-add", BLOCKDEV_ADD, _blockdev_add)
    r("blockdev-del", Schema(req("node-name", "str")), lambda api, a: api.blockdev_del(node_name=a["node-name"]))
    r("netdev_add", NETDEV_ADD, _netdev_add)
    r("netdev_del", Schema(req("id", "str")), lambda api, a: api.netdev_del(id=a["id"]))
    r("device_add", DEVICE_ADD, lambda api, a: api.device_add(a))
    r("device_del", Schema(req("id", "str")), lambda api, a: api.device_del(id=a["id"]))
    r("balloon", Schema(req("value", "int")), lambda api, a: api.balloon(value=a["value"]))
    r("query-balloon", NO_ARGS, _no_args("query_balloon"))
    r("migrate", MIGRATE, _migrate)
    r("migrate_cancel", NO_ARGS, _no_args("migrate_cancel"))
    r("query-migrate", NO_ARGS, _no_args("query_migrate"))
    r("query-version", NO_ARGS, lambda api, a: version_info())
    # Reads the table when called, so commands registered later are listed too.
    r("query-commands", NO_ARGS, lambda api, a: [{"name": name} for name in table.names()])
    return table
