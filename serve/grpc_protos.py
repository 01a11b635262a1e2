"""TorchServe's own gRPC protos (inference.proto, management.proto), compiled into Python stubs.

The protos are inside TorchServe's frontend jar, so the stubs always match the server that is
installed: `stubs()` compiles them once with grpcio-tools into a cache folder keyed by the jar's
digest; `python -m serve grpc-stubs DIR` writes them where another project can copy them from.
Both the client (serve/grpc_client.py) and the server (serve/grpc_server.py) use these modules.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

from serve.client import ServerError

PROTOS = ("inference.proto", "management.proto")
# The PredictionsRequest input entry clients fill and the server reads: TorchServe's convention (the
# server takes a lone entry under any other name too).
INPUT_KEY = "data"


def frontend_jar() -> Path:
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise ServerError(f"TorchServe's frontend jar is not at {jar}: is torchserve installed? (make install)")
    return jar


def write_stubs(directory: Path) -> Path:
    """Compile TorchServe's protos into `directory` (Python modules *_pb2.py and *_pb2_grpc.py)."""
    from grpc_tools import protoc

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as protos, zipfile.ZipFile(frontend_jar()) as jar:
        # google/rpc/status.proto is only read, not compiled: googleapis-common-protos has its module.
        for name in (*PROTOS, "google/rpc/status.proto"):
            (Path(protos) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(protos) / name).write_bytes(jar.read(name))
        include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
        status = protoc.main(["protoc", f"-I{protos}", f"-I{include}", f"--python_out={directory}",
                              f"--grpc_python_out={directory}", *PROTOS])
    if status != 0:
        raise ServerError(f"grpc_tools.protoc failed ({status}) on TorchServe's protos")
    return directory


def stubs() -> SimpleNamespace:
    """The generated modules: inference_pb2(_grpc), management_pb2(_grpc)."""
    jar = frontend_jar()
    digest = hashlib.sha256(jar.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-bundle" / f"grpc-{digest}"
    if not (cache / "management_pb2_grpc.py").is_file():
        # Written beside and renamed into place: two processes generating at once never see
        # half a folder.
        cache.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".grpc-"))
        write_stubs(staged)
        try:
            staged.rename(cache)
        except OSError:  # another process won the race: its folder is complete
            import shutil
            shutil.rmtree(staged, ignore_errors=True)
    if str(cache) not in sys.path:
        sys.path.insert(0, str(cache))  # the *_pb2_grpc modules import their *_pb2 by bare name
    return SimpleNamespace(**{name: importlib.import_module(name) for name in
                              ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")})
