"""AdmissionReview (admission.k8s.io/v1) in and out: the API server's request to a webhook, read
strictly, and the response it expects. Pure: JSON values in, JSON values out.

A review that is not what the API server sends is an `AdmissionError` with a message saying
what is wrong; the server answers it with 400 (never a crash, never a guess at an allow).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

API_VERSION: Final = "admission.k8s.io/v1"
KIND: Final = "AdmissionReview"
OPERATIONS: Final = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT"})


class AdmissionError(ValueError):
    """The body is not an AdmissionReview request the webhook can answer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionRequest:
    uid: str
    kind: str  # the object's kind, e.g. "Pod", "EgressPolicy"
    group: str
    operation: str
    namespace: str
    name: str
    object: Mapping[str, Any] | None  # None for DELETE
    dry_run: bool


def parse_review(body: object) -> AdmissionRequest:
    """The request of an AdmissionReview, or AdmissionError naming the first thing wrong."""
    if not isinstance(body, dict):
        raise AdmissionError("the body is not a JSON object (expected an AdmissionReview)")
    if body.get("apiVersion") != API_VERSION or body.get("kind") != KIND:
        raise AdmissionError(
            f"expected apiVersion {API_VERSION} and kind {KIND}, got "
            f"{body.get('apiVersion')!r} and {body.get('kind')!r} "
            "(set admissionReviewVersions: [v1] in the webhook configuration)"
        )
    request = body.get("request")
    if not isinstance(request, dict):
        raise AdmissionError("request is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise AdmissionError("request.uid is missing or not a string")
    kind = request.get("kind")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise AdmissionError("request.kind is missing or has no kind")
    operation = request.get("operation")
    if operation not in OPERATIONS:
        raise AdmissionError(f"request.operation {operation!r} is not one of {sorted(OPERATIONS)}")
    obj = request.get("object")
    if operation in ("CREATE", "UPDATE") and not isinstance(obj, dict):
        raise AdmissionError(f"request.object is missing or not an object for {operation}")
    for field in ("namespace", "name"):
        if not isinstance(request.get(field, ""), str):
            raise AdmissionError(f"request.{field} is not a string")
    return AdmissionRequest(
        uid=uid,
        kind=kind["kind"],
        group=str(kind.get("group") or ""),
        operation=str(operation),
        namespace=str(request.get("namespace") or ""),
        name=str(request.get("name") or ""),
        object=obj if isinstance(obj, dict) else None,
        dry_run=request.get("dryRun") is True,
    )


def allow(
    uid: str,
    *,
    patch: Sequence[Mapping[str, Any]] = (),
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(list(patch), separators=(",", ":")).encode()
        ).decode("ascii")
    if warnings:
        response["warnings"] = list(warnings)
    return _review(response)


def deny(uid: str, message: str, *, code: int = 422, reason: str = "Invalid") -> dict[str, Any]:
    """A refusal: the API server puts `message` in the error `kubectl apply` prints."""
    status = {"code": code, "reason": reason, "message": message}
    return _review({"uid": uid, "allowed": False, "status": status})


def _review(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}
