"""A real TorchServe: formats, the response, tokens, bad requests that never hurt the worker."""
from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.conftest import encode_image, png_bytes




def worker_pids(server) -> list[int]:
    return sorted(w["pid"] for w in server.describe()["workers"])


def test_response_format(server, test_pngs, artifacts):
    response = server.predict(test_pngs[0][0], "image/png")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"label", "class", "probabilities"}
    assert body["class"] == artifacts.bundle["classes"][body["label"]]
    p = body["probabilities"]
    assert len(p) == 10 and abs(sum(p) - 1) < 1e-5 and int(np.argmax(p)) == body["label"]
    assert all(float(np.float32(v)) == v for v in p), "probabilities must keep full float32 precision"


@pytest.mark.parametrize("fmt, mode, kw", [
    ("PNG", None, {}), ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}),
    ("JPEG", None, {"quality": 95}), ("BMP", None, {}), ("GIF", None, {}),
    ("WEBP", None, {"lossless": True}), ("TIFF", None, {}),
])
def test_image_formats_and_modes(server, fashion_test_set, fmt, mode, kw):
    image = fashion_test_set.images[0].numpy()
    reference = server.predict(png_bytes(image), "image/png").json()
    response = server.predict(encode_image(image, fmt, mode, **kw), "application/octet-stream")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["label"] == reference["label"]
    if fmt != "JPEG":  # lossless: the very same pixels, the very same answer
        np.testing.assert_allclose(answer["probabilities"], reference["probabilities"], atol=1e-6)


def test_sixteen_bit_and_large_images(server, fashion_test_set):
    image = fashion_test_set.images[0].numpy()
    sixteen = encode_image(image.astype(np.uint16) * 257, "PNG")
    large = encode_image(np.kron(image, np.ones((12, 12), np.uint8)), "PNG")
    for body in (sixteen, large):
        response = server.predict(body, "image/png")
        assert response.status_code == 200, response.text


def test_json_bodies_match_the_image_bytes(server, test_pngs, fashion_test_set):
    png = test_pngs[0][0]
    reference = server.predict(png, "image/png").json()
    bodies = [json.dumps({"image": base64.b64encode(png).decode()}),
              json.dumps({"pixels": fashion_test_set.images[0].tolist()})]
    for body in bodies:
        response = server.predict(body.encode(), "application/json")
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["probabilities"], reference["probabilities"], atol=1e-6)


def test_tokens_are_required(server, test_pngs):
    url = f"{server.inference_url}/predictions/mnist"
    headers = {"Content-Type": "image/png"}
    for auth in ({}, {"Authorization": "Bearer wrong-token"},
                 {"Authorization": f"Bearer {server.key('management')}"}):
        response = requests.post(url, data=test_pngs[0][0], headers={**headers, **auth}, timeout=10)
        assert response.status_code == 400 and "Token Authorization failed" in response.text
    response = requests.get(f"{server.management_url}/models/mnist", timeout=10)
    assert response.status_code == 400 and "Token Authorization failed" in response.text


def test_an_expired_inference_key_is_renewed_by_the_client(server, test_pngs):
    old = server.key("inference")
    new = server.renew_key("inference")
    assert new != old
    stale = requests.post(f"{server.inference_url}/predictions/mnist", data=test_pngs[0][0],
                          headers={"Content-Type": "image/png", "Authorization": f"Bearer {old}"})
    assert stale.status_code == 400
    assert server.predict(test_pngs[0][0], "image/png").status_code == 200


