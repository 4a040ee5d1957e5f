"""The cluster manifests under packaging/dra/: valid resource.k8s.io/v1 objects (no field the
API does not know) that select our driver and fit together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube.models.core_v1 import Pod
from lightkube.models.resource_v1 import DeviceClass, ResourceClaimTemplate

MANIFESTS = Path(__file__).resolve().parents[2] / "packaging" / "dra"
DRIVER = "vgpu.eks.amazonaws.com"
MODELS: dict[tuple[str, str], Any] = {
    ("resource.k8s.io/v1", "DeviceClass"): DeviceClass,
    ("resource.k8s.io/v1", "ResourceClaimTemplate"): ResourceClaimTemplate,
    ("v1", "Pod"): Pod,
}


def documents(name: str) -> list[dict[str, Any]]:
    """The YAML documents of one manifest file."""
    with (MANIFESTS / name).open(encoding="utf-8") as text:
        return [document for document in yaml.safe_load_all(text) if document]


def by_kind(name: str) -> dict[str, dict[str, Any]]:
    """A manifest file's objects by kind."""
    return {document["kind"]: document for document in documents(name)}


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_every_object_is_exactly_what_the_api_models_hold(name: str) -> None:
    """Each object decodes into the Kubernetes model of its kind and encodes back unchanged:
    a misspelt or unknown field (which the API server would drop or refuse) fails here."""
    for document in documents(name):
        model = MODELS[document["apiVersion"], document["kind"]]
        assert model.from_dict(document, lazy=False).to_dict() == document


def test_the_device_class_selects_our_driver() -> None:
    """The DeviceClass is named after the driver and selects its devices by CEL."""
    device_class = by_kind("deviceclass.yaml")["DeviceClass"]
    assert device_class["metadata"]["name"] == DRIVER
    assert device_class["spec"]["selectors"] == [
        {"cel": {"expression": f'device.driver == "{DRIVER}"'}}
    ]


def test_the_example_pod_uses_a_claim_of_the_class() -> None:
    """The template asks for one device of the class; the pod's container uses its claim."""
    objects = by_kind("example-pod.yaml")
    template, pod = objects["ResourceClaimTemplate"], objects["Pod"]
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == DRIVER
    assert request["exactly"]["count"] == 1
    (claim,) = pod["spec"]["resourceClaims"]
    assert claim["resourceClaimTemplateName"] == template["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["claims"] == [{"name": claim["name"]}]
