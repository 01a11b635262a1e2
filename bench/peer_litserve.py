"""LitServe serving build/model.onnx with onnxruntime and the project's own preprocessing: the
peer that `make bench` measures TorchServe against (bench/peers.py starts it).

    python -m bench.peer_litserve --build build --port 8000 --workers 2 --batch 16 --delay-ms 5

POST /predict with {"image": "<base64 PNG>"} (or any body the contract accepts as JSON) answers
the project's response JSON. Runs in the peers' venv (litserve, onnxruntime, numpy, Pillow; no
torch), from the repository root so that `contract` imports.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import litserve as ls
import numpy as np
from fastapi import HTTPException

from contract import responses
from contract.bundle import load_bundle
from contract.onnx_session import input_name, open_session
from contract.preprocessing import InputSpec, InvalidInput, preprocess


class OnnxClassifier(ls.LitAPI):
    def __init__(self, build: Path, **kwargs):
        super().__init__(**kwargs)
        self.build = build

    def setup(self, device):
        bundle = load_bundle(self.build / "bundle.json")
        self.spec = InputSpec.from_bundle(bundle)
        self.classes = bundle["classes"]
        self.session = open_session(str(self.build / "model.onnx"), "cpu", threads=1)
        self.input = input_name(self.session)

    def decode_request(self, request):
        try:
            return preprocess(request, self.spec)
        except InvalidInput as error:
            raise HTTPException(error.status, str(error)) from None

    def batch(self, inputs):
        return np.concatenate(inputs)  # each input is (1, C, H, W) already

    def predict(self, x):
        return np.exp(self.session.run(None, {self.input: x})[0])

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probabilities):
        return responses.prediction(probabilities.reshape(-1), self.classes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peer_litserve")
    p.add_argument("--build", type=Path, required=True, help="directory with model.onnx and bundle.json")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1, help="inference worker processes")
    p.add_argument("--batch", type=int, default=1, help="max batch size (1: batching off)")
    p.add_argument("--delay-ms", type=float, default=5.0, help="batch timeout")
    args = p.parse_args(argv)
    api = OnnxClassifier(args.build.resolve(), max_batch_size=args.batch,
                         batch_timeout=args.delay_ms / 1000 if args.batch > 1 else 0.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=30)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
