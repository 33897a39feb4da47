"""Polling helper shared by the integration tests."""

import time

TIMEOUT = 10.0


def until(predicate, what="condition", timeout=TIMEOUT):
    """Poll ``predicate`` every 5 ms until it holds; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
