"""The one agent harness of the tests: an agent built by the composition root and run in a
thread, a kubelet stand-in on real unix sockets, and a real datagram socket as systemd's
NOTIFY_SOCKET. The ``run_agent`` fixture (tests/conftest.py) starts them and cleans up."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vgpu_agent.agent.loop import Agent
from vgpu_agent.config.schema import (
    AgentConfig,
    Config,
    GpusConfig,
    HealthConfig,
    MpsConfig,
    PluginConfig,
    SimulatedConfig,
)
from vgpu_agent.frontends.deviceplugin.server import AdvertisedDevice
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.kubelet import KubeletStandin

RESOURCE = "eks.amazonaws.com/vgpu"
#: Generous bound for waits on a loaded 2-core CI machine; bench/ has the real numbers.
WAIT_S = 15.0


class NotifyListener:
    """A real datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode())
                self._lock.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float = WAIT_S) -> str:
        """The first datagram matching ``predicate``."""
        with self._lock:
            found: list[str] = []

            def matched() -> bool:
                found[:] = [m for m in self.messages if predicate(m)]
                return bool(found)

            if not self._lock.wait_for(matched, timeout=timeout_s):
                raise TimeoutError(f"no matching notification in {self.messages!r}")
            return found[0]

    def count(self, predicate: Callable[[str], bool]) -> int:
        """How many datagrams so far match ``predicate``."""
        with self._lock:
            return sum(1 for message in self.messages if predicate(message))

    def wait_for_count(
        self, predicate: Callable[[str], bool], count: int, timeout_s: float = WAIT_S
    ) -> None:
        """Wait until ``count`` datagrams matching ``predicate`` have arrived."""
        with self._lock:

            def enough() -> bool:
                return sum(1 for message in self.messages if predicate(message)) >= count

            if not self._lock.wait_for(enough, timeout=timeout_s):
                raise TimeoutError(
                    f"fewer than {count} matching notifications in {self.messages!r}"
                )

    def close(self) -> None:
        """Stop reading and close the socket."""
        self._stop = True
        self._thread.join()
        self.sock.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "") -> None:
    """Poll ``predicate`` until it holds; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what or predicate}")
        time.sleep(0.02)


def make_config(root: str, **overrides: object) -> Config:
    """Two simulated GPUs of 4 vGPUs, fast health checks, everything under ``root``."""
    config = Config(
        agent=AgentConfig(state_dir=f"{root}/state"),
        plugin=PluginConfig(plugin_dir=f"{root}/dp"),
        gpus=GpusConfig(backend="simulated", replicas_per_gpu=4),
        mps=MpsConfig(pipe_root=f"{root}/mps", log_root=f"{root}/mpslog"),
        health=HealthConfig(
            recovery_quiet_period_s=0.5, poll_interval_s=0.05, mps_check_interval_s=0.05
        ),
        simulated=SimulatedConfig(count=2),
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


@dataclass
class AgentRun:
    """An agent running in a thread with a kubelet stand-in and a NOTIFY_SOCKET listener."""

    agent: Agent
    standin: KubeletStandin
    notify: NotifyListener
    notifier: Notifier
    root: str
    thread: threading.Thread = field(default_factory=threading.Thread)
    exit_code: list[int] = field(default_factory=list)

    def devices(
        self, predicate: Callable[[tuple[AdvertisedDevice, ...]], bool], timeout_s: float = WAIT_S
    ) -> tuple[AdvertisedDevice, ...]:
        """The first device list the stand-in received that matches ``predicate``."""
        return self.standin.wait_for_devices(predicate, timeout_s, RESOURCE)

    def status_seen(self, words: str, timeout_s: float = WAIT_S) -> str:
        """The first STATUS= notification that contains ``words``."""
        return self.notify.wait_for(lambda m: "STATUS=" in m and words in m, timeout_s)

    def stop(self) -> int:
        """Stop the agent and return its exit code."""
        self.agent.request_stop("test finished")
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "the agent did not stop"
        return self.exit_code[0]


def agent_runs(root: str) -> Iterator[Callable[..., AgentRun]]:
    """Start agents (each with its stand-in, started unless ``kubelet`` is False); every
    agent is stopped, and every stand-in and listener closed, when the generator ends.
    Keywords other than the harness's own go to :func:`vgpu_agent.runtime.compose.build_agent`."""
    runs: list[AgentRun] = []

    def start(
        config: Optional[Config] = None,
        *,
        kubelet: bool = True,
        watchdog_usec: Optional[int] = None,
        dial_timeout_s: float = 5.0,
        **parts: Any,
    ) -> AgentRun:
        config = config or make_config(root)
        standin = KubeletStandin(config.plugin.plugin_dir, dial_timeout_s=dial_timeout_s)
        if kubelet:
            standin.start()
        notify = NotifyListener(os.path.join(root, f"notify{len(runs)}"))
        notifier = Notifier(notify.path, watchdog_usec=watchdog_usec, use_libsystemd=False)
        agent = build_agent(config, notifier=notifier, **parts)
        run = AgentRun(agent, standin, notify, notifier, root)
        run.thread = threading.Thread(
            target=lambda: run.exit_code.append(agent.run()), name="agent-under-test", daemon=True
        )
        run.thread.start()
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.thread.is_alive():
            run.stop()
        run.standin.stop()
        run.notifier.close()
        run.notify.close()


def scrape_metrics(address: str) -> dict[str, float]:
    """Scrape ``http://<address>/metrics`` as Prometheus does: each sample's value under
    ``name{label=value,...}`` (labels sorted)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples
