"""A client of the project's gRPC API: TorchServe's own protos (serve/grpc_protos.py), answered
by serve/grpc_server.py in front of TorchServe's REST API.

Calls carry the inference (or management) key as `authorization: Bearer KEY` metadata; the body
goes into the request's `input` map under `data`, as the same bytes REST takes (an image file,
base64 text, or JSON). Errors come back as gRPC statuses with REST's message (docs/grpc.md).
"""
from __future__ import annotations

from contract import MODEL_NAME
from serve.client import Server
from serve.grpc_protos import INPUT_KEY, stubs


class GrpcClient:
    """One channel to each gRPC port (inference, management), with the keys from TorchServe's key file."""

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

    def list_models(self, limit: int = 0) -> str:
        request = self.pb.management_pb2.ListModelsRequest(limit=limit)  # 0: the REST default, 100
        return self.management.ListModels(request, metadata=self.metadata("management"),
                                          timeout=self.timeout).msg

    def close(self) -> None:
        self.inference_channel.close()
        self.management_channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
