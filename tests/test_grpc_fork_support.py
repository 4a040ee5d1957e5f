"""gRPC's fork support is off in the agent (vgpu_agent/__init__.py): on Python 3.9 with
grpcio 1.80, every MPS control command the agent started (a fork while gRPC threads ran)
logged "skipping fork() handlers" and could write epoll errors into the command's output,
which read as a dead daemon (shown with pyenv's 3.9.18; 3.10 and later use vfork)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = (
    "import os, vgpu_agent.frontends.deviceplugin.server; "
    "print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"
)


def _probe(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_agent_turns_grpc_fork_support_off() -> None:
    """The variable is set before grpc is imported, so grpc's core reads it."""
    env = {key: value for key, value in os.environ.items() if key != "GRPC_ENABLE_FORK_SUPPORT"}
    assert _probe(env) == "false"


def test_an_operators_setting_wins() -> None:
    """Set in the unit's environment, the operator's value is kept."""
    assert _probe({**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "true"}) == "true"
