"""`vgpu-agent` as a real process, started cheaply.

The tests run the CLI as a process some two hundred times; most of each run was the
interpreter starting and importing the package (about 0.15 s of CPU). Here a
``multiprocessing`` fork server imports the package once, and each run is a child forked
from it: a real process with its own pid, file descriptors, environment, user and exit
status, that enters the program exactly as ``python -m vgpu_agent`` does (``runpy`` on
``vgpu_agent.__main__``). What a fork cannot show, the interpreter's own start, is covered
by ``test_forked_cli_answers_like_the_installed_entry_point`` and by every test that starts
``python -m vgpu_agent`` with ``subprocess`` (the running agents)."""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

#: The context whose children are forked from a server that has imported the CLI.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["vgpu_agent.ops.cli.root", "tests.cli_process"])

#: Runs a command as user nobody. A fresh interpreter, not a fork: the interpreter's
#: paths may lie where nobody cannot read (a pyenv under /root), which a fresh start
#: as nobody copes with and a forked one, mid-import, does not.
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
_ONE_AT_A_TIME = threading.Lock()
#: Environment variables of the test run the CLI must not see.
HIDDEN_ENV = ("VGPU_CONFIG", "NOTIFY_SOCKET", "VGPU_DEBUG")


@dataclass(frozen=True)
class Result:
    """What one CLI process did."""

    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"{' '.join(self.argv)} -> {self.code}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def cli_env() -> dict[str, str]:
    """The test run's environment without what would steer the CLI."""
    return {key: value for key, value in os.environ.items() if key not in HIDDEN_ENV}


def _exit_status(code: object) -> int:
    """The exit status of ``SystemExit(code)``, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(args: tuple[str, ...], env: dict[str, str], out_path: str, err_path: str) -> None:
    """Runs in the forked process: wire stdio to the files, take the environment, then run
    ``python -m vgpu_agent ARGS`` and exit with its status."""
    for fd, path in ((1, out_path), (2, err_path)):
        opened = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["vgpu_agent", *args]
    status = 0
    try:
        runpy.run_module("vgpu_agent", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        status = 1
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


@functools.cache
def _nobody_pycache() -> str:
    """A bytecode cache directory that user nobody may write, removed at exit."""
    path = tempfile.mkdtemp(prefix="vgpu-nobody-pycache-")
    os.chown(path, NOBODY, NOBODY)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def run_cli(
    *args: str,
    as_nobody: bool = False,
    timeout_s: float = 60.0,
) -> Result:
    """Run ``vgpu-agent ARGS`` as a forked process (as user nobody if asked: then a fresh
    one, see AS_NOBODY); kill it if it has not exited within ``timeout_s``."""
    if as_nobody:
        # A bytecode cache of nobody's own: the test run's is root's, so nobody's
        # interpreter would compile the package and the stdlib again at every start.
        nobody_env = cli_env()
        nobody_env["PYTHONPYCACHEPREFIX"] = _nobody_pycache()
        nobody_env.pop("PYTHONDONTWRITEBYTECODE", None)
        return run_cli_exec(*args, timeout_s=timeout_s, prefix=AS_NOBODY, env=nobody_env)
    with tempfile.TemporaryDirectory(prefix="vgcli") as scratch:
        out_path = os.path.join(scratch, "stdout")
        err_path = os.path.join(scratch, "stderr")
        for path in (out_path, err_path):
            with open(path, "w", encoding="utf-8"):
                pass  # empty; the child opens them as its stdout and stderr
        process = _CONTEXT.Process(
            target=_child,
            args=(tuple(args), cli_env(), out_path, err_path),
        )
        # One at a time: with several children of the fork server ending at once, the
        # server now and then loses one's exit status (the parent then reads 255).
        with _ONE_AT_A_TIME:
            process.start()
            process.join(timeout_s)
            if process.exitcode is None:
                process.kill()
                process.join()
                raise subprocess.TimeoutExpired(["vgpu-agent", *args], timeout_s)
        code = process.exitcode  # like subprocess: -N when signal N ended it
        process.close()
        with open(out_path, encoding="utf-8") as out, open(err_path, encoding="utf-8") as err:
            return Result(tuple(args), code, out.read(), err.read())


def run_cli_exec(
    *args: str,
    timeout_s: float = 60.0,
    prefix: Sequence[str] = (),
    env: Optional[dict[str, str]] = None,
) -> Result:
    """Run ``python -m vgpu_agent ARGS`` as a fresh interpreter (what the installed
    ``vgpu-agent`` does), behind ``prefix`` (e.g. AS_NOBODY) if given."""
    completed = subprocess.run(
        [*prefix, sys.executable, "-m", "vgpu_agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=cli_env() if env is None else env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Result(tuple(args), completed.returncode, completed.stdout, completed.stderr)
