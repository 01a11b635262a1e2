"""BentoML serving build/model.onnx with onnxruntime and the project's own preprocessing: the
second peer of `make bench` (bench/peers.py starts it with `bentoml serve`).

    PEER_BUILD=build PEER_WORKERS=2 PEER_BATCH=16 bentoml serve bench.peer_bentoml:Classifier --port 8000

POST /predict with {"image": "<base64 PNG>"}; with PEER_BATCH > 1 the API is batchable, and
BentoML's batchable APIs take a list per request: {"image": ["<base64 PNG>"]}. Runs in the peers'
venv (bentoml, onnxruntime, numpy, Pillow; no torch), from the repository root so that
`contract` imports. Settings come from the environment because BentoML reads them at import.
"""
from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np

from contract import responses
from contract.bundle import load_bundle
from contract.onnx_session import input_name, open_session
from contract.preprocessing import InputSpec, InvalidInput, preprocess

BUILD = Path(os.environ.get("PEER_BUILD", "build")).resolve()
WORKERS = int(os.environ.get("PEER_WORKERS", "1"))
BATCH = int(os.environ.get("PEER_BATCH", "1"))


@bentoml.service(workers=WORKERS, threads=1, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self):
        bundle = load_bundle(BUILD / "bundle.json")
        self.spec = InputSpec.from_bundle(bundle)
        self.classes = bundle["classes"]
        self.session = open_session(str(BUILD / "model.onnx"), "cpu", threads=1)
        self.input = input_name(self.session)

    def classify(self, images: list[str]) -> list[dict]:
        try:
            x = np.concatenate([preprocess({"image": image}, self.spec) for image in images])
        except InvalidInput as error:
            raise bentoml.exceptions.InvalidArgument(str(error)) from None
        probabilities = np.exp(self.session.run(None, {self.input: x})[0])
        return [responses.prediction(p, self.classes) for p in probabilities]

    if BATCH > 1:
        # BentoML batches adaptively (no fixed delay); its default latency budget, 60 s, keeps it
        # from shedding load with 503s the way a tight max_latency_ms did here
        @bentoml.api(route="/predict", batchable=True, max_batch_size=BATCH)
        def predict(self, image: list[str]) -> list[dict]:
            return self.classify(image)
    else:
        @bentoml.api(route="/predict")
        def predict(self, image: str) -> dict:
            return self.classify([image])[0]
