"""The packages' dependencies for each target interpreter (scripts/lock-for-python, which
scripts/vendor-python hands to pip): pip itself would evaluate the lock file's markers for
the build host's Python, which left tomli out of the Python 3.9 and 3.10 packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "lock-for-python"


def resolved(python_version: str, lock: Path = REPO / "requirements.lock") -> dict[str, str]:
    """Name -> pinned version of what the packages for ``python_version`` carry."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(lock), python_version],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    pins = [line.split("==") for line in done.stdout.splitlines()]
    names = [name.lower() for name, _ in pins]
    assert len(names) == len(set(names)), f"a name pinned twice for {python_version}: {pins}"
    return {name.lower(): version for name, version in pins}


@pytest.mark.parametrize("python_version", ["3.9", "3.10"])
def test_pythons_without_tomllib_get_tomli(python_version: str) -> None:
    """Python 3.9 and 3.10 have no tomllib: their packages carry tomli."""
    assert "tomli" in resolved(python_version)


@pytest.mark.parametrize("python_version", ["3.11", "3.12", "3.13"])
def test_pythons_with_tomllib_get_no_tomli(python_version: str) -> None:
    """From 3.11 the standard library reads TOML."""
    assert "tomli" not in resolved(python_version)


def test_python_39_gets_the_last_grpcio_and_protobuf_with_its_wheels() -> None:
    """grpcio 1.81 and protobuf 7 need Python 3.10; 3.9 (Amazon Linux 2023's python3)
    gets the last releases that have wheels for it, 3.10 and later the newest."""
    old, new = resolved("3.9"), resolved("3.10")
    assert (old["grpcio"], old["protobuf"]) == ("1.80.0", "6.33.6")
    assert (new["grpcio"], new["protobuf"]) == ("1.85.3", "7.36.2")
    assert set(old) == set(new)


def test_every_runtime_dependency_is_there_for_each_python() -> None:
    """Whatever the target, the agent's own imports are all pinned."""
    for python_version in ("3.9", "3.10", "3.11", "3.12"):
        assert {"grpcio", "protobuf", "nvidia-ml-py", "click", "prometheus-client"} <= set(
            resolved(python_version)
        )


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    """A missing lock file, a broken line and a bad version: one line each, no traceback."""
    broken = tmp_path / "broken.lock"
    broken.write_text("grpcio==1.0 ; python_version <<< 3\n")
    for arguments, words in (
        ([str(tmp_path / "absent.lock"), "3.9"], "cannot read"),
        ([str(broken), "3.9"], "broken.lock:1"),
        ([str(REPO / "requirements.lock"), "three"], "usage"),
    ):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *arguments],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode != 0
        assert words in done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
