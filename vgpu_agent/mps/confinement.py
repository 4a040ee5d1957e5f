"""Whether a pod can forge its device list on this node, for `vgpu-agent doctor`.

``plugin.device_list_strategy`` is only as safe as the NVIDIA container toolkit's config
and the CDI specs on the node make it: this module reads both and judges the strategy
(:func:`judge_device_list`, pure, so it is tested with plain values). The confinement
mode and each GPU's ceiling are decided in :mod:`vgpu_agent.config.plan`. docs/security.md
explains the threat model.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from vgpu_agent.model.devices import CDI_GPU_KIND
from vgpu_agent.model.errors import VgpuError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

#: The NVIDIA container toolkit's config (nvidia-container-runtime and its hook read it).
TOOLKIT_CONFIG = "/etc/nvidia-container-runtime/config.toml"
#: Where CDI specs live; container runtimes read both.
CDI_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
ENVVAR_UNPRIVILEGED_KEY = "accept-nvidia-visible-devices-envvar-when-unprivileged"
VOLUME_MOUNTS_KEY = "accept-nvidia-visible-devices-as-volume-mounts"

Verdict = Literal["ok", "warn", "fail"]


# -- the device list ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolkitSettings:
    """The container toolkit settings that decide whether a pod can pick its own GPUs."""

    #: NVIDIA_VISIBLE_DEVICES honoured from unprivileged containers (the toolkit's default).
    envvar_when_unprivileged: bool = True
    #: Device lists read from mounts under /var/run/nvidia-container-devices.
    as_volume_mounts: bool = False
    #: Where they came from, for messages.
    source: str = TOOLKIT_CONFIG


def read_toolkit_config(path: str = TOOLKIT_CONFIG) -> ToolkitSettings:
    """The toolkit settings in ``path`` (the toolkit's defaults when it is missing).

    Raises VgpuError naming the file when it cannot be read or is not TOML."""
    try:
        with open(path, "rb") as config_file:
            document = tomllib.load(config_file)
    except FileNotFoundError:
        return ToolkitSettings(source=f"{path} (missing: the toolkit's defaults)")
    except OSError as exc:
        raise VgpuError(f"reading {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise VgpuError(f"{path} is not valid TOML: {exc}") from exc
    envvar = document.get(ENVVAR_UNPRIVILEGED_KEY, True)
    mounts = document.get(VOLUME_MOUNTS_KEY, False)
    return ToolkitSettings(
        envvar_when_unprivileged=envvar is not False,
        as_volume_mounts=mounts is True,
        source=path,
    )


_CDI_KIND = re.compile(r"""["']?\bkind["']?\s*:\s*["']?([^"'\s,}]+)""")
_CDI_NAME = re.compile(r"""["']?name["']?\s*:\s*["']?([^"'\s,}]+)""")


def cdi_gpu_names(spec_dirs: tuple[str, ...] = CDI_SPEC_DIRS) -> tuple[set[str], list[str]]:
    """The device names of kind nvidia.com/gpu in the CDI specs of ``spec_dirs`` (YAML or
    JSON, as `nvidia-ctk cdi generate` writes them), and the files that had them."""
    names: set[str] = set()
    files: list[str] = []
    for directory in spec_dirs:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith((".yaml", ".yml", ".json")):
                continue
            path = os.path.join(directory, entry)
            try:
                with open(path, encoding="utf-8", errors="replace") as spec:
                    text = spec.read(4 * 1024 * 1024)
            except OSError:
                continue
            kinds = _CDI_KIND.findall(text)
            if CDI_GPU_KIND not in kinds:
                continue
            files.append(path)
            names.update(_CDI_NAME.findall(text))
    return names, files


#: containerd's CRI plugin section by config version, and whether it resolves CDI devices
#: when ``enable_cdi`` is not set: containerd 1.7 (version 2) no, 2.x (version 3) yes.
_CONTAINERD_CDI = {
    2: ("io.containerd.grpc.v1.cri", False),
    3: ("io.containerd.cri.v1.runtime", True),
}


def containerd_resolves_cdi(
    version: object, sections: dict[str, dict[str, object]]
) -> tuple[bool, str]:
    """Whether containerd resolves CDI devices, from its config's ``version`` and its
    plugin sections (as merged); and the setting that says so, for messages."""
    plugin, default = _CONTAINERD_CDI.get(version if isinstance(version, int) else 2, (None, False))
    if plugin is None:
        plugin, default = _CONTAINERD_CDI[2]
    section = sections.get(plugin, {})
    value = section.get("enable_cdi", default)
    source = "set" if "enable_cdi" in section else "default"
    setting = f'enable_cdi in [plugins."{plugin}"] ({source}: {str(value).lower()})'
    return value is True, setting


def judge_device_list(
    strategy: str,
    toolkit: ToolkitSettings,
    cdi_names: set[str],
    gpu_uuids: list[str],
    runtime_cdi: Optional[tuple[bool, str]] = None,
) -> list[tuple[Verdict, str]]:
    """Whether ``strategy`` works on this node and whether a pod can forge its device list.
    ``runtime_cdi`` says whether containerd resolves CDI devices (None: unknown)."""
    forgeable = (
        f"any pod can set NVIDIA_VISIBLE_DEVICES=all itself and use every GPU outside MPS "
        f"where the NVIDIA runtime is the default ({toolkit.source} has "
        f"{ENVVAR_UNPRIVILEGED_KEY} = true)"
    )
    close_envvar = f"set {ENVVAR_UNPRIVILEGED_KEY} = false in {TOOLKIT_CONFIG}"
    if strategy == "envvar":
        if not toolkit.envvar_when_unprivileged:
            return [
                (
                    "fail",
                    f"plugin.device_list_strategy = envvar, but the toolkit ignores "
                    f"NVIDIA_VISIBLE_DEVICES from unprivileged containers ({toolkit.source}), "
                    'so pods get no GPU; set plugin.device_list_strategy = "volume-mounts" '
                    f'with {VOLUME_MOUNTS_KEY} = true, or "cdi"',
                )
            ]
        return [
            (
                "warn",
                f"plugin.device_list_strategy = envvar is forgeable: {forgeable}; set "
                f'plugin.device_list_strategy = "volume-mounts" with {VOLUME_MOUNTS_KEY} = '
                f'true and {close_envvar} (or "cdi"), see /usr/share/doc/vgpu-agent/security.md',
            )
        ]
    verdicts: list[tuple[Verdict, str]] = []
    if strategy == "volume-mounts":
        if not toolkit.as_volume_mounts:
            return [
                (
                    "fail",
                    f"plugin.device_list_strategy = volume-mounts, but the toolkit does not "
                    f"read device mounts ({toolkit.source} lacks {VOLUME_MOUNTS_KEY} = true), "
                    f"so pods get no GPU; set {VOLUME_MOUNTS_KEY} = true in {TOOLKIT_CONFIG}",
                )
            ]
        verdicts.append(
            ("ok", f"volume-mounts: the toolkit reads device mounts ({toolkit.source})")
        )
    elif strategy == "cdi":
        missing = [uuid for uuid in gpu_uuids if uuid not in cdi_names]
        if missing:
            return [
                (
                    "fail",
                    f"plugin.device_list_strategy = cdi, but no CDI spec in "
                    f"{' or '.join(CDI_SPEC_DIRS)} names {CDI_GPU_KIND}={missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + "; run `nvidia-ctk cdi generate --output=/var/run/cdi/nvidia.yaml` and "
                    "enable CDI in containerd (enable_cdi = true on 1.7; on by default in 2.x)",
                )
            ]
        if runtime_cdi is not None and not runtime_cdi[0]:
            return [
                (
                    "fail",
                    "plugin.device_list_strategy = cdi, but containerd does not resolve CDI "
                    f"devices ({runtime_cdi[1]}), so pods get no GPU; run `nvidia-ctk runtime "
                    "configure --runtime=containerd --cdi.enabled` and restart containerd",
                )
            ]
        verdicts.append(("ok", f"cdi: a CDI spec names every served GPU as {CDI_GPU_KIND}=<UUID>"))
    else:
        return [("fail", f"unknown plugin.device_list_strategy {strategy!r}")]
    if toolkit.envvar_when_unprivileged:
        verdicts.append(
            (
                "warn",
                f"{strategy} names the GPU where a pod cannot, but the variable is still "
                f"honoured: {forgeable}; {close_envvar}",
            )
        )
    else:
        verdicts.append(
            ("ok", "pods cannot pick GPUs themselves: the toolkit ignores their variable")
        )
    return verdicts
