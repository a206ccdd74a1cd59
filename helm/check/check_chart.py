#!/usr/bin/env python3
"""Checks for the wsgate Helm chart (helm/wsgate).

Uses the real Helm engine (helm-python-sdk: lint, values schema, render), the
Kubernetes OpenAPI schemas (kubernetes-validate, strict) and the prometheus-operator
schemas (@kubernetes-models/prometheus-operator, through node).

Install the tools once:   bash helm/check/install.sh
Run:                      .tools/venv/bin/python helm/check/check_chart.py
($WSGATE_TOOLS_DIR overrides the .tools directory.)

Exit status 0 when every check passed, 1 when one failed, 2 when a tool is missing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "wsgate"
TOOLS = Path(os.environ.get("WSGATE_TOOLS_DIR") or ROOT / ".tools").resolve()
INSTALL_HINT = "install the chart check tools with: bash helm/check/install.sh"

# Kubernetes versions the rendered manifests are validated against: a current release,
# and the oldest one with the native preStop sleep action used by default.
KUBE_VERSIONS = ["1.37.0", "1.30.0"]
LINT_KUBE_VERSION = "v1.37.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# Every variable the gateway reads (flags of `wsgate serve`).
KNOWN_ENV = {
    "WSGATE_LISTEN", "WSGATE_ADMIN_LISTEN", "WSGATE_BACKEND_URL", "WSGATE_AUTH_PATH",
    "WSGATE_AUTH_CLASSIFICATION_ID", "WSGATE_CHAT_ROOM_PATH", "WSGATE_USER_ID_POINTER",
    "WSGATE_TENANT_POINTER", "WSGATE_BACKEND_TIMEOUT", "WSGATE_BACKEND_CONCURRENCY",
    "WSGATE_BACKEND_QUEUE", "WSGATE_BACKEND_QUEUE_TIMEOUT", "WSGATE_AUTH_TTL",
    "WSGATE_AUTH_NEGATIVE_TTL", "WSGATE_AUTH_SERVE_STALE", "WSGATE_CHAT_ROOM_TTL",
    "WSGATE_REDIS_URL", "WSGATE_REDIS_PREFIX", "WSGATE_REDIS_MODE",
    "WSGATE_REDIS_SENTINEL_MASTER", "WSGATE_NODE_ID", "WSGATE_PRESENCE_TTL",
    "WSGATE_API_TOKEN", "WSGATE_MAX_FRAME_SIZE", "WSGATE_OUTBOUND_QUEUE",
    "WSGATE_OUTBOUND_QUEUE_BYTES", "WSGATE_MAX_CONNECTIONS_PER_USER", "WSGATE_PING_INTERVAL",
    "WSGATE_DRAIN_TIMEOUT", "WSGATE_LOG_FORMAT", "WSGATE_LOG_LEVEL",
    "WSGATE_SESSION_COOKIES", "WSGATE_SESSION_AUTH_PATH", "WSGATE_SESSION_USER_POINTER",
    "WSGATE_SESSION_TENANT_POINTER", "WSGATE_ALLOWED_ORIGINS", "WSGATE_RESUBSCRIBE_WINDOW",
    "WSGATE_MAX_CONNECTIONS", "WSGATE_MAX_HANDSHAKES_PER_IP", "WSGATE_HANDSHAKE_TIMEOUT",
    "WSGATE_TRUSTED_PROXIES", "WSGATE_HISTORY_TTL", "WSGATE_RESUME_WINDOW",
    "WSGATE_PUBLISH_LINGER", "WSGATE_MAX_RECOVERY_HOLD", "WSGATE_REDIS_CA_FILE",
}

# Recognisable secrets: they must reach the Secret and nothing else.
TOKEN = "tok-3f9c1e7a-never-in-plain-text"
REDIS_URL = "rediss://:redis-pass-8d2b@redis.example.internal:6380/0"

MONITORING = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    }
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ingress": {
        "apiToken": {"value": TOKEN},
        "allowedOrigins": ["https://erp.example.com", "http://127.0.0.1:5173"],
        "ingress": {
            "enabled": True,
            "hosts": [{"host": "erp.example.com"}, {"host": "erp2.example.com"}],
            "tls": [{"secretName": "erp-tls", "hosts": ["erp.example.com", "erp2.example.com"]}],
        },
    },
    "autoscaling": {
        "redis": {"enabled": True},
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12,
                        "connections": {"enabled": True, "targetAverageValue": "4000"}},
    },
    "monitoring": MONITORING,
    "existing-secrets": {
        "replicaCount": 3,
        "apiToken": {"existingSecret": "wsgate-token", "existingSecretKey": "token"},
        "redis": {"existingSecret": "redis-conn", "existingSecretKey": "url"},
    },
    "redis-enabled": {"replicaCount": 3, "redis": {"enabled": True}, "apiToken": {"value": TOKEN}},
    "external-redis-url": {"replicaCount": 2, "redis": {"url": REDIS_URL}, "apiToken": {"value": TOKEN}},
    "redis-sentinel": {"replicaCount": 2, "apiToken": {"value": TOKEN},
                       "redis": {"mode": "sentinel", "sentinelMaster": "mymaster",
                                 "url": "redis://:pw@sentinel-0:26379,redis://:pw@sentinel-1:26379"}},
    "redis-cluster": {"replicaCount": 3, "apiToken": {"value": TOKEN},
                      "redis": {"mode": "cluster", "url": "rediss://:pw@redis-0:6379,rediss://:pw@redis-1:6379"}},
    "redis-ca-secret": {"replicaCount": 2, "apiToken": {"value": TOKEN},
                        "redis": {"url": REDIS_URL, "ca": {"existingSecret": "redis-tls"}}},
    "redis-ca-configmap": {"replicaCount": 2, "apiToken": {"value": TOKEN},
                           "redis": {"mode": "sentinel", "sentinelMaster": "mymaster",
                                     "existingSecret": "redis-conn", "existingSecretKey": "url",
                                     "ca": {"existingConfigMap": "internal-ca", "key": "bundle.pem"}}},
    "exec-prestop-explicit-grace": {
        "drainTimeoutSeconds": 30,
        "preStop": {"sleepSeconds": 10, "useSleepAction": False},
        "terminationGracePeriodSeconds": 60,
        "log": {"level": "wsgate=debug,info", "format": "text"},
        "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                    "loadBalancerSourceRanges": ["10.0.0.0/8"]},
    },
    "everything": {
        "apiToken": {"value": TOKEN},
        "redis": {"enabled": True},
        "ingress": {"enabled": True, "tls": [{"secretName": "erp-tls", "hosts": ["erp.example.com"]}]},
        "autoscaling": {"enabled": True, "connections": {"enabled": True}},
        **MONITORING,
        "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        "podAnnotations": {"example.com/team": "erp"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ws", "effect": "NoSchedule"}],
    },
}

# Values that must be refused, with a fragment of the expected message.
BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "drain timeout not a number": ({"drainTimeoutSeconds": "ten"}, "drainTimeoutSeconds"),
    "unknown top-level key": ({"replicas": 3}, "replicas"),
    "malformed duration": ({"auth": {"ttl": "one minute"}}, "/auth/ttl"),
    "log format": ({"log": {"format": "xml"}}, "/log/format"),
    "ingress path other than /notws or /chat": (
        {"ingress": {"enabled": True, "paths": ["/notws", "/rest"]}}, "/ingress/paths"),
    "backend URL without scheme": ({"backendUrl": "moqui:8080"}, "backendUrl"),
    "redis URL scheme": ({"redis": {"url": "http://redis:6379"}}, "/redis/url"),
    "grace period shorter than the drain window": (
        {"drainTimeoutSeconds": 20, "preStop": {"sleepSeconds": 5}, "terminationGracePeriodSeconds": 25},
        "terminationGracePeriodSeconds"),
    "several replicas without Redis": ({"replicaCount": 3}, "needs Redis"),
    "autoscaling without Redis": ({"autoscaling": {"enabled": True}}, "needs Redis"),
    "two Redis sources": ({"redis": {"url": "redis://r:6379", "existingSecret": "x"}}, "only one"),
    "sentinel without its master name": (
        {"redis": {"mode": "sentinel", "url": "redis://s:26379"}}, "sentinelMaster"),
    "cluster on the bundled Redis": ({"redis": {"mode": "cluster", "enabled": True}}, "bundled Redis is standalone"),
    "master name outside sentinel mode": (
        {"redis": {"url": "redis://r:6379", "sentinelMaster": "m"}}, "only used with"),
    "unknown redis mode": ({"redis": {"mode": "ring"}}, "/redis/mode"),
    "two Redis CA sources": (
        {"redis": {"url": "rediss://r:6380", "ca": {"existingSecret": "a", "existingConfigMap": "b"}}},
        "only one of redis.ca"),
    "Redis CA for the bundled Redis": (
        {"redis": {"enabled": True, "ca": {"existingSecret": "a"}}}, "bundled Redis is plain"),
    "Redis CA without Redis": ({"redis": {"ca": {"existingSecret": "a"}}}, "redis.ca verifies"),
    "Redis CA with a redis:// URL": (
        {"redis": {"url": "rediss://r:6380, redis://s:6379", "mode": "cluster", "ca": {"existingSecret": "a"}}},
        "needs rediss://"),
    "Redis CA with #insecure": (
        {"redis": {"url": "rediss://r:6380/#insecure", "ca": {"existingSecret": "a"}}}, "#insecure"),
    "two token sources": ({"apiToken": {"value": "a", "existingSecret": "x"}}, "only one"),
    "allowed origin without scheme": ({"allowedOrigins": ["erp.example.com"]}, "allowedOrigins"),
    "malformed resubscribe window": ({"resubscribeWindow": "ten minutes"}, "resubscribeWindow"),
    "malformed resume window": ({"resumeWindow": "half a minute"}, "resumeWindow"),
    "publish linger in seconds": ({"publishLinger": "2s"}, "publishLinger"),
}


class CheckFailed(Exception):
    pass


def need_tools() -> tuple[Any, Any, Any]:
    """Import the tools or exit 2 saying how to install them."""
    venv_python = TOOLS / "venv" / "bin" / "python"
    try:
        import helm_python  # noqa: PLC0415
        import kubernetes_validate.utils  # noqa: PLC0415
        import yaml  # noqa: PLC0415
    except ImportError as exc:
        print(f"check_chart.py: missing Python module ({exc}).\n"
              f"  {INSTALL_HINT}\n  then run it with {venv_python}", file=sys.stderr)
        sys.exit(2)
    node_models = TOOLS / "node" / "node_modules" / "@kubernetes-models" / "prometheus-operator"
    if shutil.which("node") is None:
        print("check_chart.py: node is missing (apt-get install -y nodejs npm), then " + INSTALL_HINT,
              file=sys.stderr)
        sys.exit(2)
    if not node_models.is_dir():
        print(f"check_chart.py: {node_models} is missing.\n  {INSTALL_HINT}", file=sys.stderr)
        sys.exit(2)
    return helm_python, kubernetes_validate.utils, yaml


helm, kv, yaml = need_tools()


def render(values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values=values, name="erp", namespace="erp", is_install=True)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("_source", path)
                docs.append(doc)
    return docs


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "_source"}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    if len(found) != 1:
        raise CheckFailed(f"expected exactly one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "erp-wsgate")


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = gateway(docs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "wsgate")


def env_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(docs).get("env", [])}


def config_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap", "erp-wsgate")["data"]


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * units[unit]
    raise CheckFailed(f"cannot read duration {text!r}")


# ---------------------------------------------------------------------------- checks


def check_lint() -> str:
    reports = []
    for name, values in VALUE_SETS.items():
        report = helm.lint(str(CHART), values, strict=True, namespace="erp", kube_version=LINT_KUBE_VERSION)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + [
            {"error": e} for e in report.get("errors", [])]
        # "icon is recommended" is informational (severity 1) and not counted.
        expect(not problems, f"helm lint --strict ({name}): {problems}")
        reports.append(name)
    return f"lint --strict clean for {len(reports)} value sets"


def check_kubernetes_schemas(name: str, docs: list[dict[str, Any]]) -> str:
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(strip(doc), version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError
                raise CheckFailed(f"{doc['kind']} {doc['metadata']['name']} ({doc['_source']}) "
                                  f"is invalid for Kubernetes {version}: {exc}") from exc
        checked += 1
    return f"{checked} objects valid (strict) for Kubernetes {', '.join(KUBE_VERSIONS)}"


def check_crd_schemas(name: str, docs: list[dict[str, Any]]) -> str:
    crds = [strip(d) for d in docs if d["kind"] in CRD_KINDS]
    if not crds:
        return "no ServiceMonitor/PrometheusRule in this set"
    proc = subprocess.run(
        ["node", str(Path(__file__).with_name("validate_crds.mjs")), str(TOOLS / "node")],
        input=json.dumps(crds), capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise CheckFailed(f"node validator failed ({proc.returncode}): {proc.stderr.strip()}")
    results = json.loads(proc.stdout)
    bad = [r for r in results if not r["ok"]]
    expect(not bad, f"prometheus-operator schema: {bad}")
    expect(len(results) == len(crds), "validator skipped objects")
    return "valid per prometheus-operator schema: " + ", ".join(r["kind"] for r in results)


def check_probes_and_ports(name: str, docs: list[dict[str, Any]]) -> str:
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expect(ports == {"ws": 8081, "admin": 8082}, f"container ports {ports}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        expect(get["port"] in ("admin", 8082), f"{probe} uses port {get['port']}, not the admin port")
        expect(get["path"] == path, f"{probe} path {get['path']} != {path}")
    cfg = config_of(docs)
    expect(cfg["WSGATE_LISTEN"].endswith(":8081") and cfg["WSGATE_ADMIN_LISTEN"].endswith(":8082"),
           "listen addresses do not match the container ports")
    return "probes on the admin port (/healthz, /readyz), ports ws=8081 admin=8082"


def check_grace_period(name: str, docs: list[dict[str, Any]]) -> str:
    spec = gateway(docs)["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    drain = duration_seconds(config_of(docs)["WSGATE_DRAIN_TIMEOUT"])
    pre = container(docs)["lifecycle"]["preStop"]
    if "sleep" in pre:
        sleep = pre["sleep"]["seconds"]
    else:
        cmd = pre["exec"]["command"]
        expect(cmd[0] == "sleep", f"preStop exec {cmd}")
        sleep = int(cmd[1])
    expect(sleep > 0, "preStop sleep is 0: load balancers would still send connections during the drain")
    expect(grace > drain + sleep, f"terminationGracePeriodSeconds {grace} <= drain {drain} + preStop {sleep}")
    return f"grace {grace}s > preStop {sleep}s + drain {drain:g}s"


def check_services_and_ingress(name: str, docs: list[dict[str, Any]]) -> str:
    admin = one(docs, "Service", "erp-wsgate-admin")
    expect(admin["spec"]["type"] == "ClusterIP", f"admin Service type {admin['spec']['type']}")
    expect([p["targetPort"] for p in admin["spec"]["ports"]] == ["admin"], "admin Service ports")
    public = one(docs, "Service", "erp-wsgate")
    expect([p["targetPort"] for p in public["spec"]["ports"]] == ["ws"],
           f"public Service exposes {public['spec']['ports']}")
    selector = gateway(docs)["spec"]["selector"]["matchLabels"]
    for svc in (admin, public):
        expect(svc["spec"]["selector"] == selector, f"Service {svc['metadata']['name']} selector")
    for redis in find(docs, "Deployment", "erp-wsgate-redis"):
        labels = redis["spec"]["template"]["metadata"]["labels"]
        expect(not all(labels.get(k) == v for k, v in selector.items()),
               "the gateway selector also matches the Redis pods")
    notes = []
    for ing in find(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                expect(backend["name"] == "erp-wsgate", f"Ingress routes to {backend['name']}")
                expect(backend["port"] in ({"name": "ws"}, {"number": 8081}), f"Ingress port {backend['port']}")
                expect(path["path"] in ("/notws", "/chat"), f"Ingress routes {path['path']}")
        ann = ing["metadata"].get("annotations", {})
        expect(ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout") == "3600", "nginx read timeout")
        expect(ann.get("nginx.ingress.kubernetes.io/proxy-send-timeout") == "3600", "nginx send timeout")
        notes.append("Ingress routes only /notws and /chat to the public Service")
    return "admin Service is ClusterIP; " + ("; ".join(notes) or "no Ingress")


def check_secrets(name: str, docs: list[dict[str, Any]]) -> str:
    values = VALUE_SETS[name]
    env = env_of(docs)
    token_env = env["WSGATE_API_TOKEN"]
    expect("value" not in token_env and "secretKeyRef" in token_env.get("valueFrom", {}),
           f"WSGATE_API_TOKEN is not a secretKeyRef: {token_env}")
    ref = token_env["valueFrom"]["secretKeyRef"]
    deployment_text = json.dumps(gateway(docs)) + json.dumps(config_of(docs))
    for secret in (TOKEN, REDIS_URL, base64.b64encode(TOKEN.encode()).decode()):
        expect(secret not in deployment_text, "a secret appears in plain text in the Deployment/ConfigMap")
    token_cfg = values.get("apiToken", {})
    if token_cfg.get("existingSecret"):
        expect(ref == {"name": token_cfg["existingSecret"], "key": token_cfg["existingSecretKey"]},
               f"token ref {ref}")
        secrets = find(docs, "Secret", "erp-wsgate")
        expect(all("api-token" not in s.get("data", {}) for s in secrets),
               "chart created a token although apiToken.existingSecret is set")
    else:
        secret = one(docs, "Secret", ref["name"])
        stored = base64.b64decode(secret["data"][ref["key"]]).decode()
        if token_cfg.get("value"):
            expect(stored == token_cfg["value"], "Secret does not hold apiToken.value")
        else:
            expect(len(stored) >= 32, "generated token too short")
    redis_cfg = values.get("redis", {})
    redis_env = env.get("WSGATE_REDIS_URL")
    if redis_cfg.get("enabled"):
        expect(redis_env == {"name": "WSGATE_REDIS_URL", "value": "redis://erp-wsgate-redis:6379"},
               f"bundled Redis URL {redis_env}")
        one(docs, "Deployment", "erp-wsgate-redis")
        one(docs, "Service", "erp-wsgate-redis")
    elif redis_cfg.get("existingSecret"):
        expect(redis_env["valueFrom"]["secretKeyRef"] == {"name": redis_cfg["existingSecret"],
                                                          "key": redis_cfg["existingSecretKey"]},
               f"Redis URL ref {redis_env}")
    elif redis_cfg.get("url"):
        ref = redis_env["valueFrom"]["secretKeyRef"]
        secret = one(docs, "Secret", ref["name"])
        expect(base64.b64decode(secret["data"][ref["key"]]).decode() == redis_cfg["url"], "Redis URL in Secret")
    else:
        expect(redis_env is None, "WSGATE_REDIS_URL set without Redis configured")
    config = config_of(docs)
    expect(config.get("WSGATE_REDIS_MODE") == redis_cfg.get("mode", "standalone"),
           f"WSGATE_REDIS_MODE {config.get('WSGATE_REDIS_MODE')}")
    expect(config.get("WSGATE_REDIS_SENTINEL_MASTER") == (redis_cfg.get("sentinelMaster") or None),
           "WSGATE_REDIS_SENTINEL_MASTER follows redis.sentinelMaster")
    expect(not find(docs, "Deployment", "erp-wsgate-redis") or redis_cfg.get("enabled"),
           "Redis deployed although redis.enabled is false")
    return "API token only via secretKeyRef" + (", Redis URL via Secret" if redis_env and "valueFrom" in redis_env else "")


def check_redis_ca(name: str, docs: list[dict[str, Any]]) -> str:
    """redis.ca: only the CA's key is mounted, read-only, where WSGATE_REDIS_CA_FILE points."""
    ca = VALUE_SETS[name].get("redis", {}).get("ca", {})
    pod = gateway(docs)["spec"]["template"]["spec"]
    mounts = container(docs).get("volumeMounts", [])
    path = config_of(docs).get("WSGATE_REDIS_CA_FILE")
    if not ca:
        expect(path is None and not mounts and not pod.get("volumes"),
               "a Redis CA is mounted or configured although redis.ca is not set")
        return "no Redis CA"
    volume = one_item([v for v in pod.get("volumes", []) if v["name"] == "redis-ca"], "redis-ca volume")
    mount = one_item([m for m in mounts if m["name"] == "redis-ca"], "redis-ca mount")
    expect(mount.get("readOnly") is True, "the Redis CA is mounted writable")
    source = volume.get("secret") or volume.get("configMap")
    if ca.get("existingSecret"):
        expect(volume.get("secret", {}).get("secretName") == ca["existingSecret"], f"CA Secret {volume}")
    else:
        expect(volume.get("configMap", {}).get("name") == ca["existingConfigMap"], f"CA ConfigMap {volume}")
    items = source.get("items", [])
    expect(len(items) == 1 and items[0]["key"] == ca.get("key", "ca.crt"),
           f"only the CA's key is mounted: {items}")
    expect(path == f"{mount['mountPath']}/{items[0]['path']}",
           f"WSGATE_REDIS_CA_FILE {path} is not the mounted file")
    return f"CA from {'Secret' if ca.get('existingSecret') else 'ConfigMap'} key {items[0]['key']}, read-only at {path}"


