"""Model versions on KServe's ModelServer, which has none in kserve 0.21: the model's metadata
lists no versions, and the versioned REST routes (/v2/models/NAME/versions/V[/ready|/infer])
answer 501 "Model versioning not supported yet".

The served model has one version, release.json's model_version (the one TorchServe reports for
the same archive). `install({name: version})`, before ModelServer is built, makes both protocols
say so:
- the model's metadata (REST and gRPC) lists `versions: [V]`;
- REST: /v2/models/NAME/versions/V/... is the unversioned route; another version is a 404 with the
  protocol's error JSON, saying which version is served;
- gRPC: ModelMetadata, ModelReady and ModelInfer with another version are NOT_FOUND (kserve
  0.21 ignores the field and would answer for the served model).
"""
from __future__ import annotations

import json
import re

import grpc

VERSIONED = re.compile(r"^(/v2/models/[^/]+)/versions/([^/]+)(/ready|/infer)?$")


def not_served(name: str, asked: str, served: str) -> str:
    return f"model {name} has no version {asked}: this server serves version {served}"


class VersionedPaths:
    """ASGI middleware: a versioned REST route for the served version becomes the unversioned
    one; any other version is answered 404 here."""

    def __init__(self, app, versions: dict[str, str]):
        self.app, self.versions = app, versions

    async def __call__(self, scope, receive, send):
        match = VERSIONED.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match:
            name = match.group(1).rsplit("/", 1)[1]
            asked, served = match.group(2), self.versions.get(name)
            if served is not None and asked != served:
                body = json.dumps({"error": not_served(name, asked, served)}).encode()
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            # An unknown model keeps kserve's own 404; the served version takes the plain route.
            path = match.group(1) + (match.group(3) or "")
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


def install(versions: dict[str, str]) -> None:
    """Make the ModelServer built after this call report and check `versions` (name -> version)."""
    import kserve.model_server
    import kserve.protocol.grpc.server as grpc_server
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc.servicer import InferenceServicer

    class VersionedDataPlane(DataPlane):
        async def model_metadata(self, model_name: str) -> dict:
            metadata = await super().model_metadata(model_name)
            served = versions.get(model_name)
            return {**metadata, "versions": [served]} if served else metadata

    class VersionedServicer(InferenceServicer):
        async def check(self, name: str, asked: str, context) -> None:
            served = versions.get(name)
            if asked and served is not None and asked != served:
                await context.abort(grpc.StatusCode.NOT_FOUND, not_served(name, asked, served))

        async def ModelMetadata(self, request, context):
            await self.check(request.name, request.version, context)
            response = await super().ModelMetadata(request, context)
            if versions.get(request.name):
                response.versions.append(versions[request.name])
            return response

        async def ModelReady(self, request, context):
            await self.check(request.name, request.version, context)
            return await super().ModelReady(request, context)

        async def ModelInfer(self, request, context):
            await self.check(request.model_name, request.model_version, context)
            return await super().ModelInfer(request, context)

    kserve.model_server.DataPlane = VersionedDataPlane
    grpc_server.InferenceServicer = VersionedServicer
    kserve.model_server.app.add_middleware(VersionedPaths, versions=versions)
