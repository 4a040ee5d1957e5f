"""A stand-in for nvidia-cuda-mps-control, for tests without a GPU.

It behaves like the real program where the agent can tell (driver 580, see docs/mps.md):

- ``-h``: prints usage; with ``FAKE_MPS_HELP=legacy`` the usage lacks the multi-user
  option, with ``FAKE_MPS_HELP=long`` only the long spelling is listed.
- ``-f [-M]``: the daemon in the foreground. It takes a POSIX lock on ``control_lock`` in
  ``$CUDA_MPS_PIPE_DIRECTORY`` (another daemon holding it: "An instance of this daemon is
  already running", exit 1), writes ``nvidia-cuda-mps-control.pid`` and serves the unix
  socket ``control``: one command per line, each answered and the connection closed.
  ``quit`` ends it. ``FAKE_MPS_START_DELAY_S`` delays listening; ``FAKE_MPS_HANG=1`` makes
  it accept connections but never answer (a hung daemon; SIGSTOP works as well).
- ``-d``: the same, detached into its own session.
- The daemon's pipe directory entries are made with the modes the real one gives them
  (driver 580, docs/mps.md): ``control`` socket 0666, ``control_privileged`` socket 0755,
  ``control_lock`` and the pid file 0666, the ``log`` FIFO 0777; a ``control_lock`` that is
  there already keeps its mode (measured on an H100, driver 580).
- ``FAKE_MPS_COMMAND_LOG=<path>``: the daemon appends every command it receives there, one
  a line, so tests see which defaults were set and when.
- The daemon keeps its defaults (``set_default_active_thread_percentage``,
  ``set_default_device_pinned_mem_limit <dev> <value>``) in memory only, like the real
  one: a restarted daemon has none, and the get commands answer as driver 580 does
  (bench/RESULTS.md): the percentage with one decimal, the memory limit in whole GiB
  rounded down (``17971M`` reads ``17G``), nothing when no limit is set.
- ``fake_start_server <pid>`` (stand-in only) stands for a client spawning a server: it
  appears in ``get_server_list`` with the daemon's defaults of that moment, and the
  per-server commands (``set_active_thread_percentage <pid> <n>``,
  ``set_device_pinned_mem_limit <pid> <dev> <value>`` and their ``get_`` forms) act on it.
- ``get_client_list <server>`` lists the server's clients, one pid a line;
  ``terminate_client <server> <client>`` removes the client from that list and answers
  nothing. Which clients a server has is up to the test: ``fake_add_client <server>
  <pid>`` (stand-in only) adds one, as a client connecting would; ``fake_refuse_terminate
  1`` (stand-in only; ``0`` undoes it) makes ``terminate_client`` answer an error and end
  nothing. An unknown server or client gets an answer that is no pid (the stand-in's own
  words: the real daemon's were not recorded).
- ``start_server -uid <uid>`` starts a server (a made-up pid from 5000000 up) unless one
  runs; ``fake_end_servers`` (stand-in only) ends every server, as a kill or a fault would.
  ``FAKE_MPS_NO_SERVER=1`` makes ``start_server`` start nothing (something else holds the
  GPU).
- no option: the client. It sends each line of stdin to the daemon and prints the
  answers; no daemon: "Cannot find MPS control daemon process", exit 1.
"""

from __future__ import annotations

# Only modules that load fast: the tests start the client some five hundred times, and
# `socket` and `typing` were most of its start-up (the daemon imports `socket` itself).
import _socket
import fcntl
import os
import sys
import time

HELP = """nvidia-cuda-mps-control [options] [command]
OPTIONS:
  -h,--help                Print this message
  -d,--daemon              Setup the daemon in the background
  -f,--forground           Setup the daemon in the foreground
{multi_user}  -q,--ready-devices      Prepare the daemon to query devices on startup

COMMAND:
  quit
                       Terminate the controller
  get_server_list
                       Print out a list of servers
"""
MULTI_USER_LINES = {
    "": "  -M,--multiuser-server    Enable multi-user mode\n",
    "long": "  --multiuser-server       Enable multi-user mode\n",
    "legacy": "",
}


def pipe_dir() -> str:
    """The pipe directory, as the real program defaults it."""
    return os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")


def mebibytes(value: str) -> int:
    """A memory value as the control commands take it ("10194M", "17G", bytes) in MiB."""
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    if value[-1:].upper() in units:
        return int(float(value[:-1]) * units[value[-1:].upper()])
    return int(value) // (1024 * 1024)


