"""VM run state: the QMP status strings and the legal transitions between them."""

from __future__ import annotations

import enum
import threading

from domain.errors import InvalidStateError


class RunState(str, enum.Enum):
    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    RESTORE_VM = "restore-vm"
    SAVE_VM = "save-vm"
    INTERNAL_ERROR = "internal-error"
    SHUTDOWN = "shutdown"


S = RunState
_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    S.PRELAUNCH: frozenset({S.RUNNING, S.PAUSED, S.INMIGRATE, S.RESTORE_VM, S.SHUTDOWN}),
    S.INMIGRATE: frozenset({S.RUNNING, S.PAUSED, S.SHUTDOWN, S.INTERNAL_ERROR}),
    S.RESTORE_VM: frozenset({S.RUNNING, S.PAUSED, S.SHUTDOWN, S.INTERNAL_ERROR}),
    S.RUNNING: frozenset({S.PAUSED, S.FINISH_MIGRATE, S.SHUTDOWN, S.INTERNAL_ERROR}),
    S.PAUSED: frozenset({S.RUNNING, S.FINISH_MIGRATE, S.SAVE_VM, S.SHUTDOWN}),
    # finish-migrate: vCPUs stopped for the final pass; back to running on failure/cancel.
    S.FINISH_MIGRATE: frozenset({S.POSTMIGRATE, S.RUNNING, S.PAUSED, S.SHUTDOWN}),
    S.SAVE_VM: frozenset({S.PAUSED, S.SHUTDOWN}),
    S.POSTMIGRATE: frozenset({S.RUNNING, S.SHUTDOWN}),
    S.INTERNAL_ERROR: frozenset({S.SHUTDOWN, S.PAUSED}),
    S.SHUTDOWN: frozenset(),
}


def can_transition(src: RunState, dst: RunState) -> bool:
    return dst in _TRANSITIONS[src]


class Lifecycle:
    """Thread-safe holder of the run state."""

    def __init__(self, state: RunState = RunState.PRELAUNCH):
        self._state = state
        self._lock = threading.Lock()

    @property
    def state(self) -> RunState:
        return self._state

    def transition(self, dst: RunState) -> RunState:
        with self._lock:
            src = self._state
            if not can_transition(src, dst):
                raise InvalidStateError(f"cannot go from state '{src.value}' to '{dst.value}'")
            self._state = dst
            return src

    def status_info(self) -> dict:
        """query-status reply. As in the manual and StratoVirt, a paused VM reports
        running=true (the VM exists and can be resumed); states without vCPUs report false."""
        st = self._state
        running = st in (RunState.RUNNING, RunState.PAUSED)
        return {"running": running, "singlestep": False, "status": st.value}
