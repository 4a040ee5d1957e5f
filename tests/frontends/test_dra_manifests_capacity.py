"""The manifests of claims sized by capacity and of the extended resource served through
DRA: they name our driver, our capacities and the device plugin's resource name, and an
amount the scheduler can place on the GPU they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vgpu_agent.frontends.dra.capacity import COMPUTE_SHARES, MEMORY, parse_quantity
from vgpu_agent.model.devices import proportional_memory_mib

MANIFESTS = Path(__file__).resolve().parents[2] / "packaging" / "dra"
DRIVER = "vgpu.eks.amazonaws.com"
RESOURCE = "eks.amazonaws.com/vgpu"


def by_kind(name: str) -> dict[str, dict[str, Any]]:
    """A manifest file's objects by kind."""
    with (MANIFESTS / name).open(encoding="utf-8") as text:
        return {document["kind"]: document for document in yaml.safe_load_all(text) if document}


def test_the_extended_class_serves_the_device_plugins_resource_from_our_driver() -> None:
    """The class selects our devices and carries the resource name pods already ask for."""
    device_class = by_kind("deviceclass-extended.yaml")["DeviceClass"]
    assert device_class["spec"]["extendedResourceName"] == RESOURCE
    assert device_class["spec"]["selectors"] == [
        {"cel": {"expression": f'device.driver == "{DRIVER}"'}}
    ]
    plain = by_kind("deviceclass.yaml")["DeviceClass"]
    assert device_class["metadata"]["name"] != plain["metadata"]["name"]


def test_the_extended_pod_is_a_device_plugin_pod() -> None:
    """The pod asks for the extended resource and no claim, as a device plugin pod does."""
    pod = by_kind("example-extended-pod.yaml")["Pod"]
    assert "resourceClaims" not in pod["spec"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"] == {RESOURCE: 1}


def test_the_capacity_claim_fits_the_ceiling_it_documents() -> None:
    """16Gi on an 80 GB GPU of 8 shares rounds up to 2 shares, the ceiling it names."""
    objects = by_kind("example-capacity-pod.yaml")
    (request,) = objects["ResourceClaimTemplate"]["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == DRIVER
    requests = request["exactly"]["capacity"]["requests"]
    assert set(requests) == {MEMORY, COMPUTE_SHARES}
    share_bytes = proportional_memory_mib(81559, 0, 1, 8) * 1024 * 1024
    memory_shares = -(-parse_quantity(requests[MEMORY]) // share_bytes)
    assert memory_shares == 2
    assert parse_quantity(requests[COMPUTE_SHARES]) == 2
    (claim,) = objects["Pod"]["spec"]["resourceClaims"]
    assert (
        claim["resourceClaimTemplateName"] == objects["ResourceClaimTemplate"]["metadata"]["name"]
    )