def one_item(items: list[Any], what: str) -> Any:
    expect(len(items) == 1, f"expected one {what}, found {len(items)}")
    return items[0]


def check_security_and_rollout(name: str, docs: list[dict[str, Any]]) -> str:
    pod = gateway(docs)["spec"]["template"]
    sc = container(docs)["securityContext"]
    expect(sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, "container may run as root")
    expect(sc.get("readOnlyRootFilesystem") is True, "root filesystem is writable")
    expect(sc.get("allowPrivilegeEscalation") is False, "privilege escalation allowed")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities not dropped")
    expect(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "no RuntimeDefault seccomp profile")
    expect(pod["spec"]["securityContext"].get("runAsNonRoot") is True, "pod may run as root")
    ann = pod["metadata"]["annotations"]
    expect("checksum/config" in ann, "no checksum/config annotation")
    if find(docs, "Secret", "erp-wsgate"):
        expect("checksum/secret" in ann, "no checksum/secret annotation")
    expect(pod["spec"].get("topologySpreadConstraints"), "no topologySpreadConstraints")
    unknown = set(config_of(docs)) - KNOWN_ENV
    unknown |= {n for n in env_of(docs) if n.startswith("WSGATE_")} - KNOWN_ENV
    expect(not unknown, f"variables wsgate does not read: {sorted(unknown)}")
    return "non-root, read-only root fs, no capabilities, seccomp RuntimeDefault, checksum annotations"


