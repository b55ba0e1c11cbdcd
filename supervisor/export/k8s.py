"""A plan as a Kubernetes ``DynamoGraphDeployment``: pure, Plan -> manifest dict (the CLI prints YAML).

Field names follow the Dynamo operator's CRD ``nvidia.com/v1beta1`` as Dynamo 1.6.1 publishes it: the
DGD templates shipped inside the ai-dynamo 1.6.1 wheel (``dynamo/profiler/templates/dgd/*``) and the
operator's Go types (``deploy/operator/api/v1beta1``: ``DynamoGraphDeploymentSpec.components`` is a
list of ``DynamoComponentDeploymentSharedSpec`` with ``name``, ``type``, ``replicas`` and a native
``podTemplate`` whose container ``main`` carries image, command, args, env and resources). The older
``v1alpha1`` shape (``spec.services.<Name>.componentType``, ``extraPodSpec.mainContainer``) is what the
operator converts from; 1.6.1's own templates no longer write it.

What changes on the way to Kubernetes, and why:
* etcd / nats-server processes are not exported: the operator's platform provides discovery.
* LMCache's servers (lmcache-server, lm-server, redis) are not exported either: a note says so, since
  the workers' loopback address of them must then point at what LMCache's operator runs.
* Host plumbing is dropped, because the operator injects its own per pod: bind addresses
  (``DYN_*_HOST``), ``DYN_SYSTEM_PORT`` (it probes its own port), discovery and plane variables,
  ``CUDA_VISIBLE_DEVICES`` (the device plugin picks GPUs), NIXL side-channel host/port (one pod, one
  network namespace), and the frontend's ``--http-host/--http-port`` (its service port is fixed).
* GPUs become ``resources.limits["nvidia.com/gpu"]``: the worker's GPU count (= tensor parallel size).
* Everything else is kept as the plan has it: the worker flags with ``--kv-transfer-config``, the
  ``LMCACHE_*`` settings, ``PYTHONHASHSEED``, the profile's own env.
* Secrets never appear in clear: a variable whose name says credential, or whose value holds a URL
  password (``LMCACHE_REMOTE_URL=redis://:pw@...``), becomes a ``secretKeyRef`` into one Secret
  (default ``<name>-secrets``, key = variable name); a secret inside an argument becomes ``$(VAR)``,
  which Kubernetes expands from such a reference. :attr:`Export.secret_keys` lists what to create.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.plan.spec import Plan, ProcessSpec, Role
from supervisor.redact import is_secret_name, redact_text, secret_arg_indexes

API_VERSION = "nvidia.com/v1beta1"
KIND = "DynamoGraphDeployment"
DYNAMO_VERSION = "1.6.1"
# Images as Dynamo 1.6.1's own DGD templates name them; the mocker has no runtime image of its own.
DEFAULT_IMAGES = {
    "vllm": f"nvcr.io/nvidia/ai-dynamo/vllm-runtime:{DYNAMO_VERSION}",
    "mocker": f"nvcr.io/nvidia/ai-dynamo/dynamo-planner:{DYNAMO_VERSION}",
}
COMPONENT_TYPES = {
    Role.FRONTEND: "frontend",
    Role.AGG: "worker",
    Role.DECODE: "decode",
    Role.PREFILL: "prefill",
}
GPU_RESOURCE = "nvidia.com/gpu"
# Variables the supervisor sets for one host that the operator sets per pod (see the module docstring).
HOST_ENV = frozenset(
    {
        "DYN_TCP_RPC_HOST",
        "DYN_EVENT_PLANE_HOST",
        "DYN_TCP_RESPONSE_STREAM_HOST",
        "DYN_SYSTEM_HOST",
        "DYN_SYSTEM_PORT",
        "DYN_DISCOVERY_BACKEND",
        "DYN_FILE_KV",
        "ETCD_ENDPOINTS",
        "ETCD_LEASE_TTL",
        "NATS_SERVER",
        "DYN_REQUEST_PLANE",
        "DYN_EVENT_PLANE",
        "CUDA_VISIBLE_DEVICES",
        "VLLM_NIXL_SIDE_CHANNEL_HOST",
        "VLLM_NIXL_SIDE_CHANNEL_PORT",
        "PROMETHEUS_MULTIPROC_DIR",
    }
)
FRONTEND_HOST_FLAGS = ("--http-host", "--http-port")
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class Export:
    """The manifest, the Secret keys it references, and notes for the user (printed on stderr)."""

    manifest: dict[str, Any]
    secret_name: str
    secret_keys: tuple[str, ...]
    notes: tuple[str, ...]


def dns_label(name: str) -> str:
    """A Kubernetes name from a profile or process name (``_`` is not allowed there)."""
    label = _DNS_LABEL.sub("-", name.lower()).strip("-")
    return label[:63].rstrip("-") or "dynamo"


def _component_name(spec: ProcessSpec) -> str:
    # Upstream's templates call the frontend component "Frontend"; workers keep their profile names.
    return "Frontend" if spec.role is Role.FRONTEND else dns_label(spec.group)


def _args(spec: ProcessSpec) -> list[str]:
    """The flags after ``python -m <module>``; the frontend loses its host-bound address flags."""
    rest = list(spec.argv[3:])
    if spec.role is not Role.FRONTEND:
        return rest
    out, skip = [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg in FRONTEND_HOST_FLAGS:
            skip = True
        elif arg.split("=", 1)[0] not in FRONTEND_HOST_FLAGS:
            out.append(arg)
    return out


class _Secrets:
    """Collects the Secret keys the manifest references."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: dict[str, None] = {}  # insertion-ordered set

    def ref(self, key: str) -> dict[str, Any]:
        self.keys[key] = None
        return {"name": key, "valueFrom": {"secretKeyRef": {"name": self.name, "key": key}}}


