"""The runtimes, each fed the same PNG bytes, each returning float64 probabilities."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np
import torch

from contract import TOLERANCE
from contract.onnx_session import open_session, run_log_probs
from contract.preprocessing import InputSpec, decode_image
from train.checkpoint import load_model


def preprocessed(pngs: list[bytes], bundle: dict) -> np.ndarray:
    spec = InputSpec.from_bundle(bundle)
    return np.concatenate([decode_image(png, spec) for png in pngs])


def eager(checkpoint, x: np.ndarray, device: str = "cpu") -> np.ndarray:
    model = load_model(checkpoint, device)
    with torch.inference_mode():
        return model(torch.from_numpy(x).to(device)).exp().double().cpu().numpy()


def torchscript(path, x: np.ndarray, device: str = "cpu") -> np.ndarray:
    model = torch.jit.load(str(path), map_location=device)
    with torch.inference_mode():
        return model(torch.from_numpy(x).to(device)).exp().double().cpu().numpy()


def pt2(path, x: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The AOTInductor package, loaded as the handler loads it (compiled for `device`)."""
    from export.formats import load_pt2
    model = load_pt2(str(path), torch.device(device))
    with torch.inference_mode():
        return model(torch.from_numpy(x).to(device)).exp().double().cpu().numpy()


def onnxruntime(path, x: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, list[str]]:
    session = open_session(str(path), device)
    log_probs = run_log_probs(session, x)
    return np.exp(log_probs.astype(np.float64)), session.get_providers()


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
