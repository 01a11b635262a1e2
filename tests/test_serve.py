"""A real TorchServe: formats, the response, tokens, bad requests that never hurt the worker."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
from urllib3 import encode_multipart_formdata

from tests import hostile
from tests.helpers import encode_image, png_bytes, report, worker_pids

@pytest.mark.torchserve
@pytest.mark.slow
def test_response_format(server, test_pngs, artifacts):
    response = server.predict(test_pngs[0][0], "image/png")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"label", "class", "probabilities", "framing"}
    assert body["framing"] == {"mode": "auto", "applied": False, "reason": "already in the data set's form"}
    assert body["class"] == artifacts.bundle["classes"][body["label"]]
    p = body["probabilities"]
    assert len(p) == 10 and abs(sum(p) - 1) < 1e-5 and int(np.argmax(p)) == body["label"]
    assert all(float(np.float32(v)) == v for v in p), "probabilities must keep full float32 precision"


@pytest.mark.torchserve
@pytest.mark.slow
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


@pytest.mark.torchserve
@pytest.mark.slow
def test_sixteen_bit_and_large_images(server, fashion_test_set):
    image = fashion_test_set.images[0].numpy()
    sixteen = encode_image(image.astype(np.uint16) * 257, "PNG")
    large = encode_image(np.kron(image, np.ones((12, 12), np.uint8)), "PNG")
    for body in (sixteen, large):
        response = server.predict(body, "image/png")
        assert response.status_code == 200, response.text


@pytest.mark.torchserve
@pytest.mark.slow
def test_json_bodies_match_the_image_bytes(server, test_pngs, fashion_test_set):
    png = test_pngs[0][0]
    reference = server.predict(png, "image/png").json()
    bodies = [json.dumps({"image": base64.b64encode(png).decode()}),
              json.dumps({"pixels": fashion_test_set.images[0].tolist()})]
    for body in bodies:
        response = server.predict(body.encode(), "application/json")
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["probabilities"], reference["probabilities"], atol=1e-6)


@pytest.mark.torchserve
@pytest.mark.slow
def test_tokens_are_required(server, test_pngs):
    url = f"{server.inference_url}/predictions/mnist"
    headers = {"Content-Type": "image/png"}
    for auth in ({}, {"Authorization": "Bearer wrong-token"},
                 {"Authorization": f"Bearer {server.key('management')}"}):
        response = requests.post(url, data=test_pngs[0][0], headers={**headers, **auth}, timeout=10)
        assert response.status_code == 400 and "Token Authorization failed" in response.text
    response = requests.get(f"{server.management_url}/models/mnist", timeout=10)
    assert response.status_code == 400 and "Token Authorization failed" in response.text


@pytest.mark.torchserve
@pytest.mark.slow
def test_an_expired_inference_key_is_renewed_by_the_client(server, test_pngs):
    old = server.key("inference")
    new = server.renew_key("inference")
    assert new != old
    stale = requests.post(f"{server.inference_url}/predictions/mnist", data=test_pngs[0][0],
                          headers={"Content-Type": "image/png", "Authorization": f"Bearer {old}"})
    assert stale.status_code == 400
    assert server.predict(test_pngs[0][0], "image/png").status_code == 200




def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript's, Go's) do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def worker_cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@pytest.mark.torchserve
@pytest.mark.slow
def test_bad_requests_get_4xx_and_never_hurt_the_worker_or_their_batch(server, test_pngs):
    """Every class of odd and hostile input, concurrently and mixed with good requests."""
    pids = worker_pids(server)
    good = test_pngs[0][:48]
    expected_good = [server.predict(png, "image/png").json()["label"] for png in good]
    cases = [hostile.Case(*case) for case in hostile.bad_requests()] + hostile.bad_cases() + hostile.good_cases()
    jobs = [("case", case) for case in cases] + [("good", (i, png)) for i, png in enumerate(good)]
    np.random.default_rng(0).shuffle(jobs)

    def send(job):
        kind, payload = job
        if kind == "case":
            return kind, payload, server.predict(payload.body, payload.content_type)
        return kind, payload, server.predict(payload[1], "image/png")

    rss_before = {pid: hostile.reset_peak_memory(pid) for pid in pids}
    with ThreadPoolExecutor(12) as pool:  # concurrent, so bad and good share batches
        results = list(pool.map(send, jobs))
    peak = max(hostile.peak_memory(pid) - rss_before[pid] for pid in pids)
    shared = 0
    for kind, payload, response in results:
        if kind == "good":
            assert response.status_code == 200, response.text
            assert response.json()["label"] == expected_good[payload[0]]
            shared += int(response.headers["X-Batch-Size"]) > 1
            continue
        case = payload
        assert response.status_code == case.status, f"{case.name}: {response.status_code} {response.text}"
        if case.status == 200:
            assert set(strict_json(response.text)) == {"label", "class", "probabilities", "framing"}, case.name
        elif case.words is not None:
            error = strict_json(response.text)
            assert error == {"error": error["error"], "status": case.status}, f"{case.name}: {error}"
            assert case.words in error["error"], f"{case.name}: {error}"
    report(f"{len(cases)} odd and hostile requests mixed with {len(good)} good ones (12 clients): "
           f"worker peak RSS +{peak / 2**20:.1f} MiB over {max(rss_before.values()) / 2**20:.0f} MiB "
           f"({len(pids)} workers), pids unchanged")
    assert shared > 0, "no good request shared a batch: the test did not exercise batching"
    assert worker_pids(server) == pids, "a bad request restarted a worker"
    assert peak <= MEMORY_BOUND, f"the worker grew by {peak / 2**20:.1f} MiB"
    assert server.predict(good[0], "image/png").status_code == 200


MEMORY_BOUND = 100 * 10**6  # extra worker memory one request may cost (bytes)
CPU_BOUND = 1.0  # worker CPU seconds one request may cost


@pytest.mark.torchserve
@pytest.mark.slow
def test_each_hostile_request_costs_the_worker_little(server):
    """One at a time, so that the worker's peak RSS and CPU time belong to that request alone."""
    pids = worker_pids(server)
    costs = []
    for case in hostile.bad_cases() + hostile.good_cases():
        before = {pid: (hostile.reset_peak_memory(pid), worker_cpu_seconds(pid)) for pid in pids}
        response = server.predict(case.body, case.content_type)
        # whichever worker answered: the largest growth, and the CPU all of them spent
        peak = max(hostile.peak_memory(pid) - before[pid][0] for pid in pids)
        cpu = sum(worker_cpu_seconds(pid) - before[pid][1] for pid in pids)
        assert response.status_code == case.status, f"{case.name}: {response.status_code} {response.text}"
        costs.append((peak, cpu, case.name))
    worst_memory, worst_cpu = max(costs), max(costs, key=lambda c: c[1])
    report(f"worker cost per hostile request ({len(costs)} kinds, one at a time): peak RSS at most "
           f"+{worst_memory[0] / 2**20:.1f} MiB ({worst_memory[2]}), CPU at most {worst_cpu[1]:.2f} s "
           f"({worst_cpu[2]})")
    for peak, cpu, name in costs:
        assert peak <= MEMORY_BOUND, f"{name}: the worker grew by {peak / 2**20:.1f} MiB"
        assert cpu <= CPU_BOUND, f"{name}: {cpu:.2f} s of worker CPU"
    assert worker_pids(server) == pids


