"""Kubernetes manifests checked against the API's schemas, offline (for tests/deploy/test_k8s.py).

Built-in kinds go through the `kubernetes` client's models (>= 37: pydantic models generated
from the API's OpenAPI document, with strict types and `extra="forbid"`): an unknown field (the
API server's strict field validation, kubectl's default, rejects those), a value of the wrong
type or a missing required field is an error. LeaderWorkerSet is a CRD: the JSON schema taken
from its CRD (schemas/leaderworkerset-v1.json) checks it, and its pod templates are checked as
core/v1 PodTemplateSpec like any built-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes.client
import pydantic

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_SCHEMA = Path(__file__).with_name("schemas") / "leaderworkerset-v1.json"


def model_name(api_version: str, kind: str) -> str:
    """("apps/v1", "Deployment") -> "V1Deployment"; ("rbac.../v1", "Role") -> "V1Role"."""
    version = api_version.rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + kind


def check_model(value: dict, type_name: str, where: str) -> list[str]:
    """Every problem of `value` as the client's model `type_name`, with its path. (The models'
    from_dict() drops unknown keys; model_validate() checks the whole tree.)"""
    try:
        getattr(kubernetes.client, type_name).model_validate(value)
    except pydantic.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return []


def pod_templates(lws: dict) -> dict[str, dict]:
    lwt = lws["spec"]["leaderWorkerTemplate"]
    return {name: lwt[name] for name in ("leaderTemplate", "workerTemplate") if name in lwt}


def validate(doc: dict) -> list[str]:
    """Every problem the API server's schema checks would find in one manifest ([]: none)."""
    kind = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") != LWS_API:
        return check_model(doc, model_name(doc["apiVersion"], doc["kind"]), kind)
    schema = json.loads(LWS_SCHEMA.read_text())
    problems = [
        f"{kind}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)
    ]
    problems += check_model(doc["metadata"], "V1ObjectMeta", f"{kind} metadata")
    if not problems:  # the templates' places are known to be right
        for name, template in pod_templates(doc).items():
            problems += check_model(template, "V1PodTemplateSpec", f"{kind} {name}")
    return problems
