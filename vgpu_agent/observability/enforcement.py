"""Holding each pod's MPS clients to its allowance: acting on what :mod:`.excess` decides.

Under enforced confinement (``mps.confinement``, MPS on) every attribution the refresher
takes is handed to :meth:`ClientEnforcer.check`, every ``isolation.check_interval_s``. Each
client beyond its pod's allowance is, with ``isolation.excess_clients = "end"``, ended
through the GPU's MPS daemon (``terminate_client``, by the function the composition root
hands in); with ``"report"`` it is only reported. Either way once per client: one journal
entry (``VGPU_EVENT=mps-client-ended``, ``GPU_UUID``, ``VGPU_POD``, ``VGPU_CONTAINER``,
``CLIENT_PID``, ``VGPU_REASON``, ``VGPU_ACTION``), the counter
``vgpu_mps_clients_ended_total`` for each one ended, and the most recent in `vgpu-agent
status`. An end that fails is logged once per client, with the daemon's answer, and tried
again at the next check; a client ended already is never ended again.

"Newest" is by process start time (``/proc/<pid>/stat``); where ``/proc`` hides a pod's
processes (``ProtectProc=invisible`` for an agent whose group is not root) it is when the
agent first saw the client, which the check interval bounds.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from vgpu_agent.config.isolation import client_policy_line, clients_enforced
from vgpu_agent.config.schema import Config, MpsConfig
from vgpu_agent.host.log import log_event
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.observability.attribution import Attribution
from vgpu_agent.observability.excess import (
    UNATTRIBUTED,
    ExcessClient,
    StartTime,
    excess_clients,
)

log = logging.getLogger(__name__)

#: How many acted-on clients `vgpu-agent status` shows (the journal keeps every one).
RECENT_ENDINGS = 20

#: How many of the clients acted on the text status prints (the JSON has all it keeps).
STATUS_CLIENT_ACTIONS = 5

#: What was done with a client.
ENDED = "ended"
REPORTED = "reported"
FAILED = "failed"

#: (MPS settings, GPU UUID, client pid) -> where the client was ended; None when the GPU's
#: daemon serves no such client; raises VgpuError (with the daemon's answer) when it fails.
EndClient = Callable[[MpsConfig, str, int], Optional[str]]
#: Told (GPU UUID, pod, reason) of each client ended: the metrics counter.
CountEnded = Callable[[str, str, str], None]
#: The pods the fault policy holds at no MPS client: pod UID -> why.
HeldPods = Callable[[], Mapping[str, str]]


def _no_pods_held() -> Mapping[str, str]:
    return {}


def process_start_s(
    pid: int, proc_root: str = "/proc", ticks_per_s: Optional[int] = None
) -> Optional[float]:
    """When process ``pid`` started, in seconds since boot (``/proc/<pid>/stat``, field 22,
    in clock ticks: ``SC_CLK_TCK`` a second unless told); None when it is gone or hidden."""
    try:
        with open(os.path.join(proc_root, str(pid), "stat"), encoding="utf-8") as stat:
            text = stat.read()
        # The command name (field 2) may hold spaces and parentheses: count after its end.
        fields = text.rpartition(")")[2].split()
        return int(fields[19]) / (ticks_per_s or os.sysconf("SC_CLK_TCK"))
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        return None


def _boot_clock() -> float:
    """Seconds since boot, the clock of /proc's start times."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class ClientAction:
    """What the policy did with one client, and when (wall clock)."""

    client: ExcessClient
    action: str
    at_epoch_s: float
    #: Where it was ended, or why ending it failed.
    detail: str = ""

    def describe(self) -> dict[str, Any]:
        """The entry as `vgpu-agent status --json` shows it."""
        client = self.client
        shown: dict[str, Any] = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at_epoch_s)),
            "gpu_uuid": client.gpu_uuid,
            "pod": client.pod,
            "pod_uid": client.pod_uid,
            "container": client.container,
            "pid": client.pid,
            "action": self.action,
            "reason": client.reason,
            "why": client.why,
        }
        if self.detail:
            shown["detail"] = self.detail
        return shown


