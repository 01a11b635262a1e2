"""Production: Prometheus metrics, truthful probes, the Kubernetes manifests, the gateway's single
token for N replicas, and a model update under load that loses no request. Real TorchServes,
a real nginx, real images."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from serve.process import TorchServeProcess
from tests.conftest import ROOT, encode_image, report
from tests.test_hardening import tampered_copy


# ---------------------------------------------------------------- metrics

def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of <metrics_url>/metrics, parsed by prometheus_client: (name, labels) -> value.

    The parser names a counter's samples <name>_total, whether TorchServe wrote the suffix or not.
    """
    response = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("Hostname", "hostname")))
            samples[(sample.name, labels)] = sample.value
    return samples


def total(samples, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= set(lab))


def test_metrics_count_good_and_bad_requests_by_status(server, test_pngs):
    pngs, _ = test_pngs
    too_many_pixels = encode_image(np.zeros((5000, 5000), np.uint8), "PNG")  # handler's 413
    over_one_mib = b"\0" * 1_100_000  # the frontend's own 413, before the handler
    before = scrape(server)
    statuses = [server.predict(png, "image/png").status_code for png in pngs[:5]]
    statuses += [server.predict(b"not an image", "application/octet-stream").status_code for _ in range(2)]
    statuses += [server.predict(too_many_pixels, "image/png").status_code,
                 server.predict(over_one_mib, "application/octet-stream").status_code]
    assert statuses == [200] * 5 + [400, 400, 413, 413]

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    # The worker's metrics reach the frontend through its log, a moment after the responses.
    deadline = time.monotonic() + 15
    while True:
        after = scrape(server)
        if delta("mnist_decode_milliseconds_count") >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # The handler's metrics (metrics.yaml, model_metrics): 8 requests reached it one at a time.
    assert delta("mnist_requests_total", Status="200") == 5
    assert delta("mnist_requests_total", Status="400") == 2
    assert delta("mnist_requests_total", Status="413") == 1
    assert delta("mnist_batch_size_count") == 8 and delta("mnist_batch_size_sum") == 8
    assert delta("mnist_decode_milliseconds_count") == 8 and delta("mnist_decode_milliseconds_sum") > 0
    assert delta("mnist_model_milliseconds_count") == 5  # batches with a valid image only
    # TorchServe's own: requests that reached the model, their latency, answers by status class.
    assert delta("ts_inference_requests_total", model_name="mnist") == 8
    assert delta("ts_inference_latency_microseconds_total", model_name="mnist") > 0
    # 2 x 400 and the handler's 413; the frontend's 413 for a body over max_request_size is
    # refused before TorchServe counts anything (seen here), so only a proxy in front sees those.
    assert delta("Requests4XX_total") == 3
    assert delta("Requests2XX_total") >= 5
    report(f"metrics: handler model time per batch (batch 1) "
           f"{delta('mnist_model_milliseconds_sum') / 5:.2f} ms, decode per request "
           f"{delta('mnist_decode_milliseconds_sum') / 8:.2f} ms (mean of 5 and 8 sequential requests)")


# ---------------------------------------------------------------- probes

def probe(kind: str, process: TorchServeProcess) -> tuple[int, str]:
    """`python -m serve.probe kind`, as the Deployment's exec probes run it."""
    result = subprocess.run([sys.executable, "-m", "serve.probe", kind,
                             "--config", str(process.workdir / "config.properties")],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout + result.stderr


def test_probes_say_ready_and_live_for_a_serving_model(torchserve):
    assert probe("ready", torchserve) == (0, "ready: yes (mnist workers: READY)\n")
    code, said = probe("live", torchserve)
    assert code == 0 and "frontend answers (/ping: HTTP 200)" in said


def test_tampered_model_is_live_but_never_ready_and_a_stopped_server_is_neither(artifacts, tmp_path):
    bad = tmp_path / "store" / "mnist.mar"
    tampered_copy(artifacts.mar, bad)
    process = TorchServeProcess(bad.parent, tmp_path / "ts")
    process.start(wait=False)
    try:
        deadline = time.monotonic() + 60
        while probe("live", process)[0] != 0:
            assert time.monotonic() < deadline, "the frontend never answered"
            time.sleep(0.5)
        # The worker fails to load, TorchServe restarts it, again and again: never ready.
        answers = []
        for _ in range(8):
            answers.append(probe("ready", process))
            time.sleep(1)
        assert all(code == 1 for code, _ in answers), answers
        assert probe("live", process)[0] == 0
        ping = requests.get(f"{process.server.inference_url}/ping", timeout=5,
                            headers=process.server.auth("inference"))
        report(f"probes: tampered model: ready 'no' 8 of 8 times over ~{8 + 8 * 0.6:.0f} s, live 'yes'; "
               f"TorchServe's /ping meanwhile: HTTP {ping.status_code} {ping.json().get('status')}")
        log = (tmp_path / "ts" / "logs" / "model_log.log").read_text()
        assert "refusing to serve model.pt" in log
    finally:
        process.stop()
    assert probe("live", process)[0] == 1 and probe("ready", process)[0] == 1