def post(server, body: bytes, headers: dict, params=None) -> requests.Response:
    """A POST with exactly these headers (names as given) and the inference key."""
    headers = {**headers, "Authorization": f"Bearer {server.key('inference')}"}
    return requests.post(f"{server.inference_url}/predictions/mnist", data=body, headers=headers,
                         params=params, timeout=30)


@pytest.mark.torchserve
@pytest.mark.slow
def test_lenient_where_users_are(server, test_pngs):
    png, other = test_pngs[0][0], test_pngs[0][1]
    reference = server.predict(png, "image/png").json()
    garbage = "not an image"
    # a multipart upload with a text field and the file under an unusual name, header names in
    # odd case: the file field is used
    body, content_type = encode_multipart_formdata({"note": "my digit", "upload": ("d.png", png, "image/png")})
    answers = [post(server, body, {"cOnTeNt-TyPe": content_type})]
    # query parameters named like the body's keys never replace the body
    answers.append(post(server, png, {"content-type": "image/png"}, {"body": garbage, "data": garbage, "file": garbage}))
    body, content_type = encode_multipart_formdata({"data": garbage, "file": ("d.png", png, "image/png")})
    answers.append(post(server, body, {"CONTENT-TYPE": content_type}, {"image": garbage}))
    for response in answers:
        assert response.status_code == 200, response.text
        assert strict_json(response.text)["probabilities"] == reference["probabilities"]
    # the multipart rule picks the file, not the first field
    body, content_type = encode_multipart_formdata({"file": ("a.png", other, "image/png"), "note": "x"})
    assert post(server, body, {"Content-Type": content_type}).json()["label"] == \
        server.predict(other, "image/png").json()["label"]
    body, content_type = encode_multipart_formdata({"note": "no file here"})
    response = post(server, body, {"Content-Type": content_type})
    assert response.status_code == 400 and "multipart upload with a file field" in response.json()["error"]


