"""`vgpu-agent doctor`: checks a node the way an operator would before trusting it.

Each check prints lines ``[ ok ] ...``, ``[warn] ...`` or ``[FAIL] ...``; a line that is not
ok says what to do. :func:`run_doctor` runs the checks in order and returns 1 when any line
failed, else 0 (warnings do not fail). Everything the checks read from the node goes through
:class:`~vgpu_agent.ops.doctor.probes.DoctorProbes`. An unexpected exception inside a check
becomes a FAIL line for that check, never a traceback.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from vgpu_agent.config.schema import Config
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.ops.doctor.agent import check_agent
from vgpu_agent.ops.doctor.config import check_config
from vgpu_agent.ops.doctor.confinement import check_confinement, check_device_list
from vgpu_agent.ops.doctor.containerd import check_container_runtime
from vgpu_agent.ops.doctor.dra import check_dra
from vgpu_agent.ops.doctor.gpus import GpuFindings, check_compute_modes, check_gpus
from vgpu_agent.ops.doctor.kubelet import check_other_plugins, check_sockets
from vgpu_agent.ops.doctor.mps import check_mps_binaries, check_mps_daemons, check_multi_user
from vgpu_agent.ops.doctor.probes import DoctorProbes, system_probes
from vgpu_agent.ops.doctor.report import Report, Status

EXIT_OK = 0
EXIT_FAILED = 1


def _guarded(report: Report, check: str, run: Callable[[], None]) -> None:
    """Run one check; whatever it raises becomes a FAIL line for that check."""
    try:
        run()
    except VgpuError as exc:
        report.fail(check, str(exc))
    except Exception as exc:  # doctor must report every check, whatever one of them hits
        report.fail(
            check,
            f"the check itself failed ({type(exc).__name__}: {exc}); please report this "
            "as a vgpu-agent bug",
        )


def run_doctor(
    config_path_option: Optional[str],
    environ: Mapping[str, str],
    echo: Callable[[str], None],
    *,
    probes: Optional[DoctorProbes] = None,
) -> int:
    """Check the node, print one line per finding through ``echo``; 1 if any failed, else 0."""
    report = Report(echo)
    config = Config()

    def load_config() -> None:
        nonlocal config
        config = check_config(report, config_path_option, environ)

    _guarded(report, "config", load_config)
    node_probes = probes if probes is not None else system_probes()
    node = GpuFindings()
    try:
        _guarded(report, "driver", lambda: check_gpus(report, config, node_probes, node))
        _guarded(report, "mps binaries", lambda: check_mps_binaries(report, config, node_probes))
        _guarded(report, "compute mode", lambda: check_compute_modes(report, config, node))
        _guarded(report, "mps daemon", lambda: check_mps_daemons(report, config, node_probes, node))
        _guarded(report, "mps multi-user", lambda: check_multi_user(report, config, node_probes))
        _guarded(
            report, "confinement", lambda: check_confinement(report, config, node_probes, node)
        )
        _guarded(
            report, "device list", lambda: check_device_list(report, config, node_probes, node)
        )
    finally:
        if node.backend is not None:
            backend = node.backend
            _guarded(report, "driver", backend.close)
    if config.dra.enabled:
        _guarded(report, "dra", lambda: check_dra(report, config, node_probes))
    else:
        _guarded(report, "kubelet", lambda: check_sockets(report, config, node_probes))
    _guarded(report, "other plugins", lambda: check_other_plugins(report, config, node_probes))
    _guarded(report, "container runtime", lambda: check_container_runtime(report, node_probes))
    _guarded(report, "agent", lambda: check_agent(report, config, node_probes))
    failed, warned = report.count(Status.FAIL), report.count(Status.WARN)
    if failed:
        echo(f"doctor: {failed} failed, {warned} warnings: this node is not ready for vGPU pods")
        return EXIT_FAILED
    if warned:
        echo(f"doctor: no failures, {warned} warnings")
    else:
        echo("doctor: every check passed")
    return EXIT_OK
