"""Helpers for the real-vLLM tests of `prfaas vllm-cli` (tests/test_vllmcli_vllm.py).

Patching the vLLM that the test interpreter imports would change a shared environment while
other processes use it. The tests therefore build a *shadow* site folder: its ``vllm`` package
mirrors the installed one with symlinks, except that the folders leading to the patch targets are
real and the target files are real copies. With the shadow folder first on PYTHONPATH, a
subprocess imports the installed vLLM's code in every module but those copies, and
``prfaas vllm-cli install --vllm-dir SHADOW/vllm`` patches only the copies.

Run as a script, this file is the parse probe: it parses argument lists with vLLM's own serve
parsers and prints each parsed namespace (or the exit code and message) as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib.util
import io
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from prfaas_plugin.demo.ports import free_port  # noqa: F401 (re-exported to the tests)

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def installed_vllm_dir() -> Path | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def make_shadow_site(dest: Path, targets: list[str]) -> Path:
    """A site folder whose vllm mirrors the installed one, with real copies of `targets`.

    `targets` are paths inside site-packages, e.g. "vllm/entrypoints/cli/main.py". Returns the
    shadow's ``vllm`` folder. No __pycache__ is mirrored: run subprocesses with
    PYTHONDONTWRITEBYTECODE=1 so nothing is written next to the installed files.
    """
    package = installed_vllm_dir()
    if package is None:
        raise RuntimeError("vLLM is not importable")
    site = package.parent
    dest.mkdir(parents=True, exist_ok=True)
    real_dirs: set[str] = set()  # folders on the way to a target, relative to vllm/
    for target in targets:
        folder = Path(target).relative_to("vllm").parent
        while folder != Path("."):
            real_dirs.add(str(folder))
            folder = folder.parent
    copies = {str(Path(t).relative_to("vllm")) for t in targets}

    def mirror(rel: Path) -> None:
        (dest / "vllm" / rel).mkdir(parents=True, exist_ok=True)
        for entry in sorted((package / rel).iterdir()):
            name = rel / entry.name
            key = str(name)
            if entry.name == "__pycache__":
                continue
            if key in copies:
                shutil.copy2(entry, dest / "vllm" / name)
            elif key in real_dirs and entry.is_dir():
                mirror(name)
            else:
                (dest / "vllm" / name).symlink_to(entry)

    mirror(Path("."))
    # The distribution metadata, so `prfaas vllm-cli` sees the same name and version as installed.
    for info in site.glob("*.dist-info"):
        record = info / "RECORD"
        if record.is_file() and "vllm/__init__.py," in record.read_text(encoding="utf-8", errors="replace"):
            (dest / info.name).symlink_to(info)
    return dest / "vllm"


def build_tiny_qwen3(path: Path) -> Path:
    """A 2-layer Qwen3 with hidden size 128 and random weights, built offline in a few seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "Prefill as a service moves the KV cache between data centers.",
        "The decode cluster receives the cache and generates tokens.",
        "A short request is prefilled locally; a long one remotely.",
    ]
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(path)
    config = Qwen3Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    import torch

    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# The parse probe (runs inside a subprocess that imports vLLM).


def _plain(value: Any) -> Any:
    """A JSON-comparable form of a parsed value; vLLM's random default engine_id is blanked."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(fields.get("engine_id"), str) and _UUID_RE.match(fields["engine_id"]):
            fields["engine_id"] = "<random uuid4>"
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _parser(flavor: str) -> Any:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if flavor == "api_server":  # what `python -m vllm.entrypoints.openai.api_server` builds
        from vllm.entrypoints.launchers.cli_args import make_arg_parser

        return make_arg_parser(FlexibleArgumentParser(description="vLLM OpenAI-Compatible RESTful API server."))
    if flavor == "serve":  # what `vllm serve` builds: a `serve` subparser of the top parser
        from vllm.entrypoints.cli.serve import ServeSubcommand

        top = FlexibleArgumentParser(description="vLLM CLI")
        ServeSubcommand().subparser_init(top.add_subparsers(required=False, dest="subparser"))
        return top
    raise ValueError(flavor)


def probe(cases: list[dict[str, Any]]) -> dict[str, Any]:
    import vllm

    results: dict[str, Any] = {"vllm_file": vllm.__file__}
    for case in cases:
        parser = _parser(case["flavor"])
        out, err = io.StringIO(), io.StringIO()
        result: dict[str, Any]
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                namespace = parser.parse_args(case["argv"])
            result = {"namespace": {k: _plain(v) for k, v in sorted(vars(namespace).items())}}
        except SystemExit as exc:
            result = {"exit": exc.code}
        except Exception as exc:  # vLLM raises ValueError for some bad command lines
            result = {"raised": f"{type(exc).__name__}: {exc}"}
        result["stdout"] = out.getvalue()
        result["stderr"] = err.getvalue()
        results[case["name"]] = result
    return results


if __name__ == "__main__":
    cases_file, out_file = sys.argv[1], sys.argv[2]
    Path(out_file).write_text(json.dumps(probe(json.loads(Path(cases_file).read_text()))))
