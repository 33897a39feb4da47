"""The migration/snapshot status machine and query-migrate's reply."""

import threading

import pytest

from domain.errors import InvalidStateError
from domain.memory import PAGE_SIZE
from domain.migration import (
    KIND_INCOMING,
    KIND_MIGRATION,
    KIND_SNAPSHOT,
    MigrationState,
    MigrationStatus as S,
    can_transition,
)

LEGAL = {
    (S.NONE, S.SETUP),
    (S.SETUP, S.ACTIVE), (S.SETUP, S.FAILED), (S.SETUP, S.CANCELLING),
    (S.ACTIVE, S.COMPLETED), (S.ACTIVE, S.FAILED), (S.ACTIVE, S.CANCELLING),
    (S.CANCELLING, S.CANCELLED), (S.CANCELLING, S.FAILED),
    (S.COMPLETED, S.SETUP), (S.FAILED, S.SETUP), (S.CANCELLED, S.SETUP),
}


def test_status_strings_are_the_manuals_and_qemus():
    assert [s.value for s in S] == [
        "none", "setup", "active", "completed", "failed", "cancelling", "cancelled"]


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_transition_table(src, dst):
    assert can_transition(src, dst) == ((src, dst) in LEGAL)


def _at(status: S) -> MigrationState:
    """A holder driven to ``status`` through legal steps."""
    st = MigrationState()
    path = {
        S.NONE: [], S.SETUP: ["begin"], S.ACTIVE: ["begin", S.ACTIVE],
        S.COMPLETED: ["begin", S.ACTIVE, S.COMPLETED], S.FAILED: ["begin", "fail"],
        S.CANCELLING: ["begin", "cancel"], S.CANCELLED: ["begin", "cancel", S.CANCELLED],
    }[status]
    for step in path:
        if step == "begin":
            st.begin(KIND_MIGRATION)
        elif step == "fail":
            st.fail("boom")
        elif step == "cancel":
            assert st.request_cancel()
        else:
            st.transition(step)
    assert st.status is status
    return st


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_holder_enforces_the_table(src, dst):
    st = _at(src)
    if (src, dst) in LEGAL:
        st.transition(dst)
        assert st.status is dst
    else:
        with pytest.raises(InvalidStateError, match=f"from '{src.value}' to '{dst.value}'"):
            st.transition(dst)
        assert st.status is src


@pytest.mark.parametrize("busy", [S.SETUP, S.ACTIVE, S.CANCELLING])
def test_begin_refused_while_a_job_runs(busy):
    st = _at(busy)
    with pytest.raises(InvalidStateError, match="already in progress"):
        st.begin(KIND_SNAPSHOT)
    assert st.status is busy


@pytest.mark.parametrize("done", [S.NONE, S.COMPLETED, S.FAILED, S.CANCELLED])
def test_begin_after_a_finished_job_resets_figures(done):
    st = _at(done)
    st.update(transferred=123)
    st.begin(KIND_SNAPSHOT)
    assert st.status is S.SETUP and st.kind == KIND_SNAPSHOT
    assert st.stats().transferred == 0 and st.error is None


def test_fail_records_the_reason_and_is_a_no_op_once_ended():
    st = _at(S.ACTIVE)
    st.fail("disk full")
    assert st.status is S.FAILED and st.error == "disk full"
    st.fail("again")
    assert st.error == "disk full"
    done = _at(S.COMPLETED)
    done.fail("late")
    assert done.status is S.COMPLETED


def test_cancel_only_while_running_and_before_commit():
    assert not _at(S.NONE).request_cancel()
    assert not _at(S.COMPLETED).request_cancel()
    st = _at(S.ACTIVE)
    assert st.commit()
    assert not st.request_cancel()
    assert st.status is S.ACTIVE
    st2 = _at(S.ACTIVE)
    assert st2.request_cancel() and st2.cancel_requested
    assert not st2.commit()


