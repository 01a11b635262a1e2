"""Unchanged protocol clients against the OIP server: tritonclient (http JSON, http binary, grpc)
and kserve's InferenceRESTClient / InferenceGRPCClient. Used by tests/test_oip.py and bench/oip.py.

    python -m oip.clients CLIENT --url HOST:PORT --input fp32|uint8|bytes --images A.png ... \
        [--concurrency 16] [--batch 1] [--repeat 1] --out answers.json

writes {"health": {...}, "probabilities": [[...], ...] (one row per image, in order),
"seconds": wall time of the infers, "requests": how many}. One client family per process:
kserve's and tritonclient's gRPC stubs both register the package `inference` in protobuf's pool.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

MODEL = "mnist"
CLIENTS = ("triton-http-json", "triton-http-binary", "triton-grpc", "kserve-rest", "kserve-grpc")


def tensor_of(kind: str, images: list[bytes], bundle: dict | None = None) -> tuple[str, str, np.ndarray]:
    """(input name, datatype, array) for a batch of PNG files sent as `kind`."""
    if kind == "bytes":
        return "image", "BYTES", np.array(images, dtype=np.object_)
    if kind == "uint8":
        pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.uint8) for png in images]
        return "pixels", "UINT8", np.stack(pixels)[:, np.newaxis]
    from contract.preprocessing import InputSpec, decode_image  # what "normalized" means: the contract's
    spec = InputSpec.from_bundle(bundle)
    return "input", "FP32", np.concatenate([decode_image(png, spec) for png in images])


class Triton:
    """tritonclient's http (JSON or binary tensors) or grpc client, one per thread."""

    def __init__(self, client: str, url: str):
        self.client, self.url, self.local = client, url, threading.local()
        self.binary = client != "triton-http-json"
        if client == "triton-grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self.module = module

    def connection(self):
        if not hasattr(self.local, "client"):
            self.local.client = self.module.InferenceServerClient(url=self.url)
        return self.local.client

    def health(self) -> dict:
        c = self.connection()
        metadata = c.get_model_metadata(MODEL)
        if not isinstance(metadata, dict):  # grpc answers a protobuf message
            from google.protobuf.json_format import MessageToDict
            metadata = MessageToDict(metadata)
        return {"live": c.is_server_live(), "ready": c.is_server_ready(),
                "model_ready": c.is_model_ready(MODEL), "metadata": metadata}

    def infer(self, name: str, datatype: str, array: np.ndarray) -> np.ndarray:
        if datatype == "BYTES" and self.client != "triton-grpc":
            # REST carries BYTES elements as text (kserve 0.21 turns binary BYTES into UTF-8
            # strings too): the image files go as base64, which the server decodes like REST
            array = np.array([base64.b64encode(b).decode() for b in array], dtype=np.object_)
        tensor = self.module.InferInput(name, list(array.shape), datatype)
        if self.client == "triton-grpc":
            tensor.set_data_from_numpy(array)
            outputs = [self.module.InferRequestedOutput("probabilities")]
        else:
            tensor.set_data_from_numpy(array, binary_data=self.binary)
            outputs = [self.module.InferRequestedOutput("probabilities", binary_data=self.binary)]
        result = self.connection().infer(MODEL, [tensor], outputs=outputs)
        return result.as_numpy("probabilities")


class KServe:
    """kserve's async InferenceRESTClient (v2) or InferenceGRPCClient, on one event loop."""

    def __init__(self, client: str, url: str):
        from kserve import InferenceGRPCClient, InferenceRESTClient, RESTConfig
        self.client, self.url = client, url
        self.loop = asyncio.new_event_loop()
        if client == "kserve-rest":
            self.base = f"http://{url}"
            self.rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        else:  # its channel belongs to the event loop it is made on
            async def connect():
                return InferenceGRPCClient(url)
            self.grpc = self.loop.run_until_complete(connect())

    def health(self) -> dict:
        async def ask():
            if self.client == "kserve-rest":
                return {"live": await self.rest.is_server_live(self.base),
                        "ready": await self.rest.is_server_ready(self.base),
                        "model_ready": await self.rest.is_model_ready(self.base, MODEL)}
            return {"live": await self.grpc.is_server_live(), "ready": await self.grpc.is_server_ready(),
                    "model_ready": await self.grpc.is_model_ready(MODEL)}
        return self.loop.run_until_complete(ask())

    async def infer_async(self, name, datatype, array) -> np.ndarray:
        from kserve import InferInput, InferRequest
        tensor = InferInput(name=name, shape=list(array.shape), datatype=datatype)
        if self.client == "kserve-rest" and datatype == "BYTES":  # JSON carries text: base64 of the files
            array = np.array([base64.b64encode(b).decode() for b in array], dtype=np.object_)
        tensor.set_data_from_numpy(array, binary_data=self.client == "kserve-grpc")
        request = InferRequest(model_name=MODEL, infer_inputs=[tensor])
        if self.client == "kserve-rest":
            response = await self.rest.infer(self.base, request, model_name=MODEL)
        else:
            response = await self.grpc.infer(request)
        output = next(o for o in response.outputs if o.name == "probabilities")
        return output.as_numpy()


def run(client: str, url: str, kind: str, images: list[bytes], concurrency: int, batch: int,
        repeat: int = 1, bundle: dict | None = None) -> dict:
    """Health, then every image `repeat` times in batches of `batch`, `concurrency` at a time."""
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]
    tensors = [tensor_of(kind, b, bundle) for b in batches]
    driver = Triton(client, url) if client.startswith("triton") else KServe(client, url)
    health = driver.health()
    started = time.perf_counter()
    if isinstance(driver, Triton):
        with ThreadPoolExecutor(concurrency) as pool:
            for _ in range(repeat):
                answers = list(pool.map(lambda t: driver.infer(*t), tensors))
    else:
        async def all_of_them():
            gate = asyncio.Semaphore(concurrency)

            async def one(t):
                async with gate:
                    return await driver.infer_async(*t)
            for _ in range(repeat):
                answers = await asyncio.gather(*(one(t) for t in tensors))
            return answers
        answers = driver.loop.run_until_complete(all_of_them())
    seconds = time.perf_counter() - started
    return {"client": client, "input": kind, "health": health, "seconds": seconds,
            "requests": repeat * len(tensors), "images": repeat * len(images),
            "probabilities": np.concatenate(answers).astype(np.float64).tolist()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m oip.clients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("client", choices=CLIENTS)
    p.add_argument("--url", required=True, help="HOST:PORT of the REST or the gRPC endpoint")
    p.add_argument("--input", choices=("fp32", "uint8", "bytes"), default="bytes")
    p.add_argument("--images", type=Path, nargs="+", required=True)
    p.add_argument("--bundle", type=Path, help="bundle.json (fp32: its mean and std)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    bundle = json.loads(args.bundle.read_text()) if args.bundle else None
    result = run(args.client, args.url, args.input, [path.read_bytes() for path in args.images],
                 args.concurrency, args.batch, args.repeat, bundle)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
