"""QMP driving adapter: framing (protocol), argument schemas and the command table (schema,
commands), dispatch, the unix-socket server and event fan-out."""

from .commands import CommandTable, standard_table
from .events import QmpEventBroadcaster
from .schema import Schema, opt, req
from .server import QmpServer

__all__ = ["CommandTable", "QmpEventBroadcaster", "QmpServer", "Schema", "opt", "req", "standard_table"]
