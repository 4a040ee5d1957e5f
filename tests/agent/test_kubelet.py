"""The link to the kubelet across reloads: counts kept over replaced registrars, the watch."""

from __future__ import annotations

from typing import Callable, Optional

from tests.agent.test_registration import FakeKubelet
from vgpu_agent.agent.kubelet import KubeletLink
from vgpu_agent.agent.parts import Watch
from vgpu_agent.agent.registration import Registrar
from vgpu_agent.config.schema import PluginConfig


class FakeWatch:
    """A directory watch the test can end."""

    def __init__(self) -> None:
        self.active = True
        self.stopped = False

    def stop(self) -> None:
        """Stop watching."""
        self.active = False
        self.stopped = True


class Watches:
    """Hands out fake watches, recording which directory each watches."""

    def __init__(self) -> None:
        self.made: list[tuple[str, FakeWatch]] = []

    def __call__(self, path: str, _wake: Callable[[], None]) -> Optional[Watch]:
        watch = FakeWatch()
        self.made.append((path, watch))
        return watch


def link(kubelet: FakeKubelet, watches: Watches) -> tuple[KubeletLink, list[PluginConfig]]:
    """A link whose registrars register with ``kubelet``; the plugin settings each was made for."""
    made_for: list[PluginConfig] = []

    def make_registrar(plugin: PluginConfig) -> Registrar:
        made_for.append(plugin)
        return kubelet.registrar()

    kubelet_link = KubeletLink(
        make_registrar, PluginConfig(), watch_directory=watches, wake=lambda: None
    )
    return kubelet_link, made_for


def test_reregister_keeps_the_counts_of_the_replaced_registrar() -> None:
    """A reload's new registrar adds to the counts; the old endpoint stops serving."""
    kubelet, watches = FakeKubelet(), Watches()
    kubelet_link, made_for = link(kubelet, watches)
    assert kubelet_link.check("/plugins")
    assert (kubelet_link.registered, kubelet_link.registrations) == (True, 1)
    renamed = PluginConfig(resource_name="example.com/vgpu")
    kubelet_link.reregister(renamed)
    assert made_for[-1] is renamed
    assert kubelet.endpoints[0].stopped
    assert (kubelet_link.registered, kubelet_link.registrations) == (False, 1)
    assert kubelet_link.check("/plugins")
    assert (kubelet_link.registrations, kubelet_link.kubelet_restarts) == (2, 0)


def test_watches_the_plugin_directory_again_once_the_watch_ends() -> None:
    """A check watches the directory; an ended watch is replaced, a reregister restarts it."""
    kubelet, watches = FakeKubelet(), Watches()
    kubelet_link, _ = link(kubelet, watches)
    watching = [kubelet_link.watching]
    kubelet_link.check("/plugins")
    kubelet_link.check("/plugins")
    assert [path for path, _ in watches.made] == ["/plugins"]
    watching.append(kubelet_link.watching)
    watches.made[0][1].active = False  # the directory was deleted
    watching.append(kubelet_link.watching)
    kubelet_link.check("/plugins")
    assert len(watches.made) == 2
    assert watches.made[0][1].stopped
    watching.append(kubelet_link.watching)
    kubelet_link.reregister(PluginConfig())
    assert watches.made[1][1].stopped
    watching.append(kubelet_link.watching)
    assert watching == [False, True, False, True, False]
