"""The container runtime check: whether containerd, with the files it imports merged as it
merges them, runs NVIDIA's runtime by default; and whether it resolves CDI devices (for the
device list check).
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from vgpu_agent.model.errors import VgpuError
from vgpu_agent.mps import confinement
from vgpu_agent.ops.doctor.probes import DoctorProbes
from vgpu_agent.ops.doctor.report import Report

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

_CONFIGURE_NVIDIA_RUNTIME = (
    "nvidia-ctk runtime configure --runtime=containerd --set-as-default, then "
    "systemctl restart containerd"
)


@dataclass
class _RuntimeFindings:
    """What containerd's merged config says about runtimes."""

    #: The files read, in containerd's order.
    files: list[str] = field(default_factory=list)
    #: nvidia runtime name -> the file that defines it
    nvidia_runtimes: dict[str, str] = field(default_factory=dict)
    default_runtime: Optional[str] = None
    nvidia_default_runtime: bool = False


def _binary_name(spec: object) -> str:
    if not isinstance(spec, dict):
        return ""
    options = spec.get("options")
    if isinstance(options, dict):
        name = options.get("BinaryName")
        if isinstance(name, str):
            return name
    return ""


def _is_nvidia_runtime(name: str, spec: object) -> bool:
    return "nvidia" in name.lower() or "nvidia-container-runtime" in _binary_name(spec)


def _scan_runtimes(tree: Mapping[str, Any], path: str, findings: _RuntimeFindings) -> None:
    """Collect runtime tables wherever they sit: config versions 1 to 3 nest them differently."""
    for key, value in tree.items():
        if key == "default_runtime_name" and isinstance(value, str):
            findings.default_runtime = value
        elif key == "runtimes" and isinstance(value, dict):
            for name, spec in value.items():
                if _is_nvidia_runtime(name, spec):
                    findings.nvidia_runtimes[name] = path
        elif key == "default_runtime" and isinstance(value, dict):
            # Version 1 configs name the default runtime's binary directly.
            findings.nvidia_default_runtime = "nvidia-container-runtime" in _binary_name(value)
        if isinstance(value, dict):
            _scan_runtimes(value, path, findings)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise VgpuError(f"{path} is not valid TOML ({exc}); containerd cannot read it") from exc
    except OSError as exc:
        raise VgpuError(f"reading {path}: {exc.strerror or exc}") from exc


def _containerd_files(config_path: str) -> list[tuple[str, dict[str, Any]]]:
    """The config file and what it imports, parsed, in the order containerd merges them:
    breadth first, relative imports against the importing file's directory, globs sorted."""
    loaded: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    pending = [config_path]
    while pending:
        path, pending = pending[0], pending[1:]
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        tree = _read_toml(path)
        loaded.append((path, tree))
        imports = tree.get("imports", [])
        for pattern in imports if isinstance(imports, list) else []:
            if not isinstance(pattern, str):
                continue
            absolute = (
                pattern if os.path.isabs(pattern) else os.path.join(os.path.dirname(path), pattern)
            )
            pending.extend(sorted(glob.glob(absolute)))
    return loaded


def inspect_containerd(config_path: str) -> _RuntimeFindings:
    """What runtimes containerd would have after reading ``config_path`` and its imports.

    containerd replaces a plugin's whole section with the last file's, rather than merging
    keys, so a drop-in that redefines the CRI plugin without the nvidia runtime drops it.
    """
    findings = _RuntimeFindings()
    sections: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for path, tree in _containerd_files(config_path):
        findings.files.append(path)
        plugins = tree.get("plugins", {})
        if isinstance(plugins, dict):
            for name, section in plugins.items():
                if isinstance(section, dict):
                    sections[name] = (path, section)
    for path, section in sections.values():
        _scan_runtimes(section, path, findings)
    return findings


def containerd_cdi(config_path: str) -> Optional[tuple[bool, str]]:
    """Whether containerd resolves CDI devices, from its config and imports (None: no
    config to tell from, or one that cannot be read)."""
    if not os.path.exists(config_path):
        return None
    try:
        files = _containerd_files(config_path)
    except VgpuError:
        return None
    sections: dict[str, dict[str, object]] = {}
    for _, tree in files:
        plugins = tree.get("plugins", {})
        if isinstance(plugins, dict):
            for name, section in plugins.items():
                if isinstance(section, dict):
                    sections[name] = section
    return confinement.containerd_resolves_cdi(files[0][1].get("version", 2), sections)


def _unimported_dropins(probes: DoctorProbes, loaded: list[str]) -> list[str]:
    """Drop-ins in the usual directories that name an nvidia runtime but are not imported."""
    loaded_real = {os.path.realpath(path) for path in loaded}
    found: list[str] = []
    for directory in probes.containerd_dropin_dirs:
        for path in sorted(glob.glob(os.path.join(directory, "*.toml"))):
            if os.path.realpath(path) in loaded_real:
                continue
            findings = _RuntimeFindings()
            try:
                _scan_runtimes(_read_toml(path), path, findings)
            except VgpuError:
                continue  # containerd does not read it either
            if findings.nvidia_runtimes:
                found.append(path)
    return found


def check_container_runtime(report: Report, probes: DoctorProbes) -> None:
    """Whether containerd's default runtime is NVIDIA's."""
    check = "container runtime"
    config_path = probes.containerd_config
    if not os.path.exists(config_path):
        report.warn(
            check,
            f"no containerd config at {config_path}: not a containerd node, or containerd "
            "runs on its built-in defaults, which have no nvidia runtime; on a containerd "
            f"node run {_CONFIGURE_NVIDIA_RUNTIME}",
        )
        return
    findings = inspect_containerd(config_path)
    if not findings.nvidia_runtimes and not findings.nvidia_default_runtime:
        unimported = _unimported_dropins(probes, findings.files)
        if unimported:
            report.fail(
                check,
                f"{', '.join(unimported)} names the nvidia runtime, but {config_path} does "
                "not import it, so containerd never reads it; add its directory to "
                f'`imports` in {config_path} (e.g. imports = ["/etc/containerd/conf.d/*.toml"]) '
                "and restart containerd",
            )
            return
        report.fail(
            check,
            f"containerd's config ({', '.join(findings.files)}) names no nvidia runtime, so "
            "containers cannot see the GPUs; install nvidia-container-toolkit and run "
            f"{_CONFIGURE_NVIDIA_RUNTIME}",
        )
        return
    if findings.nvidia_default_runtime or findings.default_runtime in findings.nvidia_runtimes:
        name = findings.default_runtime if not findings.nvidia_default_runtime else "nvidia"
        report.ok(check, f"containerd's default runtime is {name!r} (NVIDIA's)")
        return
    names = ", ".join(
        f"{name!r} ({where})" for name, where in sorted(findings.nvidia_runtimes.items())
    )
    default = findings.default_runtime or "runc"
    report.warn(
        check,
        f"containerd has the runtime {names}, but its default runtime is {default!r}: GPU "
        "pods need runtimeClassName set to it, or make it the default with "
        f"{_CONFIGURE_NVIDIA_RUNTIME}",
    )
