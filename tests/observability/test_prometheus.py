"""A real Prometheus (Debian's ``prometheus`` package) against the agent.

- ``promtool check metrics`` accepts what the endpoint serves and the textfile holds;
- a Prometheus server scraping a simulated agent every second answers every PromQL example
  of docs/observability.md, read from the page itself, as the page says, after the events
  each one is about (an Allocate, an XID, an MPS daemon down), through
  ``promtool query instant``; the XID query answers at the very first scrape that carries
  the XID, also for an XID whose series is new;
- ``promtool check rules`` accepts the packaged alert rules and ``promtool test rules``
  exercises each alert (tests/observability/vgpu-agent-rules.test.yml).

Skipped where promtool and prometheus are not installed, unless
``VGPU_TEST_PROMETHEUS=1`` (``make test-prometheus``, which CI runs through
``make test-system``, installs the package and sets it): then their absence fails."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from tests.cli_process import run_cli
from tests.harness import AgentRun, agent_runs, wait_until
from vgpu_agent.config.parse import load
from vgpu_agent.observability.attribution import gather
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME
from vgpu_agent.standins.podresources import PodResourcesStandin, StandinContainer, StandinPod

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "observability.md"
RULES = REPO / "packaging" / "prometheus" / "vgpu-agent-rules.yml"
RULES_TEST = Path(__file__).with_name("vgpu-agent-rules.test.yml")
RESOURCE = "eks.amazonaws.com/vgpu"
REQUIRED_ENV = "VGPU_TEST_PROMETHEUS"
#: The bound on each wait (Prometheus scrapes every second; the machine may be loaded).
WAIT_S = 30.0
MIB = 1024 * 1024
#: The simulated H100's memory split 4 ways: each vGPU's pinned memory limit.
VGPU_MEMORY_MIB = 81559 // 4


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    missing = (
        f"{name} is not installed: Debian's prometheus package brings it "
        "(scripts/apt-install prometheus, or make test-prometheus, which installs it)"
    )
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"{missing}; {REQUIRED_ENV}=1 asks for this test to run")
    pytest.skip(missing)


@pytest.fixture
def promtool() -> str:
    """The path of promtool (skips, or fails under VGPU_TEST_PROMETHEUS=1, without it)."""
    return _tool("promtool")


def _promtool(promtool: str, *arguments: str, stdin: Optional[str] = None) -> str:
    done = subprocess.run(
        [promtool, *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (
        f"promtool {' '.join(arguments)} -> {done.returncode}\n{done.stdout}{done.stderr}"
    )
    return done.stdout + done.stderr


# -- the docs' PromQL ----------------------------------------------------------------------


@dataclass(frozen=True)
class DocQuery:
    """One expression of the docs' PromQL block, under the comment that names it."""

    title: str
    expr: str