def _env(env: Mapping[str, str], secrets: _Secrets) -> list[dict[str, Any]]:
    out = []
    for key in sorted(env):
        if key in HOST_ENV:
            continue
        value = env[key]
        if (is_secret_name(key) and value) or redact_text(value) != value:
            out.append(secrets.ref(key))
        else:
            out.append({"name": key, "value": value})
    return out


def _container(spec: ProcessSpec, *, image: str, secrets: _Secrets) -> dict[str, Any]:
    env = _env(spec.env, secrets)
    args = []
    raw = _args(spec)
    secret = secret_arg_indexes(raw)  # a credential flag's value, or a URL password inside one
    for index, arg in enumerate(raw):
        if index in secret:  # expand it from the Secret instead
            var = f"LMCS_{dns_label(spec.name).upper().replace('-', '_')}_ARG_{index}"
            env.append(secrets.ref(var))
            arg = f"$({var})"
        args.append(arg)
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "command": ["python3", "-m", spec.argv[2]],
        "args": args,
    }
    if env:
        container["env"] = env
    if spec.gpus:
        count = str(len(spec.gpus))
        container["resources"] = {"limits": {GPU_RESOURCE: count}}  # as 1.6.1's templates: limits only
    return container


def export(
    plan: Plan, *, image: str | None = None, namespace: str | None = None, secret_name: str | None = None
) -> Export:
    """The ``DynamoGraphDeployment`` for ``plan`` (rendered for one machine, ``node_role="all"``)."""
    dep = plan.deployment
    name = dns_label(dep.name)
    secrets = _Secrets(secret_name or f"{name}-secrets")
    chosen = image or DEFAULT_IMAGES[dep.engine]
    components = []
    seen: set[str] = set()
    for spec in plan.processes:
        if spec.role not in COMPONENT_TYPES:
            continue  # etcd / nats: the platform's job on Kubernetes
        if spec.group in seen:
            continue  # replicas are one component with `replicas: N` (the operator spreads them)
        seen.add(spec.group)
        components.append(
            {
                "name": _component_name(spec),
                "type": COMPONENT_TYPES[spec.role],
                "replicas": len(plan.members(spec.group)),
                "podTemplate": {"spec": {"containers": [_container(spec, image=chosen, secrets=secrets)]}},
            }
        )
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["annotations"] = {"lmcache-supervise/profile": dep.profile}
    spec_body: dict[str, Any] = {}
    if dep.engine == "vllm":  # the CRD's enum is sglang|vllm|trtllm; the mocker has none
        spec_body["backendFramework"] = "vllm"
    spec_body["components"] = components
    notes = []
    if dep.model.startswith("/"):
        notes.append(
            f"the model is a path on this host ({dep.model}): make it exist at that path in the image "
            "or a mounted volume, or export with --model <HF id>"
        )
    cache = [spec.name for spec in plan.processes if spec.role.is_cache_server]
    if cache:
        notes.append(
            f"{', '.join(cache)} not exported: on Kubernetes LMCache's own operator runs its servers (a "
            "DaemonSet per node); point the workers' lmcache.mp.host or remote URL at it, since the "
            "127.0.0.1 in this plan is this host's"
        )
    if secrets.keys:
        keys = " ".join(f"--from-literal={k}=..." for k in secrets.keys)
        notes.append(f"create the Secret first: kubectl create secret generic {secrets.name} {keys}")
    return Export(
        manifest={"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec_body},
        secret_name=secrets.name,
        secret_keys=tuple(secrets.keys),
        notes=tuple(notes),
    )
