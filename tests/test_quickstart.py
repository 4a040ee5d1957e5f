"""docs/quickstart.md says what each step prints; what can run without a node runs here,
as a real process or through the same code (the blocks marked "checked" also run as
written, as root, in tests/system/test_install.sh's container)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.builders import make_served
from tests.ops.test_cli_errors import vgpu_agent
from tests.system.doc_blocks import checked_blocks, shows
from vgpu_agent.config.parse import parse
from vgpu_agent.config.plan import grant_policy
from vgpu_agent.model.devices import grant

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "docs" / "quickstart.md"

#: The A10G of the quickstart's g5.xlarge: its memory as NVML reports it.
A10G_MEMORY_MIB = 23028


def _text() -> str:
    return QUICKSTART.read_text(encoding="utf-8")


def _config_block() -> tuple[str, str, str]:
    """The config the quickstart writes, the command that checks it, its expected output."""
    for commands, expected in checked_blocks(_text()):
        heredoc = re.search(r"cat > (\S+) <<'EOF'\n(.*?)^EOF\n(.*)", commands, re.S | re.M)
        if heredoc:
            return heredoc.group(2), heredoc.group(3).strip(), expected
    raise AssertionError("docs/quickstart.md writes no config in a checked block")


def test_the_quickstart_checks_install_config_and_reload() -> None:
    """The checked blocks install the package, check the config and reload the agent."""
    commands = "\n".join(block for block, _ in checked_blocks(_text()))
    for step in (
        "apt-get install -y ./vgpu-agent_",
        "systemctl is-active vgpu-agent.service",
        "vgpu-agent config check /etc/vgpu/config.toml",
        "systemctl reload vgpu-agent.service",
    ):
        assert step in commands, step


def test_the_quickstart_config_checks_as_shown(tmp_path: Path) -> None:
    """`vgpu-agent config check` on the quickstart's config prints the documented line."""
    config_text, command, expected = _config_block()
    assert command == "vgpu-agent config check /etc/vgpu/config.toml"
    path = tmp_path / "config.toml"
    path.write_text(config_text)
    result = vgpu_agent("config", "check", str(path))
    assert result.code == 0, result.describe()
    assert shows(expected.replace("/etc/vgpu/config.toml", str(path)), result.stdout)


def test_the_smoke_pods_limits_are_what_allocate_grants() -> None:
    """The CUDA_MPS_* lines the smoke pod prints are what Allocate gives one vGPU of an
    A10G with the quickstart's config."""
    config = parse(_config_block()[0])
    served = make_served(0, config.gpus.replicas_per_gpu, memory_mib=A10G_MEMORY_MIB)
    envs = grant(served, 1, grant_policy(config), config.plugin.device_list_strategy).envs
    printed = sorted(f"{key}={value}" for key, value in envs.items() if key.startswith("CUDA_MPS"))
    printed = [line.replace(served.pipe_dir or "", "/run/nvidia-mps") for line in printed]
    assert shows("\n".join(printed), _text()), printed
