"""Reloading the config: deciding whether the new one can run, then changing the node to it.

:func:`plan_reload_from` reads the new config and asks :func:`vgpu_agent.config.plan.plan_reload`
what changes; :func:`execute_reload` carries the actions out in their order: GPUs added
(brought up), resized or withdrawn, the plugin registered again, the health checks
restarted, the ceilings set again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional

from vgpu_agent.agent.bringup import GpuBringUp
from vgpu_agent.agent.parts import Observer
from vgpu_agent.config.reload import (
    ApplyCeiling,
    KeepRunningConfig,
    ReloadAction,
    Reregister,
    ResizeGpu,
    RestartHealthChecks,
    ServeGpu,
    UseDeviceListStrategy,
    UseFaultsConfig,
    UseGrantPolicy,
    UseLogLevel,
    WarnNotServed,
    WithdrawGpu,
    plan_reload,
)
from vgpu_agent.config.schema import Config, FaultsConfig, PluginConfig
from vgpu_agent.host.log import log_event, set_level
from vgpu_agent.model.devices import Inventory, ServedGpu
from vgpu_agent.model.errors import ConfigError, GpuError
from vgpu_agent.model.gpu import GpuBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadPlan:
    """A new config the agent can switch to, and what changes to get there."""

    config: Config
    actions: list[ReloadAction]
    #: The GPUs served before the reload: GPU UUID -> vGPUs.
    served_now: dict[str, int]


def plan_reload_from(
    running: Config, load: Callable[[], Config], backend: GpuBackend, inventory: Inventory
) -> Optional[ReloadPlan]:
    """Read the new config with ``load`` and plan the switch to it from ``running`` (the
    node serving ``inventory``); None, with the reason logged, when the running config
    stays."""
    try:
        new = load()
    except ConfigError as exc:
        log.error("reload: keeping the running config, the new one is invalid: %s", exc)
        return None
    try:
        node_gpus = backend.list_gpus()
    except GpuError as exc:
        log.warning("reload: listing the GPUs failed (%s); considering those served now", exc)
        node_gpus = [served.gpu for served in inventory.gpus]
    served_now = {served.gpu.uuid: served.replicas for served in inventory.gpus}
    actions = plan_reload(running, new, node_gpus, served_now)
    if actions and isinstance(actions[0], KeepRunningConfig):
        log.error("reload: keeping the running config, %s", actions[0].why)
        return None
    return ReloadPlan(new, actions, served_now)


def execute_reload(
    plan: ReloadPlan,
    gpus: GpuBringUp,
    *,
    reregister: Callable[[PluginConfig], None],
    observer: Optional[Observer],
    faults: Optional[Callable[[FaultsConfig], None]] = None,
) -> Inventory:
    """Carry out ``plan`` on the node ``gpus`` brings up; ``reregister`` replaces the
    registrar with one for the new plugin settings, ``faults`` takes new ``[faults]``
    settings. Returns what the node serves after."""
    new = plan.config
    node = gpus.node
    added: list[ServedGpu] = []
    replicas = dict(plan.served_now)
    restart_health = False
    for action in plan.actions:
        if isinstance(action, UseLogLevel):
            set_level(action.level)
        elif isinstance(action, UseGrantPolicy):
            node.set_grant_policy(action.policy)
        elif isinstance(action, WarnNotServed):
            log.warning("reload: %s", action.problem)
        elif isinstance(action, ServeGpu):
            entry = gpus.serve_added(new, action.gpu, action.replicas)
            if entry is not None:
                added.append(entry)
        elif isinstance(action, ResizeGpu):
            replicas[action.gpu_uuid] = action.replicas
        elif isinstance(action, WithdrawGpu):
            del replicas[action.gpu_uuid]
        elif isinstance(action, Reregister):
            log.info("reload: plugin settings changed; registering again")
            reregister(new.plugin)
        elif isinstance(action, RestartHealthChecks):
            restart_health = True
        elif isinstance(action, UseDeviceListStrategy):
            node.set_device_list_strategy(action.strategy)
        elif isinstance(action, UseFaultsConfig) and faults is not None:
            faults(action.faults)
        elif isinstance(action, ApplyCeiling) and gpus.mps is not None:
            # A daemon that does not answer gets it from the probe once it does.
            gpus.apply_ceiling(new, action.gpu, action.replicas)

    def resize(current: Inventory) -> Inventory:
        kept = [
            dataclasses.replace(served, replicas=replicas[served.gpu.uuid])
            for served in current.gpus
            if served.gpu.uuid in replicas
        ]
        return Inventory(tuple(sorted(kept + added, key=lambda served: served.gpu.index)))

    after = node.update(resize)
    gpus_changed = {served.gpu.uuid for served in after.gpus} != set(plan.served_now)
    if restart_health or gpus_changed:
        gpus.restart_health_checks(new)
    if observer is not None:
        observer.reconfigure(new)
    log_event(
        log,
        logging.INFO,
        f"reloaded {new.source}: {after.vgpu_count} vGPUs",
        VGPU_EVENT="reloaded",
    )
    return after