def _server_command(words: list[str], state: dict[str, str]) -> tuple[bool, str]:
    """The per-server commands on a running server's pid: (True, reply); (False, "") for
    other commands."""
    if len(words) < 2 or f"server{words[1]}" not in state:
        return False, ""
    pid = words[1]
    if words[0] == "set_active_thread_percentage" and len(words) == 3:
        state[f"threads@{pid}"] = words[2]
        return True, words[2]
    if words[0] == "get_active_thread_percentage" and len(words) == 2:
        return True, f"{float(state.get(f'threads@{pid}', '100')):.1f}"
    if words[0] == "set_device_pinned_mem_limit" and len(words) == 4:
        state[f"memory{words[2]}@{pid}"] = words[3]
        return True, ""
    if words[0] == "get_device_pinned_mem_limit" and len(words) == 3:
        memory = state.get(f"memory{words[2]}@{pid}")
        return True, "" if memory is None else f"{mebibytes(memory) // 1024}G"
    return False, ""


def _client_command(words: list[str], state: dict[str, str]) -> tuple[bool, str]:
    """The commands on a server's clients: (True, reply); (False, "") for other commands."""
    if words[0] == "fake_refuse_terminate" and len(words) == 2:
        state["refuse_terminate"] = words[1]
        return True, ""
    if words[0] not in ("get_client_list", "terminate_client", "fake_add_client"):
        return False, ""
    if len(words) < 2 or f"server{words[1]}" not in state:
        return True, f"Server {words[1] if len(words) > 1 else ''} not found"
    key = f"clients@{words[1]}"
    clients = state.get(key, "").split()
    if words[0] == "get_client_list" and len(words) == 2:
        return True, "\n".join(clients)
    if words[0] == "fake_add_client" and len(words) == 3:
        # Stand-in only: a client connecting to the server.
        state[key] = " ".join([*clients, words[2]])
        return True, ""
    if words[0] == "terminate_client" and len(words) == 3:
        if state.get("refuse_terminate") == "1":
            return True, f"Failed to terminate client {words[2]} (stand-in refusal)"
        if words[2] not in clients:
            return True, f"Client {words[2]} not found on server {words[1]}"
        state[key] = " ".join(client for client in clients if client != words[2])
        return True, ""
    return True, f"Unrecognized arguments to {words[0]}"


#: Where the pids of servers started by ``start_server`` begin (above any real pid_max).
FAKE_SERVER_PID = 5_000_000


def _spawn_server(pid: str, state: dict[str, str]) -> None:
    """A server ``pid`` with the daemon's defaults of this moment."""
    state[f"server{pid}"] = ""
    state[f"threads@{pid}"] = state.get("threads", "100")
    if "memory0" in state:
        state[f"memory0@{pid}"] = state["memory0"]


def answer(command: str, state: dict[str, str]) -> str:
    """The daemon's reply to one control command."""
    words = command.split()
    if not words:
        return ""
    if words[0] == "get_server_list":
        return "\n".join(key[len("server") :] for key in state if key.startswith("server"))
    if words[0] == "fake_start_server" and len(words) == 2:
        # Stand-in only: a client's connection spawning a server, which takes the daemon's
        # defaults of that moment and keeps them (driver 580, bench/RESULTS.md).
        _spawn_server(words[1], state)
        return ""
    if words[0] == "start_server" and words[1:2] == ["-uid"] and len(words) == 3:
        # The real command: a server now, before any client (a pid no process has).
        if os.environ.get("FAKE_MPS_NO_SERVER") != "1" and not any(
            key.startswith("server") for key in state
        ):
            _spawn_server(str(FAKE_SERVER_PID + len(state)), state)
        return ""
    if words[0] == "fake_end_servers":
        # Stand-in only: every server gone (killed, or ended by a fault).
        for key in [key for key in state if key.startswith(("server", "clients@"))]:
            del state[key]
        return ""
    handled, reply = _client_command(words, state)
    if handled:
        return reply
    handled, reply = _server_command(words, state)
    if handled:
        return reply
    if words[0] == "set_default_active_thread_percentage" and len(words) == 2:
        state["threads"] = words[1]
        return ""
    if words[0] == "get_default_active_thread_percentage":
        return f"{float(state.get('threads', '100')):.1f}"
    if words[0] == "set_default_device_pinned_mem_limit" and len(words) == 3:
        state[f"memory{words[1]}"] = words[2]
        return ""
    if words[0] == "get_default_device_pinned_mem_limit" and len(words) == 2:
        memory = state.get(f"memory{words[1]}")
        # Driver 580 prints the limit in whole GiB, rounded down (17971M reads "17G").
        return "" if memory is None else f"{mebibytes(memory) // 1024}G"
    if words[0] == "quit":
        return ""
    return f"Unrecognized command {words[0]}"