def check_scaling(name: str, docs: list[dict[str, Any]]) -> str:
    hpas = find(docs, "HorizontalPodAutoscaler")
    dep = gateway(docs)
    pdb = one(docs, "PodDisruptionBudget")
    expect(pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"], "PDB selector")
    if not VALUE_SETS[name].get("autoscaling", {}).get("enabled"):
        expect(not hpas, "HPA rendered although autoscaling is off")
        return f"replicas {dep['spec']['replicas']}, PDB"
    hpa = hpas[0]
    expect("replicas" not in dep["spec"], "Deployment sets replicas while the HPA owns them")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    expect(metrics["Resource"]["resource"]["name"] == "cpu", "HPA has no CPU metric")
    if VALUE_SETS[name]["autoscaling"].get("connections", {}).get("enabled"):
        expect(metrics["Pods"]["pods"]["metric"]["name"] == "wsgate_connections", "no wsgate_connections metric")
    return "HPA on " + ", ".join(sorted(metrics)) + ", PDB"


def check_monitoring(name: str, docs: list[dict[str, Any]]) -> str:
    enabled = VALUE_SETS[name].get("metrics", {})
    sms, rules, dashboards = (find(docs, "ServiceMonitor"), find(docs, "PrometheusRule"),
                              find(docs, "ConfigMap", "erp-wsgate-dashboard"))
    if not enabled:
        expect(not (sms or rules or dashboards), "monitoring objects rendered although disabled")
        return "monitoring off"
    sm = sms[0]
    admin = one(docs, "Service", "erp-wsgate-admin")
    labels = admin["metadata"]["labels"]
    expect(all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
           "ServiceMonitor does not select the admin Service")
    public_labels = one(docs, "Service", "erp-wsgate")["metadata"]["labels"]
    expect(not all(public_labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
           "ServiceMonitor also selects the public Service")
    expect([e["port"] for e in sm["spec"]["endpoints"]] == ["admin"], "ServiceMonitor port")
    job = labels.get(sm["spec"].get("jobLabel", ""), admin["metadata"]["name"])
    expect("wsgate" in job, f"scrape job {job!r} does not match the alert rules' job=~\".*wsgate.*\"")
    expect(sm["metadata"]["labels"].get("release") == "kube-prometheus-stack", "ServiceMonitor extra labels")
    shipped = yaml.safe_load((CHART / "files" / "wsgate.rules.yml").read_text())
    expect(rules[0]["spec"]["groups"] == shipped["groups"], "PrometheusRule differs from files/wsgate.rules.yml")
    dash = dashboards[0]
    expect(dash["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard label grafana_dashboard")
    parsed = json.loads(dash["data"]["wsgate-dashboard.json"])
    expect(parsed == json.loads((CHART / "files" / "wsgate-dashboard.json").read_text()), "dashboard content")
    return (f"ServiceMonitor on the admin port, PrometheusRule with {len(shipped['groups'])} groups, "
            f"dashboard ConfigMap ({len(parsed.get('panels', []))} panels)")


def check_bad_values() -> str:
    refused = 0
    for label, (values, fragment) in BAD_VALUES.items():
        try:
            render(values)
        except (helm.HelmValuesError, helm.HelmRenderError) as exc:
            expect(fragment in str(exc), f"{label}: refused, but the message does not mention "
                                         f"{fragment!r}: {exc}")
            refused += 1
            continue
        raise CheckFailed(f"{label}: values {values} were accepted")
    return f"{refused} wrong value sets refused with a message naming the problem"


def check_file_copies() -> str:
    pairs = [("deploy/prometheus/wsgate.rules.yml", "wsgate.rules.yml"),
             ("deploy/grafana/wsgate-dashboard.json", "wsgate-dashboard.json")]
    compared, placeholders = [], []
    for original, copy in pairs:
        src, dst = ROOT / original, CHART / "files" / copy
        expect(dst.is_file(), f"helm/wsgate/files/{copy} is missing")
        if not src.is_file():
            placeholders.append(copy)
            continue
        expect(src.read_bytes() == dst.read_bytes(),
               f"helm/wsgate/files/{copy} differs from {original}: run bash helm/check/sync-files.sh")
        compared.append(copy)
    # Whatever the source, the shipped files must parse.
    rules = yaml.safe_load((CHART / "files" / "wsgate.rules.yml").read_text())
    expect(isinstance(rules, dict) and rules.get("groups"), "files/wsgate.rules.yml has no groups")
    json.loads((CHART / "files" / "wsgate-dashboard.json").read_text())
    msg = "identical to deploy/: " + (", ".join(compared) or "none")
    if placeholders:
        msg += "; placeholder (no original in deploy/ yet): " + ", ".join(placeholders)
    return msg


def check_example_manifests() -> str:
    """deploy/moqui/ingress-example.yaml is valid and routes only /notws and /chat to wsgate."""
    path = ROOT / "deploy" / "moqui" / "ingress-example.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except Exception as exc:
                raise CheckFailed(f"{path.name}: {doc['kind']} {doc['metadata']['name']} invalid for "
                                  f"Kubernetes {version}: {exc}") from exc
    routes = {p["path"]: p["backend"]["service"]["name"]
              for d in docs for r in d["spec"]["rules"] for p in r["http"]["paths"]}
    ws = sorted(p for p, svc in routes.items() if "wsgate" in svc)
    expect(ws == ["/chat", "/notws"], f"{path.name} routes {ws} to wsgate")
    expect(routes.get("/") == "moqui", f"{path.name} does not send / to Moqui")
    return f"{path.name}: {len(docs)} Ingresses valid; /notws and /chat to wsgate, / to Moqui"


def check_dockerfile() -> str:
    """The image and the chart agree: uid, ports, entrypoint."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    expect("USER 10001:10001" in lines, "deploy/Dockerfile does not switch to uid 10001")
    expect("EXPOSE 8081 8082" in lines, "deploy/Dockerfile does not expose 8081 and 8082")
    expect('ENTRYPOINT ["/usr/local/bin/wsgate"]' in lines, "deploy/Dockerfile entrypoint")
    expect('CMD ["serve"]' in lines, "deploy/Dockerfile CMD")
    values = helm.Chart.load(str(CHART)).values
    expect(values["securityContext"]["runAsUser"] == 10001 == values["podSecurityContext"]["runAsUser"],
           "chart runAsUser differs from the image's uid")
    expect(values["ports"] == {"ws": 8081, "admin": 8082}, "chart ports differ from the image's EXPOSE")
    return "image uid 10001, ports 8081/8082, entrypoint wsgate serve: consistent with the chart"


def check_notes() -> str:
    out = render(VALUE_SETS["ingress"])
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    expect("erp-wsgate-admin" in notes and "/notws" in notes, "NOTES.txt lacks the endpoints")
    expect(TOKEN not in notes, "NOTES.txt prints the API token")
    return "NOTES.txt names the endpoints and not the token"


def check_readme() -> str:
    readme = (CHART / "README.md").read_text()
    values = helm.Chart.load(str(CHART)).values

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node and not prefix.endswith(("annotations", "labels", "resources",
                                                                     "SecurityContext", "securityContext",
                                                                     "behavior", "nodeSelector", "affinity")):
            return [k for key, val in node.items() for k in leaves(val, f"{prefix}.{key}" if prefix else key)]
        return [prefix]

    missing = [key for key in leaves(values) if f"`{key}`" not in readme]
    expect(not missing, f"README.md does not document: {missing}")
    return f"README.md documents all {len(leaves(values))} values"


# ---------------------------------------------------------------------------- runner

PER_SET: list[Callable[[str, list[dict[str, Any]]], str]] = [
    check_kubernetes_schemas, check_crd_schemas, check_probes_and_ports, check_grace_period,
    check_services_and_ingress, check_secrets, check_redis_ca, check_security_and_rollout,
    check_scaling, check_monitoring,
]


def main() -> int:
    print(f"wsgate chart checks (Helm {helm.helm_sdk_version()}, kubernetes-validate, "
          f"prometheus-operator models)")
    passed = failed = 0

    def run(label: str, fn: Callable[[], str]) -> None:
        nonlocal passed, failed
        try:
            detail = fn()
            passed += 1
            print(f"ok   {label}: {detail}")
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL {label}: {exc}")
        except Exception:  # noqa: BLE001 - report and go on with the other checks
            failed += 1
            print(f"FAIL {label}: unexpected error\n{traceback.format_exc()}")

    run("lint", check_lint)
    for name, values in VALUE_SETS.items():
        rendered: dict[str, list[dict[str, Any]]] = {}

        def do_render(values: dict[str, Any] = values, name: str = name) -> str:
            docs = documents(render(values))
            rendered["docs"] = docs
            kinds = sorted({d["kind"] for d in docs})
            return f"{len(docs)} objects: {', '.join(kinds)}"

        run(f"render [{name}]", do_render)
        if "docs" not in rendered:
            continue
        for check in PER_SET:
            run(f"{check.__name__.removeprefix('check_')} [{name}]",
                lambda check=check, name=name: check(name, rendered["docs"]))
    run("bad values refused", check_bad_values)
    run("files/ copies", check_file_copies)
    run("example manifests", check_example_manifests)
    run("Dockerfile", check_dockerfile)
    run("NOTES.txt", check_notes)
    run("README values", check_readme)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
