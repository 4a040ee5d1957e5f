"""What the packages promise, read from their sources: every document a message, the
config, a unit or a package description names is shipped by both packages, and the
tmpfiles entry never changes a directory that exists. tests/system/test_install.sh checks
the same on the installed packages under a real systemd."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_DIR = "/usr/share/doc/vgpu-agent/"
#: Where the installed path of a document can appear: what runs or ships on a node.
SHIPPED_TEXT = [
    *sorted((REPO / "vgpu_agent").rglob("*.py")),
    *sorted(path for path in (REPO / "systemd").rglob("*") if path.is_file()),
    REPO / "packaging" / "config.toml",
    REPO / "packaging" / "deb" / "debian" / "control",
    REPO / "packaging" / "rpm" / "vgpu-agent.spec",
]
_DOC_REFERENCE = re.compile(re.escape(DOC_DIR) + r"([A-Za-z0-9_.-]+\.md)")


def _referenced_documents() -> dict[str, list[str]]:
    """Document file name -> the files that name it by its installed path."""
    named: dict[str, list[str]] = {}
    for path in SHIPPED_TEXT:
        for name in _DOC_REFERENCE.findall(path.read_text(encoding="utf-8")):
            named.setdefault(name, []).append(str(path.relative_to(REPO)))
    return named


def _deb_documents() -> set[str]:
    listed = (REPO / "packaging/deb/debian/vgpu-agent.docs").read_text(encoding="utf-8").split()
    # scripts/build-deb appends the README to the list it stages.
    return {Path(entry).name for entry in listed} | {"README.md"}


def _rpm_documents() -> set[str]:
    spec = (REPO / "packaging/rpm/vgpu-agent.spec").read_text(encoding="utf-8")
    return {
        Path(entry).name
        for line in spec.splitlines()
        if line.startswith("%doc ")
        for entry in line.split()[1:]
    }


def _staged_documents(script: str) -> set[str]:
    """The docs/*.md (and README.md) a build script copies into its staging tree."""
    text = (REPO / "scripts" / script).read_text(encoding="utf-8")
    staged = set(re.findall(r"docs/([a-z]+\.md)", text))
    if re.search(r"cp README\.md", text):
        staged.add("README.md")
    return staged


def test_messages_name_documents_that_exist() -> None:
    """Each document named by its installed path is a file of the source tree."""
    named = _referenced_documents()
    assert {"security.md", "systemd.md", "observability.md"} <= set(named)
    for name, where in named.items():
        source = REPO / ("README.md" if name == "README.md" else f"docs/{name}")
        assert source.is_file(), f"{', '.join(where)} name {DOC_DIR}{name}, which does not exist"


@pytest.mark.parametrize(
    ("package", "shipped", "staged"),
    [
        ("deb", _deb_documents, "build-deb"),
        ("rpm", _rpm_documents, "build-rpm"),
    ],
    ids=["deb", "rpm"],
)
def test_both_packages_ship_every_named_document(
    package: str, shipped: object, staged: str
) -> None:
    """The deb and the rpm list every document messages name, the quickstart and the
    README, and their build scripts stage each of them."""
    assert callable(shipped)
    listed: set[str] = shipped()
    wanted = set(_referenced_documents()) | {"quickstart.md", "README.md", "mps.md"}
    assert wanted <= listed, f"the {package} does not ship {sorted(wanted - listed)}"
    documents = {name for name in listed if name.endswith(".md") and name != "README.md"}
    missing = documents - _staged_documents(staged)
    assert not missing, f"scripts/{staged} does not stage {sorted(missing)}"


def test_deb_keeps_documents_uncompressed() -> None:
    """dh_compress leaves *.md alone, so the installed paths are the rpm's too."""
    rules = (REPO / "packaging/deb/debian/rules").read_text(encoding="utf-8")
    assert re.search(r"^\tdh_compress -X\.md$", rules, re.MULTILINE)


def test_tmpfiles_never_change_an_existing_directory() -> None:
    """Every directory line sets its mode, user and group only on a directory it makes
    (the ':' prefix), so the kubelet's plugin directory keeps the kubelet's mode."""
    lines = [
        line.split()
        for line in (REPO / "systemd/vgpu-agent.tmpfiles").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert any(fields[1] == "/var/lib/kubelet/device-plugins" for fields in lines)
    for fields in lines:
        kind, path, mode, user, group = fields[:5]
        assert kind == "d", fields
        for value in (mode, user, group):
            assert value.startswith(":"), f"{path}: {value} would change an existing {path}"


def test_purge_removes_only_what_the_package_made_in_etc() -> None:
    """The deb's purge removes the config file it made and /etc/vgpu only when empty."""
    postrm = (REPO / "packaging/deb/debian/postrm").read_text(encoding="utf-8")
    assert "rm -rf /etc/vgpu" not in postrm
    assert "rm -f /etc/vgpu/config.toml" in postrm
    assert "rmdir /etc/vgpu" in postrm


def _unit_settings(path: Path, key: str) -> list[str]:
    """Every value of ``key`` in a unit file, its continued lines joined, split at blanks."""
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    values: list[str] = []
    for line in text.splitlines():
        if line.startswith(f"{key}="):
            values.extend(line.split("=", 1)[1].split())
    return values


def test_every_unit_group_is_made_by_the_sysusers_file() -> None:
    """A Group= a unit runs as is one the package's sysusers.d file creates, so that the
    unit never fails with 216/GROUP on a node the package was installed on."""
    created = {
        line.split()[1]
        for line in (REPO / "systemd/vgpu-agent.sysusers").read_text(encoding="utf-8").splitlines()
        if line.startswith("g ")
    }
    groups = {
        group
        for unit in (REPO / "systemd").glob("*.service")
        for group in _unit_settings(unit, "Group")
    }
    assert groups, "no unit runs as a group of its own"
    assert groups <= created, f"not made by vgpu-agent.sysusers: {sorted(groups - created)}"


def test_only_the_device_plugin_drop_in_hides_what_dra_needs() -> None:
    """The node's kubelet credentials the DRA frontend authenticates with (its default
    kubeconfig) and the plugin directories it serves in are hidden by the drop-in a DRA
    node turns off, never by the unit itself, whose list a drop-in cannot take back."""
    from vgpu_agent.config.dra import DraConfig

    unit = set(_unit_settings(REPO / "systemd/vgpu-agent.service", "InaccessiblePaths"))
    drop_in = set(
        _unit_settings(
            REPO / "systemd/vgpu-agent.service.d/10-device-plugin-only.conf", "InaccessiblePaths"
        )
    )
    defaults = DraConfig()
    needed = {
        f"-{defaults.kubeconfig}",
        "-/var/lib/kubelet/pki",
        f"-{defaults.registry_dir}",
        f"-{defaults.plugins_dir}",
    }
    assert needed <= drop_in
    assert not unit & drop_in
    assert not any(
        path.startswith(("-/var/lib/kubelet/pki", "-/var/lib/kubelet/plugins")) for path in unit
    )