def serve(multi_user: bool) -> int:
    """Run the control daemon until ``quit``."""
    import socket  # the daemon's only: the client starts without it

    def bind_socket(path: str, mode: int) -> socket.socket:
        """A listening unix socket at ``path`` (replacing a stale one) with ``mode``."""
        if os.path.exists(path):
            os.unlink(path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        os.chmod(path, mode)
        server.listen(16)
        return server

    directory = pipe_dir()
    os.makedirs(directory, exist_ok=True)
    lock_path = os.path.join(directory, "control_lock")
    created = not os.path.lexists(lock_path)
    lock = open(lock_path, "a")  # noqa: SIM115 - held for life
    try:
        # A POSIX lock, as the real daemon's: it refuses to start while any process holds
        # one on the file, a read lock included (measured on an H100, driver 580).
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.stdout.write("An instance of this daemon is already running\n")
        return 1
    if created:
        # The real daemon's mode for a lock file it creates; one it finds keeps its mode.
        os.chmod(lock_path, 0o666)  # noqa: S103
    pid_path = os.path.join(directory, "nvidia-cuda-mps-control.pid")
    with open(pid_path, "w") as pid_file:
        pid_file.write(str(os.getpid()))
    os.chmod(pid_path, 0o666)  # noqa: S103 - the real daemon's mode
    log_fifo = os.path.join(directory, "log")
    if not os.path.exists(log_fifo):
        os.mkfifo(log_fifo)
    os.chmod(log_fifo, 0o777)  # noqa: S103 - the real daemon's mode (what the lockdown fixes)
    time.sleep(float(os.environ.get("FAKE_MPS_START_DELAY_S", "0")))
    privileged = bind_socket(os.path.join(directory, "control_privileged"), 0o755)
    path = os.path.join(directory, "control")
    server = bind_socket(path, 0o666)
    sys.stdout.write(f"Starting control daemon using socket {path} (multi-user: {multi_user})\n")
    sys.stdout.flush()
    hang = os.environ.get("FAKE_MPS_HANG") == "1"
    command_log = os.environ.get("FAKE_MPS_COMMAND_LOG")
    held = []
    state: dict[str, str] = {}
    while True:
        connection, _ = server.accept()
        if hang:
            held.append(connection)
            continue
        with connection:
            try:
                command = connection.makefile("r").readline().strip()
                if command_log:
                    with open(command_log, "a", encoding="utf-8") as recorded:
                        recorded.write(command + "\n")
                connection.sendall(answer(command, state).encode() + b"\n")
            except OSError:
                # The client gave up (timed out) before the answer: like the real daemon,
                # carry on serving.
                continue
        if command == "quit":
            server.close()
            privileged.close()
            os.unlink(path)
            return 0


def client() -> int:
    """Send each stdin line to the daemon and print its answers."""
    path = os.path.join(pipe_dir(), "control")
    for line in sys.stdin:
        command = line.strip()
        if not command:
            continue
        connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            connection.connect(path)
        except OSError:
            connection.close()
            sys.stdout.write("Cannot find MPS control daemon process\n")
            return 1
        try:
            connection.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        finally:
            connection.close()
        reply = b"".join(chunks).decode()
        if reply.strip():
            sys.stdout.write(reply if reply.endswith("\n") else reply + "\n")
    return 0


def main(arguments: list[str]) -> int:
    """Dispatch on the options like the real program."""
    if "-h" in arguments or "--help" in arguments:
        variant = os.environ.get("FAKE_MPS_HELP", "")
        sys.stdout.write(HELP.format(multi_user=MULTI_USER_LINES[variant]))
        return 0
    multi_user = "-M" in arguments or "--multiuser-server" in arguments
    if "-f" in arguments:
        return serve(multi_user)
    if "-d" in arguments:
        if os.fork() > 0:
            return 0
        os.setsid()
        return serve(multi_user)
    return client()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
