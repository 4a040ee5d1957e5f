"""Waiting in tests on something that happens, with a deadline, instead of a fixed sleep."""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

import pytest

_T = TypeVar("_T")

#: Long enough for a loaded 2-core CI machine; a passing test never waits this long.
DEFAULT_TIMEOUT_S = 30.0


def wait_for(
    probe: Callable[[], Optional[_T]],
    what: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = 0.01,
) -> _T:
    """Call ``probe`` until it returns something other than None or False, and return that;
    fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