def doc_queries(text: str) -> list[DocQuery]:
    """The expressions of every ``promql`` block of the page. A ``# comment`` names the
    expressions after it; a line goes on the expression before it when it is indented or
    that expression's brackets are still open."""
    queries: list[DocQuery] = []
    for block in re.findall(r"^```promql\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        title = ""
        expressions: list[list[str]] = []  # the current title's, each as its lines
        ended = True  # a blank or comment line ends the expression before it
        for line in block.splitlines():
            if not line.strip() or line.startswith("#"):
                queries.extend(DocQuery(title, "\n".join(lines)) for lines in expressions)
                expressions = []
                ended = True
                if line.startswith("#"):
                    title = line.lstrip("#").strip()
            elif not ended and (line[0].isspace() or _open_brackets("\n".join(expressions[-1]))):
                expressions[-1].append(line)
            else:
                expressions.append([line])
                ended = False
        queries.extend(DocQuery(title, "\n".join(lines)) for lines in expressions)
    return queries


def _open_brackets(expr: str) -> bool:
    return sum(expr.count(c) for c in "([{") > sum(expr.count(c) for c in ")]}")


def test_the_docs_queries_are_read_whole() -> None:
    """The page's block splits into its examples, multi-line ones whole."""
    queries = doc_queries(DOC.read_text(encoding="utf-8"))
    assert len(queries) >= 8
    assert all(query.title for query in queries)
    assert all(not _open_brackets(query.expr) for query in queries)
    assert any("\n" in query.expr for query in queries)


# -- a Prometheus server -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Labels = frozenset[tuple[str, str]]
Result = dict[Labels, float]


class Prometheus:
    """A ``prometheus`` server on loopback scraping one target every second."""

    def __init__(self, root: Path, target: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: vgpu-agent\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self._log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = root / "prometheus.log"
        self._process = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_until(self._ready, WAIT_S, f"prometheus to be ready ({self.log()})")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _ready(self) -> bool:
        assert self._process.poll() is None, f"prometheus exited:\n{self.log()}"
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/-/ready", timeout=2
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, expr: str, at: Optional[float] = None) -> list[dict[str, Any]]:
        """The API's answer to an instant query (for the waits; the docs' queries go through
        promtool)."""
        parameters = {"query": expr}
        if at is not None:
            parameters["time"] = f"{at:.3f}"
        url = f"http://127.0.0.1:{self.port}/api/v1/query?{urllib.parse.urlencode(parameters)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def first_sample_time(self, selector: str, at_least: float) -> Optional[float]:
        """The time of the first scraped sample of ``selector`` whose value is at least
        ``at_least`` (None while there is none)."""
        for series in self.api(f"{selector}[5m]"):
            for timestamp, value in series["values"]:
                if float(value) >= at_least:
                    return float(timestamp)
        return None

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


def query(promtool: str, prometheus: Prometheus, expr: str, at: Optional[float] = None) -> Result:
    """``promtool query instant`` of ``expr`` (at ``at``, else now): each series' labels
    (without ``job``) and value."""
    timing = [f"--time={at:.3f}"] if at is not None else []
    output = _promtool(promtool, "query", "-o", "json", "instant", *timing, prometheus.url, expr)
    result: Result = {}
    for series in json.loads(output):
        labels = {k: v for k, v in series["metric"].items() if k not in ("job", "__name__")}
        result[frozenset(labels.items())] = float(series["value"][1])
    return result


def labels(**pairs: str) -> Labels:
    """A label set, as :func:`query` keys its results."""
    return frozenset(pairs.items())


# -- the scenario --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod holding one vGPU on GPU 0, with one MPS client using ``memory_mib``."""

    name: str
    container: str
    uid: str
    container_id: str
    pid: int
    memory_mib: int


TRAINER = Pod("trainer", "main", "11111111-2222-3333-4444-555555555555", "a" * 64, 4242, 19000)
NOTEBOOK = Pod("notebook", "kernel", "66666666-7777-8888-9999-000000000000", "b" * 64, 4343, 600)


def _config_text(root: str) -> str:
    return (
        f'[agent]\nstate_dir = "{root}/state"\n'
        f'[plugin]\nplugin_dir = "{root}/dp"\n'
        '[gpus]\nbackend = "simulated"\nreplicas_per_gpu = 4\n'
        f'[mps]\npipe_root = "{root}/mps"\nlog_root = "{root}/mpslog"\n'
        "[health]\nmps_check_interval_s = 0.05\npoll_interval_s = 0.05\n"
        f'[attribution]\npod_resources_socket = "{root}/pr/kubelet.sock"\n'
        "refresh_interval_s = 0.2\n"
        '[metrics]\nenabled = true\nlisten_address = "127.0.0.1:0"\n'
        f'textfile_path = "{root}/textfile/vgpu.prom"\n'
        "[simulated]\ncount = 2\n"
    )


@pytest.fixture
def start(short_tmp_dir: str) -> Iterator[Callable[..., AgentRun]]:
    """Agents in this process (tests.harness), stopped at the end."""
    yield from agent_runs(short_tmp_dir)


@pytest.mark.slow
def test_a_real_prometheus_answers_the_docs_queries(
    promtool: str, start: Callable[..., AgentRun], short_tmp_dir: str, tmp_path: Path
) -> None:
    """promtool checks the endpoint and the textfile; each PromQL example of the docs gives
    what the docs say after its events; the XID query sees an XID at its first scrape."""
    root = short_tmp_dir
    config_path = Path(root) / "config.toml"
    config_path.write_text(_config_text(root))
    os.makedirs(f"{root}/textfile")
    proc = tmp_path / "proc"
    for pod in (TRAINER, NOTEBOOK):
        (proc / str(pod.pid)).mkdir(parents=True)
        (proc / str(pod.pid) / "cgroup").write_text(
            f"0::/kubepods.slice/kubepods-pod{pod.uid.replace('-', '_')}.slice/"
            f"cri-containerd-{pod.container_id}.scope\n"
        )
    run = start(
        load(str(config_path)),
        gather_attribution=functools.partial(
            gather, proc_root=str(proc), cgroup_root=str(tmp_path / "cgroup")
        ),
    )
    devices = run.devices(lambda devs: len(devs) == 8)
    address = run.agent.describe()["metrics_address"]
    gpu0, gpu1 = (gpu["uuid"] for gpu in run.agent.describe()["gpus"])
    node = {"instance": address}

    def cli(*arguments: str) -> None:
        done = run_cli("--config", str(config_path), *arguments)
        assert done.code == 0, done.describe()

    prometheus = Prometheus(tmp_path, address)
    pods = PodResourcesStandin(
        f"{root}/pr/kubelet.sock", checkpoint_path=f"{root}/dp/{CHECKPOINT_NAME}"
    )
    try:

        def scraped(expr: str, what: str) -> None:
            wait_until(lambda: bool(prometheus.api(expr)), WAIT_S, f"{what} in prometheus")

        def doc(expr: str, at: Optional[float] = None) -> Result:
            return query(promtool, prometheus, expr, at)

        queries = doc_queries(DOC.read_text(encoding="utf-8"))
        by_title: dict[str, list[str]] = {}
        for entry in queries:
            by_title.setdefault(entry.title, []).append(entry.expr)
        checked: set[str] = set()

        def titled(title: str) -> list[str]:
            assert title in by_title, f"docs/observability.md has no PromQL example {title!r}"
            checked.add(title)
            return by_title[title]

        # Before any event: the endpoint and the textfile pass promtool, and the event
        # counters are scraped at 0 (the preset XIDs included).
        scraped('up{job="vgpu-agent"} == 1', "a successful scrape")
        _check_metrics(promtool, address, f"{root}/textfile/vgpu.prom")
        scraped(f'vgpu_xid_events_total{{gpu_uuid="{gpu0}", xid="79"}} == 0', "XID 79 at 0")
        (unhealthy_by_reason, unhealthy_vgpus) = titled("Nodes with unhealthy vGPUs, and why")
        assert doc(unhealthy_by_reason) == {}
        assert doc(unhealthy_vgpus) == {}
        (daemons_down,) = titled("MPS daemons down")
        assert doc(daemons_down) == {}
        (xids,) = titled("Critical XIDs per node in the last hour")
        assert doc(xids) == {}

        # Allocate: a vGPU of GPU 0 to each pod; the kubelet lists them, their MPS clients
        # run (the trainer at 19000 of its 20389 MiB).
        for device in devices[:2]:
            run.standin.allocate(RESOURCE, [device.device_id])
        pods.set_pods(
            [
                StandinPod(
                    "ml",
                    pod.name,
                    pod.uid,
                    (StandinContainer(pod.container, RESOURCE, (device.device_id,)),),
                )
                for pod, device in zip((TRAINER, NOTEBOOK), devices[:2])
            ]
        )
        pods.start()
        for pod in (TRAINER, NOTEBOOK):
            cli("simulate", "mps-client", "0", str(pod.pid), str(pod.memory_mib))
        scraped('vgpu_pod_memory_used_bytes{pod="notebook"} > 0', "the notebook's memory")
        scraped('vgpu_pod_memory_used_bytes{pod="trainer"} > 0', "the trainer's memory")
        (top_pods,) = titled("The ten pods using the most GPU memory across the cluster")
        assert doc(top_pods) == {
            labels(namespace="ml", pod="trainer"): 19000 * MIB,
            labels(namespace="ml", pod="notebook"): 600 * MIB,
        }
        (near_limit,) = titled("Containers above 90% of their memory limit")
        trainer = labels(**node, namespace="ml", pod="trainer", container="main", gpu_uuid=gpu0)
        assert doc(near_limit) == {trainer: pytest.approx(19000 / VGPU_MEMORY_MIB)}
        (fullness,) = titled("How full each GPU is: allocated vGPUs against healthy ones")
        assert doc(fullness) == {
            labels(**node, gpu_uuid=gpu0): 0.5,
            labels(**node, gpu_uuid=gpu1): 0.0,
        }
        (latency,) = titled("Allocate latency, p99 over 5 minutes")
        scraped("vgpu_allocate_duration_seconds_count >= 2", "the two Allocate calls")
        p99 = doc(latency)
        assert list(p99) == [labels()], p99
        assert 0 < p99[labels()] <= 5.0  # within the histogram's buckets

        # An XID on GPU 0 (79: one of the XIDs exported at 0 in advance).
        cli("simulate", "xid", "0", "79")
        scraped('vgpu_gpu_unhealthy{reason="xid"}', "the XID's unhealthy GPU")
        assert doc(unhealthy_by_reason) == {labels(**node, reason="xid"): 1}
        assert doc(unhealthy_vgpus) == {labels(**node): 4}
        first = _first_scrape(prometheus, 'vgpu_xid_events_total{xid="79"}')
        assert _values(doc(xids, at=first)) == {labels(**node, xid="79"): 1}
        # Its series was at 0 before, so a plain increase() counts it too.
        rise = doc('increase(vgpu_xid_events_total{xid="79"}[1h]) > 0', at=first)
        assert list(rise) == [labels(**node, gpu_uuid=gpu0, xid="79")]

        # GPU 1's MPS daemon goes down.
        cli("simulate", "mps-down", "1")
        scraped("vgpu_mps_daemon_up == 0", "the daemon down")
        assert doc(daemons_down) == {labels(**node, gpu_uuid=gpu1): 0}
        assert doc(unhealthy_by_reason) == {
            labels(**node, reason="xid"): 1,
            labels(**node, reason="mps_daemon"): 1,
        }
        assert doc(unhealthy_vgpus) == {labels(**node): 8}

        # An XID whose series is new (62 is not exported in advance): increase() alone
        # misses it, the docs' query counts it at its first scrape.
        cli("simulate", "xid", "1", "62")
        first = _first_scrape(prometheus, 'vgpu_xid_events_total{xid="62"}')
        assert _values(doc(xids, at=first)) == {
            labels(**node, xid="79"): 1,
            labels(**node, xid="62"): 1,
        }
        assert doc('increase(vgpu_xid_events_total{xid="62"}[1h]) > 0', at=first) == {}

        # Every metric family has samples now: promtool checks them again.
        _check_metrics(promtool, address, f"{root}/textfile/vgpu.prom")
        assert checked == set(by_title), f"docs examples no test checks: {set(by_title) - checked}"
    finally:
        prometheus.stop()
        pods.stop()


def _first_scrape(prometheus: Prometheus, selector: str) -> float:
    found: list[float] = []

    def seen() -> bool:
        at = prometheus.first_sample_time(selector, 1)
        if at is not None:
            found.append(at)
        return bool(found)

    wait_until(seen, WAIT_S, f"a scrape with {selector} at 1")
    return found[0]


def _values(result: Result) -> dict[Labels, int]:
    """The counts of a result from increase(), which extrapolates: 1 event can read 1.02."""
    rounded = {key: round(value) for key, value in result.items()}
    assert all(math.isclose(value, rounded[key], abs_tol=0.5) for key, value in result.items())
    return rounded


def _check_metrics(promtool: str, address: str, textfile: str) -> None:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        scraped = response.read().decode()
    _promtool(promtool, "check", "metrics", stdin=scraped)
    wait_until(lambda: os.path.exists(textfile), WAIT_S, "the textfile")
    _promtool(promtool, "check", "metrics", stdin=Path(textfile).read_text(encoding="utf-8"))


# -- the alert rules -----------------------------------------------------------------------


def test_promtool_accepts_the_packaged_rules(promtool: str) -> None:
    """``promtool check rules`` accepts packaging/prometheus/vgpu-agent-rules.yml."""
    output = _promtool(promtool, "check", "rules", str(RULES))
    assert "SUCCESS: 6 rules found" in output


def test_promtool_unit_tests_pass_for_every_alert(promtool: str) -> None:
    """``promtool test rules`` passes, with a test for each alert of the rules file."""
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), flags=re.MULTILINE))
    tested = set(re.findall(r"alertname: (\w+)$", RULES_TEST.read_text(), flags=re.MULTILINE))
    assert alerts == tested
    output = _promtool(promtool, "test", "rules", str(RULES_TEST))
    assert "SUCCESS" in output
