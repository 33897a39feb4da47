"""From one parsed input value to one reply: envelope checks, command run, error mapping.

The envelope is checked as QEMU's qmp_dispatch_check_obj does, with its wording. Every reply
to an object echoes its ``id`` (any JSON value), errors included, so that clients that match
replies by id (qemu.qmp) never see an orphan.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from application.api import AfterReply
from domain.errors import VmmError
from domain.record import record

from .commands import CommandTable
from .models import NO_ID, error_reply, return_reply

log = logging.getLogger(__name__)


@record
class Outcome:
    reply: dict[str, Any]
    then: Callable[[], None] | None = None  # run after the reply is written


def _check_envelope(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    execute = None
    arguments: dict[str, Any] = {}
    for key, value in request.items():
        if key == "execute":
            if type(value) is not str:
                raise VmmError("QMP input member 'execute' must be a string")
            execute = value
        elif key == "arguments":
            if type(value) is not dict:
                raise VmmError("QMP input member 'arguments' must be an object")
            arguments = value
        elif key != "id":
            raise VmmError(f"QMP input member '{key}' is unexpected")
    if execute is None:
        raise VmmError("QMP input lacks member 'execute'")
    return execute, arguments


class Dispatcher:
    def __init__(self, table: CommandTable, api: Any):
        self.table = table
        self.api = api

    def handle(self, request: Any) -> Outcome:
        if type(request) is not dict:
            return Outcome(error_reply("GenericError", "QMP input must be a JSON object"))
        id = request.get("id", NO_ID)
        try:
            name, arguments = _check_envelope(request)
            result = self.table.run(self.api, name, arguments)
        except VmmError as exc:
            return Outcome(error_reply(exc.qmp_class, exc.desc, id))
        except Exception as exc:  # a bug in a handler must not take the server down
            log.exception("QMP command %r failed", request.get("execute"))
            return Outcome(error_reply("GenericError", str(exc) or type(exc).__name__, id))
        then = None
        if isinstance(result, AfterReply):
            result, then = result.value, result.then
        return Outcome(return_reply({} if result is None else result, id), then)
