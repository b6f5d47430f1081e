"""The checked-in generated protobuf module matches protos/prfaas/v1/transfer.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = tmp_path / "prfaas_plugin" / "transfer" / "_gen"
    gen.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Iprfaas_plugin/transfer/_gen={ROOT / 'protos/prfaas/v1'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "prfaas_plugin/transfer/_gen/transfer.proto",
        ],
        check=True,
        cwd=tmp_path,
    )
    for name in ("transfer_pb2.py", "transfer_pb2.pyi"):
        fresh = (gen / name).read_text()
        checked_in = (ROOT / "prfaas_plugin/transfer/_gen" / name).read_text()
        assert fresh == checked_in, (
            f"{name} is stale: run `make protos` (python -m grpc_tools.protoc "
            "-Iprfaas_plugin/transfer/_gen=protos/prfaas/v1 --python_out=. --pyi_out=. "
            "prfaas_plugin/transfer/_gen/transfer.proto)"
        )


def test_proto_declares_the_session_api():
    from prfaas_plugin.transfer._gen import transfer_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["Transfer"]
    assert {m.name for m in svc.methods} == {"Open", "Abort", "Status", "PushData"}
    assert pb.DESCRIPTOR.package == "prfaas.v1"