def bad_requests() -> list[tuple[str, bytes, str, int, str]]:
    """(name, body, content type, expected status, words in the error)."""
    rng = np.random.default_rng(7)
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 9:19] = 200
    png = encode_image(digit, "PNG")
    bomb = encode_image(np.zeros((20000, 20000), np.uint8), "PNG")
    pixels = digit.tolist()
    return [
        ("empty body", b"", "application/octet-stream", 400, "empty"),
        ("truncated PNG", png[: len(png) // 2], "image/png", 400, "truncated"),
        ("random bytes", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "application/octet-stream", 400, "not an image"),
        ("decompression bomb", bomb, "image/png", 413, "decompression bomb"),
        ("too many pixels", encode_image(np.zeros((5000, 5000), np.uint8), "PNG"), "image/png", 413, "exceeds the limit"),
        # refused by TorchServe's frontend (max_request_size) before the handler: no JSON body
        ("over 1 MiB", rng.integers(0, 256, 1_100_000, dtype=np.uint8).tobytes(), "application/octet-stream", 413, None),
        ("malformed JSON", b'{"pixels": [[1, 2', "application/json", 400, "malformed JSON"),
        ("JSON array", b"[1, 2, 3]", "application/json", 400, "JSON object"),
        ("NaN pixels", json.dumps({"pixels": [[float("nan")] * 28] * 28}).encode(), "application/json", 400, "NaN"),
        ("pixels out of range", json.dumps({"pixels": [[256] * 28] * 28}).encode(), "application/json", 400, "0..255"),
        ("negative pixels", json.dumps({"pixels": [[-3] * 28] * 28}).encode(), "application/json", 400, "0..255"),
        ("wrong shape", json.dumps({"pixels": pixels[:20]}).encode(), "application/json", 400, "28 rows of 28"),
        ("flat pixels", json.dumps({"pixels": sum(pixels, [])}).encode(), "application/json", 400, "flat list"),
        ("string pixels", json.dumps({"pixels": [["1"] * 28] * 28}).encode(), "application/json", 400, "no strings"),
        ("bad base64", b'{"image": "%%%"}', "application/json", 400, "base64"),
        ("base64 of garbage", json.dumps({"image": base64.b64encode(b"garbage").decode()}).encode(), "application/json", 400, "not an image"),
        ("unknown keys", b'{"img": "x"}', "application/json", 400, "exactly one"),
        ("plain text", b"hello", "text/plain", 400, "not JSON"),
        ("form post", b"a=b", "application/x-www-form-urlencoded", 400, "Content-Type"),
    ]


def test_bad_requests_get_4xx_and_never_hurt_the_worker_or_their_batch(server, test_pngs):
    pids = worker_pids(server)
    good = test_pngs[0][:48]
    expected_good = [server.predict(png, "image/png").json()["label"] for png in good]
    cases = bad_requests()
    jobs = [("bad", case) for case in cases] + [("good", (i, png)) for i, png in enumerate(good)]
    np.random.default_rng(0).shuffle(jobs)

    def send(job):
        kind, payload = job
        if kind == "bad":
            name, body, content_type, status, words = payload
            return kind, payload, server.predict(body, content_type)
        return kind, payload, server.predict(payload[1], "image/png")

    with ThreadPoolExecutor(12) as pool:  # concurrent, so bad and good share batches
        results = list(pool.map(send, jobs))
    shared = 0
    for kind, payload, response in results:
        if kind == "good":
            assert response.status_code == 200, response.text
            assert response.json()["label"] == expected_good[payload[0]]
            shared += int(response.headers["X-Batch-Size"]) > 1
            continue
        name, body, content_type, status, words = payload
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        if words is None:
            continue
        error = response.json()
        assert "error" in error or "message" in error, f"{name}: {error}"
        assert words in json.dumps(error), f"{name}: {error}"
    assert shared > 0, "no good request shared a batch: the test did not exercise batching"
    assert worker_pids(server) == pids, "a bad request restarted a worker"
    assert server.predict(good[0], "image/png").status_code == 200


def test_shipped_configuration_starts_one_worker_per_core_or_gpu(server):
    """handlers/model-config.yaml and config.properties leave the worker count to TorchServe,
    which starts one per GPU, or one per usable core without GPUs (each with one torch thread)."""
    import os

    import torch
    gpus = torch.cuda.device_count()
    expected = gpus or len(os.sched_getaffinity(0))
    workers = server.describe()["workers"]
    assert len(workers) == expected, f"{len(workers)} workers for {expected} {'GPUs' if gpus else 'cores'}: {workers}"
    assert all(w["status"] == "READY" for w in workers), workers
    assert all(w["gpu"] == bool(gpus) for w in workers), workers