def curl_form_post(server, path) -> tuple[int, str]:
    """`curl -d @file`, the commonest curl mistake, exactly as a user types it."""
    result = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {server.key('inference')}",
                             "-d", f"@{path}", f"{server.inference_url}/predictions/mnist"],
                            capture_output=True, text=True, timeout=30, check=True)
    text, _, status = result.stdout.rpartition("\n")
    return int(status), text


def netty_refuses_form(data: bytes) -> bool:
    """Whether Netty's form decoder meets a bad %-escape: in every name=value pair it decodes,
    that is everything but a last '&'-separated part without '=' (seen on TorchServe 0.12.0)."""
    bad_escape = re.compile(rb"%(?![0-9A-Fa-f]{2})")
    head, _, tail = data.rpartition(b"&")
    return bool(bad_escape.search(head)) or (b"=" in tail and bool(bad_escape.search(tail)))


@pytest.mark.torchserve
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_form_post_of_a_binary_file(server, test_pngs, tmp_path):
    """TorchServe's frontend parses a form post before the handler sees it (Netty's
    HttpPostRequestDecoder): a bad %-escape makes it answer 500 ErrorDataDecoderException
    itself; any other file reaches the handler, which answers 400 with what to send instead."""
    as_curl_sends = [p.replace(b"\r", b"").replace(b"\n", b"") for p in test_pngs[0]]  # curl -d drops them
    refused = next(i for i, p in enumerate(as_curl_sends) if netty_refuses_form(p))
    passed = next(i for i, p in enumerate(as_curl_sends) if b"%" not in p)
    (tmp_path / "refused.png").write_bytes(test_pngs[0][refused])
    (tmp_path / "passed.png").write_bytes(test_pngs[0][passed])
    pids = worker_pids(server)

    status, text = curl_form_post(server, tmp_path / "passed.png")
    assert status == 400, text
    error = strict_json(text)["error"]
    assert "--data-binary" in error and "curl -T" in error

    status, text = curl_form_post(server, tmp_path / "refused.png")
    assert status == 500 and strict_json(text)["type"] == "ErrorDataDecoderException", text
    share = sum(map(netty_refuses_form, as_curl_sends)) / len(as_curl_sends)
    report(f"curl -d @file of the test set's 28x28 PNGs: {100 * share:.0f}% answered 500 by "
           "TorchServe's frontend (a bad %-escape), the rest 400 by the handler")
    assert worker_pids(server) == pids


def test_request_body_rules():
    """How the handler picks the payload out of what TorchServe hands over (no server needed)."""
    from contract.preprocessing import InvalidInput
    from handlers.mnist_handler import request_body
    multipart = "multipart/form-data; boundary=x"
    assert request_body(b"raw") == b"raw"
    assert request_body({"body": b"png", "data": b"query"}, "image/png", {"body": "image/png", "data": ""}) == b"png"
    assert request_body({"note": b"n", "upload": b"png"}, multipart, {"note": "", "upload": "image/png"}) == b"png"
    assert request_body({"upload": b"a", "file": b"b"}, multipart, {"upload": "image/png", "file": "image/png"}) == b"b"
    assert request_body({"image": b"base64"}, multipart, {"image": ""}) == b"base64"  # a text field named image
    assert request_body({"any_name": b"grpc"}) == b"grpc"
    for row, content_type, words in [({"a": b"b"}, "Application/X-WWW-Form-URLEncoded; charset=utf-8", "--data-binary"),
                                     ({"note": b"n"}, multipart, "file field"),
                                     ({"x": b"1", "y": b"2"}, "", "no body")]:
        with pytest.raises(InvalidInput, match=words):
            request_body(row, content_type, {})


@pytest.mark.torchserve
@pytest.mark.slow
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
