"""TorchServe's gRPC API, called with stubs generated from the protos TorchServe itself ships.

The protos (inference.proto, management.proto) are inside TorchServe's frontend jar, so the stubs
always match the server that is installed: `stubs()` compiles them once with grpcio-tools into a
cache folder keyed by the jar's digest, and `python -m serve grpc-stubs DIR` writes them where
another project can copy them from.

Calls carry the inference (or management) key as `authorization: Bearer KEY` metadata; the body
goes into the request's `input` map under `data`, as the same bytes REST takes (an image file,
base64 text, or JSON). What the frontend answers for our handler's errors is in docs/grpc.md.
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

from contract import MODEL_NAME
from serve.client import Server, ServerError

PROTOS = ("inference.proto", "management.proto")
INPUT_KEY = "data"  # the handler reads any single input; "data" is TorchServe's convention


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


class GrpcClient:
    """One channel to each of TorchServe's gRPC ports, with the keys from its key file."""

    def __init__(self, server: Server, timeout: float = 30):
        import grpc

        self.grpc, self.server, self.timeout, self.pb = grpc, server, timeout, stubs()
        self.inference_channel = grpc.insecure_channel(server.grpc_inference_target)
        self.management_channel = grpc.insecure_channel(server.grpc_management_target)
        self.inference = self.pb.inference_pb2_grpc.InferenceAPIsServiceStub(self.inference_channel)
        self.management = self.pb.management_pb2_grpc.ManagementAPIsServiceStub(self.management_channel)

    def metadata(self, kind: str = "inference") -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.server.key(kind)}")] if self.server.tokens else []

    def request(self, body: bytes, model: str = MODEL_NAME):
        return self.pb.inference_pb2.PredictionsRequest(model_name=model, input={INPUT_KEY: body})

    def ping(self) -> str:
        from google.protobuf import empty_pb2

        return self.inference.Ping(empty_pb2.Empty(), metadata=self.metadata(), timeout=self.timeout).health

    def predict(self, body: bytes, model: str = MODEL_NAME) -> bytes:
        """The prediction's bytes (the handler's JSON); a refused request raises grpc.RpcError."""
        return self.inference.Predictions(self.request(body, model), metadata=self.metadata(),
                                          timeout=self.timeout).prediction

    def stream_predict(self, body: bytes, model: str = MODEL_NAME) -> list[bytes]:
        """Every message of a StreamPredictions call (the handler answers in one message)."""
        call = self.inference.StreamPredictions(self.request(body, model), metadata=self.metadata(),
                                                timeout=self.timeout)
        return [reply.prediction for reply in call]

    def list_models(self, limit: int = 100) -> str:
        # The frontend reads an absent limit as 0 and lists nothing: always send one.
        request = self.pb.management_pb2.ListModelsRequest(limit=limit)
        return self.management.ListModels(request, metadata=self.metadata("management"),
                                          timeout=self.timeout).msg

    def close(self) -> None:
        self.inference_channel.close()
        self.management_channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
