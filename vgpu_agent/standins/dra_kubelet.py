"""A kubelet stand-in for DRA plugins: the plugin watcher and the DRA manager's calls.

It behaves like the kubelet where a DRA kubelet plugin can tell:

- at start it wipes the node's ResourceSlices (``wipe_slices``, when given), like the
  kubelet's DRA plugin manager does before any driver registered;
- it watches the registry directory for sockets (files starting with '.' are ignored),
  dials each new one, calls ``GetInfo`` (1 s deadline), accepts only type ``DRAPlugin``
  with a supported service (the first of the plugin's list it knows, ``v1.DRAPlugin`` or
  ``v1beta1.DRAPlugin``), and answers ``NotifyRegistrationStatus``; a socket made again
  at the same path is registered again, a removed one deregistered;
- :meth:`DraKubeletStandin.prepare` and :meth:`~DraKubeletStandin.unprepare` call the
  chosen service on the endpoint the plugin named and read the answer per claim uid, a
  claim missing from it counting as failed;
- :meth:`DraKubeletStandin.restart` is a kubelet restart: registrations forgotten, slices
  wiped, existing sockets registered again (the kubelet does not delete them).

Run it alone with ``python3 -m vgpu_agent.standins.dra_kubelet --registry-dir DIR``: it
prints one line per registration, refusal and socket gone, restarts on SIGHUP and stops on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import grpc

from vgpu_agent.frontends._proto import dra_v1_pb2, dra_v1beta1_pb2
from vgpu_agent.frontends._proto import pluginregistration_pb2 as reg_pb
from vgpu_agent.frontends.dra.types import ClaimRef
from vgpu_agent.frontends.serving import CHANNEL_OPTIONS, unix_target

#: The services the stand-in can call, newest first.
KNOWN_SERVICES: dict[str, Any] = {"v1.DRAPlugin": dra_v1_pb2, "v1beta1.DRAPlugin": dra_v1beta1_pb2}
GET_INFO_TIMEOUT_S = 1.0
#: A registration that failed is tried again after this long (the kubelet's reconciler period).
RETRY_S = 1.0
#: The kubelet's deadline for NodePrepareResources / NodeUnprepareResources.
CALL_TIMEOUT_S = 45.0
DEFAULT_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
#: How often the program's main thread wakes to run a signal handler that is due.
SIGNAL_POLL_S = 0.2


@dataclass(frozen=True)
class DraRegistration:
    """One accepted plugin registration."""

    driver: str
    endpoint: str
    service: str
    socket_path: str
    at: float


@dataclass(frozen=True)
class PreparedClaimAnswer:
    """What the plugin answered for one claim."""

    devices: tuple[dict[str, Any], ...] = ()
    error: str = ""


@dataclass
class _Seen:
    identity: tuple[int, int]
    attempted_at: float
    registered: bool = False
    refusal: str = ""


@dataclass
class _State:
    registrations: list[DraRegistration] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    deregistrations: list[str] = field(default_factory=list)


def _socket_identity(path: str) -> Optional[tuple[int, int]]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        return None
    return (info.st_ino, info.st_ctime_ns)


class DraKubeletStandin:
    """The kubelet's plugin watcher and DRA manager, for one registry directory."""

    def __init__(
        self,
        registry_dir: str,
        *,
        wipe_slices: Optional[Callable[[], None]] = None,
        poll_interval_s: float = 0.05,
        on_event: Optional[Callable[[str], None]] = None,
    ) -> None:
        """``on_event`` is told one line per registration, refusal and removed socket."""
        self.registry_dir = registry_dir
        self._on_event = on_event
        self._wipe_slices = wipe_slices
        self._poll_interval_s = poll_interval_s
        self._condition = threading.Condition()
        self._state = _State()
        self._seen: dict[str, _Seen] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.restarts = 0

    def start(self) -> None:
        """Wipe the node's slices, then watch the registry directory."""
        os.makedirs(self.registry_dir, exist_ok=True)
        if self._wipe_slices is not None:
            self._wipe_slices()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="dra-kubelet-standin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def restart(self) -> None:
        """What a kubelet restart does: forget every plugin, wipe the node's slices, and
        register the sockets that are there again."""
        self.stop()
        with self._condition:
            self._seen.clear()
            self._state.registrations.clear()
        self.restarts += 1
        self.start()

    def __enter__(self) -> DraKubeletStandin:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what tests read ----------------------------------------------------------------------

    @property
    def registrations(self) -> list[DraRegistration]:
        """The accepted registrations since the last (re)start, in order."""
        with self._condition:
            return list(self._state.registrations)

    @property
    def refusals(self) -> list[str]:
        """Why registrations were refused, in order."""
        with self._condition:
            return list(self._state.refusals)

    @property
    def deregistrations(self) -> list[str]:
        """Registration sockets that went away, in order."""
        with self._condition:
            return list(self._state.deregistrations)

    def wait_for_registration(self, count: int = 1, timeout_s: float = 5.0) -> DraRegistration:
        """Wait until ``count`` registrations were accepted since the last (re)start."""
        with self._condition:
            if not self._condition.wait_for(
                lambda: len(self._state.registrations) >= count, timeout_s
            ):
                raise TimeoutError(
                    f"{len(self._state.registrations)} DRA registrations within {timeout_s} s, "
                    f"wanted {count} (refused: {self._state.refusals})"
                )
            return self._state.registrations[count - 1]

    # -- the DRA manager's calls --------------------------------------------------------------

    def _registration_of(self, driver: str) -> DraRegistration:
        with self._condition:
            for registration in reversed(self._state.registrations):
                if registration.driver == driver:
                    return registration
        raise LookupError(f"DRA driver {driver} is not registered")

    def _call(self, driver: str, method: str, claims: Sequence[ClaimRef], timeout_s: float) -> Any:
        registration = self._registration_of(driver)
        pb = KNOWN_SERVICES[registration.service]
        service = pb.DESCRIPTOR.services_by_name["DRAPlugin"].full_name
        request_type = getattr(pb, f"{method}Request")
        response_type = getattr(pb, f"{method}Response")
        request = request_type(
            claims=[pb.Claim(namespace=c.namespace, uid=c.uid, name=c.name) for c in claims]
        )
        with grpc.insecure_channel(
            unix_target(registration.endpoint), options=CHANNEL_OPTIONS
        ) as channel:
            call = channel.unary_unary(
                f"/{service}/{method}",
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            return call(request, timeout=timeout_s)

    def prepare(
        self, driver: str, claims: Sequence[ClaimRef], timeout_s: float = CALL_TIMEOUT_S
    ) -> dict[str, PreparedClaimAnswer]:
        """NodePrepareResources for ``claims``; the answer per claim uid."""
        response = self._call(driver, "NodePrepareResources", claims, timeout_s)
        answers: dict[str, PreparedClaimAnswer] = {}
        for claim in claims:
            if claim.uid not in response.claims:
                answers[claim.uid] = PreparedClaimAnswer(
                    error=f"NodePrepareResources left out claim {claim.uid}"
                )
                continue
            entry = response.claims[claim.uid]
            devices = tuple(
                {
                    "request_names": list(device.request_names),
                    "pool_name": device.pool_name,
                    "device_name": device.device_name,
                    "cdi_device_ids": list(device.cdi_device_ids),
                }
                for device in entry.devices
            )
            answers[claim.uid] = PreparedClaimAnswer(devices=devices, error=entry.error)
        return answers

    def unprepare(
        self, driver: str, claims: Sequence[ClaimRef], timeout_s: float = CALL_TIMEOUT_S
    ) -> dict[str, str]:
        """NodeUnprepareResources for ``claims``; the error per claim uid ("" when done)."""
        response = self._call(driver, "NodeUnprepareResources", claims, timeout_s)
        return {
            claim.uid: (
                response.claims[claim.uid].error
                if claim.uid in response.claims
                else f"NodeUnprepareResources left out claim {claim.uid}"
            )
            for claim in claims
        }

    # -- the plugin watcher -------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._scan()
            self._stop.wait(self._poll_interval_s)

    def _scan(self) -> None:
        try:
            names = sorted(os.listdir(self.registry_dir))
        except OSError:
            names = []
        present: set[str] = set()
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(self.registry_dir, name)
            identity = _socket_identity(path)
            if identity is None:
                continue
            present.add(path)
            seen = self._seen.get(path)
            now = time.monotonic()
            if (
                seen is not None
                and seen.identity == identity
                and (seen.registered or now - seen.attempted_at < RETRY_S)
            ):
                continue
            self._seen[path] = _Seen(identity, now)
            self._register(path, self._seen[path])
        for path in [path for path in self._seen if path not in present]:
            del self._seen[path]
            with self._condition:
                self._state.deregistrations.append(path)
                self._condition.notify_all()
            self._emit(f"socket gone {path}")

    def _register(self, path: str, seen: _Seen) -> None:
        with grpc.insecure_channel(unix_target(path), options=CHANNEL_OPTIONS) as channel:
            get_info = channel.unary_unary(
                "/pluginregistration.Registration/GetInfo",
                request_serializer=reg_pb.InfoRequest.SerializeToString,
                response_deserializer=reg_pb.PluginInfo.FromString,
            )
            notify = channel.unary_unary(
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                request_serializer=reg_pb.RegistrationStatus.SerializeToString,
                response_deserializer=reg_pb.RegistrationStatusResponse.FromString,
            )
            try:
                info = get_info(reg_pb.InfoRequest(), timeout=GET_INFO_TIMEOUT_S)
            except grpc.RpcError as exc:
                self._refuse(seen, f"GetInfo on {path} failed: {exc.code().name}", None)
                return
            problem = self._check(info)
            if problem:
                self._refuse(seen, problem, notify)
                return
            service = next(s for s in info.supported_versions if s in KNOWN_SERVICES)
            try:
                notify(
                    reg_pb.RegistrationStatus(plugin_registered=True), timeout=GET_INFO_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                self._refuse(seen, f"NotifyRegistrationStatus failed: {exc.code().name}", None)
                return
        seen.registered = True
        with self._condition:
            self._state.registrations.append(
                DraRegistration(info.name, info.endpoint, service, path, time.monotonic())
            )
            self._condition.notify_all()
        self._emit(f"registered {info.name} service={service} endpoint={info.endpoint}")

    @staticmethod
    def _check(info: Any) -> str:
        if info.type != "DRAPlugin":
            return f"no handler registered for plugin type: {info.type}"
        if not info.supported_versions:
            return "empty list of supported gRPC services (aka supported versions)"
        if not any(s in KNOWN_SERVICES for s in info.supported_versions):
            return (
                f"none of services supported by the plugin ({list(info.supported_versions)}) "
                f"are supported by the kubelet ({list(KNOWN_SERVICES)})"
            )
        if not info.endpoint.startswith("/"):
            return f"endpoint {info.endpoint!r} is not an absolute socket path"
        return ""

    def _refuse(self, seen: _Seen, problem: str, notify: Optional[Any]) -> None:
        seen.refusal = problem
        if notify is not None:
            # The refusal is recorded below whether or not the plugin hears of it.
            with contextlib.suppress(grpc.RpcError):
                notify(
                    reg_pb.RegistrationStatus(plugin_registered=False, error=problem),
                    timeout=GET_INFO_TIMEOUT_S,
                )
        with self._condition:
            self._state.refusals.append(problem)
            self._condition.notify_all()
        self._emit(f"refused: {problem}")

    def _emit(self, line: str) -> None:
        if self._on_event is not None:
            self._on_event(line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the DRA kubelet stand-in in the foreground until SIGTERM or SIGINT; SIGHUP
    restarts it."""
    parser = argparse.ArgumentParser(
        prog="python3 -m vgpu_agent.standins.dra_kubelet",
        description="A kubelet stand-in for DRA plugins: registers the plugins whose sockets "
        "appear in the registry directory and prints what happens.",
    )
    parser.add_argument("--registry-dir", default=DEFAULT_REGISTRY_DIR, help="%(default)s")
    args = parser.parse_args(argv)

    def emit(line: str) -> None:
        print(f"dra-kubelet-standin: {line}", flush=True)

    # SimpleQueue.put is reentrant: the signal handlers may use it whatever the main thread
    # holds at that moment.
    requests: queue.SimpleQueue[str] = queue.SimpleQueue()
    signal.signal(signal.SIGTERM, lambda signum, frame: requests.put("stop"))
    signal.signal(signal.SIGINT, lambda signum, frame: requests.put("stop"))
    signal.signal(signal.SIGHUP, lambda signum, frame: requests.put("restart"))
    standin = DraKubeletStandin(args.registry_dir, on_event=emit)
    try:
        standin.start()
    except OSError as exc:
        print(f"dra-kubelet-standin: cannot start in {args.registry_dir}: {exc}", file=sys.stderr)
        return 1
    emit(f"watching {args.registry_dir}")
    try:
        while True:
            try:
                request = requests.get(timeout=SIGNAL_POLL_S)
            except queue.Empty:
                continue
            if request == "stop":
                break
            standin.restart()
            emit("restarted")
    finally:
        standin.stop()
    emit("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
