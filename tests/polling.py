"""Waiting in tests for a condition that another thread or process makes true."""

from __future__ import annotations

import time


def eventually(cond, timeout_s: float = 5.0) -> None:
    """Poll ``cond()`` until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