class ClientEnforcer:
    """Acts on the pods' MPS clients beyond their allowance (the check runs on the
    observability refresher's thread; describe on any)."""

    def __init__(
        self,
        config: Config,
        *,
        end_client: EndClient,
        held: HeldPods = _no_pods_held,
        start_time: StartTime = process_start_s,
        count: CountEnded = lambda gpu_uuid, pod, reason: None,
        wall_clock: Callable[[], float] = time.time,
        boot_clock: Callable[[], float] = _boot_clock,
    ) -> None:
        self._config = config
        self._end_client = end_client
        self._held = held
        self._start_time = start_time
        self._count = count
        self._wall_clock = wall_clock
        self._boot_clock = boot_clock
        #: (GPU UUID, pid) -> what was done, for clients the attribution still lists.
        self._done: dict[tuple[str, int], str] = {}
        #: Clients whose failed end was logged (each once until it goes).
        self._failed: set[tuple[str, int]] = set()
        #: Clients no server of their daemon listed (logged once).
        self._unserved: set[tuple[str, int]] = set()
        #: pid -> when the agent first saw it (seconds since boot), where /proc hides it.
        self._first_seen: dict[int, float] = {}
        self._held_problem = ""
        #: Guards what describe() reads from another thread.
        self._lock = threading.Lock()
        self._recent: collections.deque[ClientAction] = collections.deque(maxlen=RECENT_ENDINGS)
        self._held_now: Mapping[str, str] = {}

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config from the next check on."""
        self._config = config

    @property
    def active(self) -> bool:
        """Whether the config asks for the check (enforced confinement, MPS on)."""
        return clients_enforced(self._config)

    def pending(self) -> bool:
        """Whether the next check has work even if no client came or went: an end to try
        again, a client to look for again, or other pods held than at the last check."""
        if not self.active:
            return False
        if self._failed or self._unserved:
            return True
        held = self._held_pods()
        with self._lock:
            return held != self._held_now

    def _started(self, pid: int) -> Optional[float]:
        started = self._start_time(pid)
        return started if started is not None else self._first_seen.get(pid)

    def _held_pods(self) -> Mapping[str, str]:
        try:
            held = dict(self._held())
        except Exception as exc:  # a broken policy must not stop the check
            message = f"asking which pods are held at no MPS client failed: {exc}"
            if message != self._held_problem:
                log.warning("%s", message)
                self._held_problem = message
            return {}
        self._held_problem = ""
        return held

    def check(self, attribution: Attribution) -> list[ClientAction]:
        """Act on the clients ``attribution`` shows beyond their pods' allowance; what was
        done now (nothing when the config asks for no check)."""
        present = attribution.client_keys()
        now = self._boot_clock()
        # Seen before: when first seen; new: now; gone: forgotten.
        self._first_seen = {
            pid: self._first_seen.get(pid, now) for pid in {pid for _gpu_uuid, pid in present}
        }
        # Gone clients are forgotten: a pid seen again later is another process.
        self._done = {key: done for key, done in self._done.items() if key in present}
        self._failed &= present
        self._unserved &= present
        if not self.active:
            return []
        config = self._config
        held = self._held_pods()
        with self._lock:
            self._held_now = held
        ended = {key for key, done in self._done.items() if done == ENDED}
        found = excess_clients(
            attribution,
            clients_per_vgpu=config.isolation.clients_per_vgpu,
            held=held,
            started=self._started,
            skip=ended,
        )
        actions = []
        for client in found:
            key = (client.gpu_uuid, client.pid)
            if key in self._done:
                continue
            if not client.endable or config.isolation.excess_clients == "report":
                actions.append(self._record(client, REPORTED))
                continue
            action = self._end(config.mps, client)
            if action is not None:
                actions.append(action)
        return actions

    def _end(self, mps: MpsConfig, client: ExcessClient) -> Optional[ClientAction]:
        key = (client.gpu_uuid, client.pid)
        try:
            where = self._end_client(mps, client.gpu_uuid, client.pid)
        except VgpuError as exc:
            if key in self._failed:
                return None
            self._failed.add(key)
            return self._record(client, FAILED, str(exc))
        if where is None and key in self._failed:
            # An earlier attempt failed after terminate_client may have reached the daemon
            # (its answer could not be read back): the client is gone from every server
            # now, by that attempt or because it exited. Either way it runs no CUDA work.
            where = "no MPS server lists it any more, after an earlier attempt"
        if where is None:
            if key not in self._unserved:
                self._unserved.add(key)
                log.info(
                    "MPS client %d on GPU %s is beyond its pod's allowance, but no MPS server "
                    "of the GPU lists it (it may have exited); looking again at the next check",
                    client.pid,
                    client.gpu_uuid,
                )
            return None
        self._count(client.gpu_uuid, client.pod, client.reason)
        return self._record(client, ENDED, where)

    def _record(self, client: ExcessClient, action: str, detail: str = "") -> ClientAction:
        entry = ClientAction(client, action, self._wall_clock(), detail)
        if action != FAILED:
            self._done[(client.gpu_uuid, client.pid)] = action
        with self._lock:
            self._recent.append(entry)
        who = (
            f"pod {client.pod} container {client.container}"
            if client.pod
            else "no pod holding its vGPUs"
        )
        if action == ENDED:
            said = f"ended MPS client {client.pid} ({detail})"
        elif client.reason == UNATTRIBUTED:
            said = f"MPS client {client.pid} reported, never ended"
        elif action == REPORTED:
            said = (
                f"MPS client {client.pid} beyond its pod's allowance reported, not ended "
                '(isolation.excess_clients = "report")'
            )
        else:
            said = f"ending MPS client {client.pid} failed ({detail}); trying again at each check"
        log_event(
            log,
            logging.INFO if client.reason == UNATTRIBUTED else logging.WARNING,
            f"GPU {client.gpu_uuid}: {said}: {who}: {client.why}",
            VGPU_EVENT="mps-client-ended",
            GPU_UUID=client.gpu_uuid,
            VGPU_POD=client.pod,
            VGPU_CONTAINER=client.container,
            CLIENT_PID=str(client.pid),
            VGPU_REASON=client.reason,
            VGPU_ACTION=action,
        )
        return entry

    def describe(self) -> dict[str, Any]:
        """The policy for `vgpu-agent status`: whether it acts, how, which pods are held,
        and the clients acted on most recently (oldest first)."""
        isolation = self._config.isolation
        with self._lock:
            held, recent = dict(self._held_now), [entry.describe() for entry in self._recent]
        return {
            "active": self.active,
            "summary": client_policy_line(self._config),
            "excess_clients": isolation.excess_clients,
            "clients_per_vgpu": isolation.clients_per_vgpu,
            "check_interval_s": isolation.check_interval_s,
            "held": held,
            "recent": recent,
        }


def policy_status_lines(policy: Mapping[str, Any]) -> list[str]:
    """The lines `vgpu-agent status` prints about the per-pod client policy (its
    ``"mps_client_policy"``): what it does, the pods it holds, what it did last."""
    lines = [f"per-pod MPS clients: {policy['summary']}"]
    for uid, why in sorted((policy.get("held") or {}).items()):
        lines.append(f"  held at no MPS client: pod {uid}: {why}")
    for entry in (policy.get("recent") or [])[-STATUS_CLIENT_ACTIONS:]:
        who = f"{entry['pod']} {entry['container']}" if entry["pod"] else "no pod"
        detail = f" ({entry['detail']})" if entry.get("detail") else ""
        lines.append(
            f"  MPS client {entry['action']} {entry['at']}: GPU {entry['gpu_uuid']} pid "
            f"{entry['pid']}, {who}: {entry['why']}{detail}"
        )
    return lines