def test_cancel_and_commit_race_has_exactly_one_winner():
    for _ in range(200):
        st = _at(S.ACTIVE)
        results = {}
        barrier = threading.Barrier(2)

        def cancel():
            barrier.wait()
            results["cancel"] = st.request_cancel()

        def commit():
            barrier.wait()
            results["commit"] = st.commit()

        ts = [threading.Thread(target=cancel), threading.Thread(target=commit)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert results["cancel"] != results["commit"]


def test_listener_sees_every_status_in_order():
    seen = []
    st = MigrationState(listener=seen.append)
    st.begin(KIND_MIGRATION)
    st.transition(S.ACTIVE)
    st.request_cancel()
    st.transition(S.CANCELLED)
    assert seen == [S.SETUP, S.ACTIVE, S.CANCELLING, S.CANCELLED]


def test_query_before_anything_and_after_a_snapshot_is_the_status_alone():
    st = MigrationState()
    assert st.query_migrate_info() == {"status": "none"}
    st.begin(KIND_SNAPSHOT)
    assert st.query_migrate_info() == {"status": "setup"}
    st.transition(S.ACTIVE)
    st.update(total=1 << 20, transferred=5 * 4096, remaining=4096, normal=5, duplicate=250,
              total_time=7, setup_time=1)
    # while the snapshot is written: QEMU's figures, so a client can follow it
    info = st.query_migrate_info()
    assert info["status"] == "active" and info["total-time"] == 7 and info["setup-time"] == 1
    assert {k: info["ram"][k] for k in ("total", "transferred", "remaining", "normal", "duplicate")} == {
        "total": 1 << 20, "transferred": 5 * 4096, "remaining": 4096, "normal": 5, "duplicate": 250}
    st.transition(S.COMPLETED)
    # exactly what the manual shows after a snapshot
    assert st.query_migrate_info() == {"status": "completed"}


def test_a_cancelled_snapshot_reports_the_status_alone():
    st = MigrationState()
    st.begin(KIND_SNAPSHOT)
    st.transition(S.ACTIVE)
    assert st.request_cancel()
    assert st.query_migrate_info()["status"] == "cancelling" and "ram" in st.query_migrate_info()
    st.transition(S.CANCELLED)
    assert st.query_migrate_info() == {"status": "cancelled"}


def test_check_idle_refuses_while_a_job_runs():
    st = MigrationState()
    st.check_idle()
    st.begin(KIND_SNAPSHOT)
    with pytest.raises(InvalidStateError, match="already in progress .status 'setup'"):
        st.check_idle()
    st.transition(S.ACTIVE)
    st.transition(S.COMPLETED)
    st.check_idle()


def test_activate_loses_to_an_earlier_cancel():
    st = MigrationState()
    st.begin(KIND_MIGRATION)
    assert st.request_cancel()
    assert not st.activate()
    assert st.status is S.CANCELLING
    st.transition(S.CANCELLED)
    st.begin(KIND_MIGRATION)
    assert st.activate() and st.status is S.ACTIVE
    assert not st.activate()  # only from setup


def test_query_failed_carries_error_desc():
    st = MigrationState()
    st.begin(KIND_INCOMING)
    st.fail("memory size differs: source 1, destination 2")
    assert st.query_migrate_info() == {
        "status": "failed", "error-desc": "memory size differs: source 1, destination 2"}


def test_query_live_migration_progress_has_qemus_shape():
    st = MigrationState()
    st.begin(KIND_MIGRATION)
    assert st.query_migrate_info() == {"status": "setup"}
    st.transition(S.ACTIVE)
    st.update(total=1 << 20, transferred=4096 * 3 + 40, remaining=8192, duplicate=10, normal=3,
              dirty_pages_rate=55, mbps=12.3456, dirty_sync_count=2, setup_time=4,
              total_time=99, expected_downtime=17)
    info = st.query_migrate_info()
    assert info == {
        "status": "active", "total-time": 99, "setup-time": 4, "expected-downtime": 17,
        "ram": {"total": 1 << 20, "transferred": 4096 * 3 + 40, "remaining": 8192,
                "duplicate": 10, "normal": 3, "normal-bytes": 3 * PAGE_SIZE,
                "dirty-pages-rate": 55, "mbps": 12.346, "dirty-sync-count": 2,
                "page-size": PAGE_SIZE},
    }
    st.update(downtime=21)
    st.transition(S.COMPLETED)
    info = st.query_migrate_info()
    assert info["status"] == "completed" and info["downtime"] == 21
    assert "expected-downtime" not in info and info["ram"]["normal"] == 3


def test_update_rejects_unknown_figures():
    st = _at(S.ACTIVE)
    with pytest.raises(AttributeError):
        st.update(bogus=1)
