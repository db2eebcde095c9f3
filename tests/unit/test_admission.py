"""AdmissionReview in and out (proxy.core.admission): what the API server sends is read strictly,
and the answers are the shapes it expects."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from proxy.core.admission import AdmissionError, allow, deny, parse_review

REQUEST: dict[str, Any] = {
    "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
    "kind": {"group": "outgate.dev", "version": "v1alpha1", "kind": "EgressPolicy"},
    "operation": "CREATE",
    "namespace": "shop",
    "name": "web",
    "object": {"metadata": {"name": "web"}},
    "dryRun": True,
}


def review(**request: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {**REQUEST, **request},
    }


def test_a_review_is_read() -> None:
    request = parse_review(review())
    assert (request.uid, request.kind, request.group, request.operation) == (
        REQUEST["uid"], "EgressPolicy", "outgate.dev", "CREATE",
    )  # fmt: skip
    assert (request.namespace, request.name, request.dry_run) == ("shop", "web", True)
    deleted = parse_review(review(operation="DELETE", object=None))
    assert deleted.object is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "not a JSON object"),
        ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"},
         "admissionReviewVersions: [v1]"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request is missing"),
        (review(uid=""), "request.uid is missing"),
        (review(uid=7), "request.uid is missing"),
        (review(kind="Pod"), "request.kind is missing"),
        (review(operation="PATCH"), "request.operation 'PATCH' is not one of"),
        (review(object=None), "request.object is missing or not an object for CREATE"),
        (review(operation="UPDATE", object=[1]), "request.object is missing"),
        (review(namespace=["a"]), "request.namespace is not a string"),
    ],
)  # fmt: skip
def test_what_is_not_a_review_is_refused_with_what_is_wrong(body: object, message: str) -> None:
    with pytest.raises(AdmissionError) as caught:
        parse_review(body)
    assert message in str(caught.value)


def test_answers_have_the_shapes_the_api_server_reads() -> None:
    plain = allow("u1")
    assert plain == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": "u1", "allowed": True},
    }
    patch = [{"op": "add", "path": "/metadata/annotations", "value": {}}]
    patched = allow("u2", patch=patch, warnings=["w"])["response"]
    assert patched["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(patched["patch"])) == patch
    assert patched["warnings"] == ["w"]
    refused = deny("u3", "spec.rules[0]: bad -- fix: good")["response"]
    assert refused == {
        "uid": "u3",
        "allowed": False,
        "status": {"code": 422, "reason": "Invalid", "message": "spec.rules[0]: bad -- fix: good"},
    }
