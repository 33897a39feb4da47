"""The management API the driving adapters (QMP) call. One method per QMP command.

Arguments arrive already validated for presence and JSON type by the QMP adapter's schema;
range and existence checks happen here and raise domain errors (domain/errors.py).
Return values are the JSON-ready ``return`` payloads.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from domain.record import field, record


@record
class AfterReply:
    """A result whose follow-up must run only after the reply has been written to the client
    (quit: the SHUTDOWN event comes after quit's ``return``, as the manual shows)."""

    value: Any = field(default_factory=dict)
    then: Callable[[], None] | None = None


class VmApi(Protocol):
    # --- queries -------------------------------------------------------------------------
    def query_status(self) -> dict: ...

    def query_cpus(self) -> list[dict]: ...

    def query_hotpluggable_cpus(self) -> list[dict]: ...

    def query_balloon(self) -> dict: ...

    def query_migrate(self) -> dict: ...

    # --- lifecycle -----------------------------------------------------------------------
    def stop(self) -> dict: ...

    def cont(self) -> dict: ...

    def quit(self) -> AfterReply: ...

    # --- hotplug -------------------------------------------------------------------------
    def blockdev_add(self, node_name: str, file: dict, read_only: bool | None, cache: dict | None,
                     driver: str | None) -> dict: ...

    def blockdev_del(self, node_name: str) -> dict: ...

    def netdev_add(self, id: str, ifname: str | None, type: str | None, fd: str | None,
                   vhost: bool | None, queues: int | None) -> dict: ...

    def netdev_del(self, id: str) -> dict: ...

    def device_add(self, args: dict) -> dict:
        """``args``: the QMP arguments object (driver, id, and driver-specific properties)."""

    def device_del(self, id: str) -> dict | AfterReply: ...

    # --- balloon -------------------------------------------------------------------------
    def balloon(self, value: int) -> dict: ...

    # --- snapshot / migration --------------------------------------------------------------
    def migrate(self, uri: str, extra: dict) -> dict: ...

    def migrate_cancel(self) -> dict: ...
