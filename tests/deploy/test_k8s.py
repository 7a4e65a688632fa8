"""deploy/k8s: every manifest passes the Kubernetes API's schemas (the client's models; the
LeaderWorkerSet CRD's schema), the validator catches what the API server would refuse, and the
manifests fit together: flags the server and the router accept, probes on /health at the
container's port, GPUs, adapters from a read-only volume, Services that select the right pods,
RBAC for the router's pod discovery, and multi-node ranks wired from LWS's variables."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from sglang_router.launch_router import parse_router_args

from sglora.config import ServerArgs
from tests.deploy.dockerfile import ROOT
from tests.deploy.k8s_schema import validate

K8S = ROOT / "deploy" / "k8s"
FILES = sorted(K8S.glob("*.yaml"))
PORT = 30000


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(path: str, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs(K8S / path) if d["kind"] == kind]
    found = [d for d in found if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{path}: {len(found)} {kind} named {name}"
    return found[0]


def container(pod_template: dict) -> dict:
    (c,) = pod_template["spec"]["containers"]
    return c


def resolve(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in args, with sample values."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args]


def flag(args: list[str], name: str) -> str:
    """Value of --name=VALUE."""
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_manifest_matches_the_api_schema(path):
    assert docs(path)
    for doc in docs(path):
        assert validate(doc) == [], f"{path.name} {doc['kind']} {doc['metadata']['name']}"


def _deployment(edit) -> dict:
    doc = copy.deepcopy(find("replicas.yaml", "Deployment"))
    edit(doc["spec"])
    return doc


def _pod(spec: dict) -> dict:
    return spec["template"]["spec"]


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda s: s.update(replicas="2"), "replicas: Input should be a valid integer"),
        (lambda s: _pod(s)["containers"][0].update(imagePullPolicyy="x"), "Extra inputs"),
        (lambda s: _pod(s)["containers"][0].pop("name"), "name: Field required"),
        (lambda s: _pod(s).update(volumes={"a": 1}), "volumes: Input should be a valid list"),
        (lambda s: s["template"]["metadata"]["labels"].update(tier=3), "should be a valid string"),
    ],
)
def test_validator_rejects_what_the_api_server_would(edit, expect):
    problems = validate(_deployment(edit))
    assert any(expect in p for p in problems), problems


def _worker(spec: dict) -> dict:
    return spec["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda s: s["leaderWorkerTemplate"].update(restartPolicy="Always"), "is not one of"),
        (lambda s: s.update(replica=2), "Additional properties"),
        (lambda s: s["leaderWorkerTemplate"].pop("workerTemplate"), "'workerTemplate' is a"),
        (lambda s: s["leaderWorkerTemplate"].update(size="2"), "is not of type 'integer'"),
        (lambda s: _worker(s).update(gpus=8), "Extra inputs"),
    ],
)
def test_lws_validator_rejects_what_the_crd_would(edit, expect):
    doc = copy.deepcopy(find("multinode-lws.yaml", "LeaderWorkerSet"))
    edit(doc["spec"])
    problems = validate(doc)
    assert any(expect in p for p in problems), problems


def test_replicas_get_a_gpu_probes_on_health_and_read_only_adapters():
    dep = find("replicas.yaml", "Deployment")
    pod = dep["spec"]["template"]
    c = container(pod)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == "http", probe
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["adapters"]["mountPath"] == "/adapters" and mounts["adapters"]["readOnly"]
    assert volumes["adapters"]["persistentVolumeClaim"]["claimName"] == "sglora-adapters"
    claims = {d["metadata"]["name"] for d in docs(K8S / "storage.yaml")}
    pvcs = {
        v["persistentVolumeClaim"]["claimName"]
        for v in volumes.values()
        if "persistentVolumeClaim" in v
    }
    assert pvcs <= claims
    assert pod["spec"]["securityContext"]["runAsNonRoot"]
    key = next(e for e in c["env"] if e["name"] == "SGLORA_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["name"] == "sglora-api-key"
    args = ServerArgs.from_cli(c["args"])
    assert (args.host, args.port, args.tp_size) == ("0.0.0.0", PORT, 1)
    assert args.lora_paths and all("=/adapters/" in p for p in args.lora_paths)
    svc = find("replicas.yaml", "Service")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports


def test_router_discovers_the_replicas_and_may_list_pods():
    replica_pod = find("replicas.yaml", "Deployment")["spec"]["template"]
    dep = find("router.yaml", "Deployment")
    pod = dep["spec"]["template"]
    c = container(pod)
    assert c["command"] == ["python", "-m", "sglang_router.launch_router"]
    env = {"POD_NAMESPACE": "default", "SGLORA_API_KEY": "key"}
    args = parse_router_args(resolve(c["args"], env))  # flags the installed router accepts
    assert args.service_discovery
    assert args.selector.items() <= replica_pod["metadata"]["labels"].items()
    assert args.service_discovery_port == PORT and args.service_discovery_namespace == "default"
    assert (args.policy, args.assignment_mode) == ("manual", "min_group")
    assert args.cb_failure_threshold < args.retry_max_retries  # see docs/deploy.md, Failures
    for probe, path in (("readinessProbe", "/readiness"), ("livenessProbe", "/liveness")):
        assert c[probe]["httpGet"]["path"] == path
    account = pod["spec"]["serviceAccountName"]
    binding = find("router.yaml", "RoleBinding")
    role = find("router.yaml", "Role", binding["roleRef"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert find("router.yaml", "ServiceAccount", account)
    (rule,) = role["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])
    svc = find("router.yaml", "Service")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_lws_leader_serves_rank_0_and_workers_take_their_index():
    lws = find("multinode-lws.yaml", "LeaderWorkerSet")
    lwt = lws["spec"]["leaderWorkerTemplate"]
    leader, worker = container(lwt["leaderTemplate"]), container(lwt["workerTemplate"])
    size = lwt["size"]
    gpus = int(leader["resources"]["limits"]["nvidia.com/gpu"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    dist_port = next(p["containerPort"] for p in leader["ports"] if p["name"] == "dist-init")
    for c in (leader, worker):
        assert flag(c["args"], "tp-size") == str(size * gpus)
        assert flag(c["args"], "nnodes") == "$(LWS_GROUP_SIZE)"
        assert flag(c["args"], "dist-init-addr") == f"$(LWS_LEADER_ADDRESS):{dist_port}"
        assert flag(c["args"], "model-path") == flag(leader["args"], "model-path")
    assert flag(leader["args"], "node-rank") == "0"
    assert flag(worker["args"], "node-rank") == "$(NODE_RANK)"
    rank = next(e for e in worker["env"] if e["name"] == "NODE_RANK")
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"
    )
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health"
    svc = find("multinode-lws.yaml", "Service")
    assert svc["spec"]["selector"] == {
        "leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"],
        "role": lwt["leaderTemplate"]["metadata"]["labels"]["role"],
    }


def test_lws_args_are_flags_the_server_accepts():
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    if not {"nnodes", "node_rank", "dist_init_addr"} <= names:
        pytest.skip(
            "ServerArgs has no multi-node flags yet (--nnodes, --node-rank, --dist-init-addr)"
        )
    lwt = find("multinode-lws.yaml", "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    env = {"LWS_GROUP_SIZE": str(lwt["size"]), "LWS_LEADER_ADDRESS": "sglora-tp16-0.sglora-tp16"}
    for name, rank in (("leaderTemplate", "0"), ("workerTemplate", "1")):
        args = ServerArgs.from_cli(
            resolve(container(lwt[name])["args"], {**env, "NODE_RANK": rank})
        )
        assert (args.nnodes, args.node_rank) == (lwt["size"], int(rank))
        assert args.dist_init_addr == "sglora-tp16-0.sglora-tp16:5000"
