"""The runtimes, each fed the same PNG bytes, each returning float64 probabilities."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np
import torch

import formats
from contract import TOLERANCE
from contract.preprocessing import InputSpec, decode_image
from train.checkpoint import load_model


def preprocessed(pngs: list[bytes], bundle: dict) -> np.ndarray:
    spec = InputSpec.from_bundle(bundle)
    return np.concatenate([decode_image(png, spec) for png in pngs])


def eager(checkpoint, x: np.ndarray, device: str = "cpu") -> np.ndarray:
    model = load_model(checkpoint, device)
    with torch.inference_mode():
        return model(torch.from_numpy(x).to(device)).exp().double().cpu().numpy()


def probabilities(log_probs: np.ndarray) -> np.ndarray:
    return np.exp(log_probs.astype(np.float64))


def torchscript(path, x: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The plain TorchScript model (not frozen), as the export check runs it."""
    return probabilities(formats.load("torchscript", path, device=device).log_probs(x))


def pt2(path, record: dict, x: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The AOTInductor package (bundle.json's `record` of it), loaded as the handler loads it."""
    return probabilities(formats.load("pt2", path, record, device).log_probs(x))


def onnxruntime(path, x: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, list[str]]:
    model = formats.load("onnx", path, device=device)
    return probabilities(model.log_probs(x)), model.session.get_providers()


def served(server, pngs: list[bytes], concurrency: int = 1) -> tuple[np.ndarray, list[int]]:
    """Probabilities from TorchServe's REST API, and the batch size each request was served in."""
    import requests

    session = requests.Session()

    def one(png):
        response = server.predict(png, "image/png", session=session if concurrency == 1 else None)
        assert response.status_code == 200, response.text
        return json.loads(response.text)["probabilities"], int(response.headers["X-Batch-Size"])

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, pngs))
    return np.array([p for p, _ in results], dtype=np.float64), [b for _, b in results]


def agreement(results: dict[str, np.ndarray]) -> dict[str, float]:
    """max |dp| for every pair; fails on a bound or argmax violation, naming the pair."""
    maxima = {}
    for (name_a, a), (name_b, b) in combinations(results.items(), 2):
        pair = f"{name_a} vs {name_b}"
        maxima[pair] = float(np.abs(a - b).max())
        differing = np.flatnonzero(a.argmax(1) != b.argmax(1))
        assert differing.size == 0, f"{pair}: argmax differs on images {differing.tolist()[:10]}"
        assert maxima[pair] <= TOLERANCE, f"{pair}: max |dp| {maxima[pair]:.3g} > {TOLERANCE}"
    return maxima
