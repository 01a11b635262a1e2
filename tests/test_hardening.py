"""Secure defaults, faults and tampered artifacts, each against a real TorchServe or process."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from serve.client import ServerError
from serve.process import TorchServeProcess
from tests.helpers import DATA_DIR, ROOT, BackgroundClients, report, run_module, tampered_copy
from train.checkpoint import load_checkpoint


def listening_sockets(group_leader: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of TorchServe's process group."""
    members = [p for p in psutil.process_iter() if _pgid(p.pid) == group_leader]
    return sorted({(c.laddr.ip, c.laddr.port) for p in members for c in p.net_connections("inet")
                   if c.status == psutil.CONN_LISTEN})


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.mark.torchserve
@pytest.mark.slow
def test_every_listener_is_on_loopback(torchserve, server):
    sockets = listening_sockets(torchserve.process.pid)
    assert len(sockets) >= 5, sockets  # inference, management, metrics, gRPC inference and management
    for address, port in sockets:
        ip = ipaddress.ip_address(address)
        ip = getattr(ip, "ipv4_mapped", None) or ip  # Java reports ::ffff:127.0.0.1
        assert ip == ipaddress.ip_address("127.0.0.1"), f"port {port} listens on {address}"


@pytest.mark.torchserve
@pytest.mark.slow
def test_model_registration_and_deletion_are_refused(server):
    auth = {"Authorization": f"Bearer {server.key('management')}"}
    for url in ("http://169.254.169.254/latest/model.mar", "file:///etc/passwd", "mnist.mar"):
        response = requests.post(f"{server.management_url}/models", params={"url": url}, headers=auth, timeout=10)
        assert response.status_code == 405, response.text
    response = requests.delete(f"{server.management_url}/models/mnist", headers=auth, timeout=10)
    assert response.status_code == 405
    assert server.describe()["workers"][0]["status"] == "READY"

@pytest.mark.torchserve
@pytest.mark.slow
def test_tampered_archive_is_refused_by_verify_and_by_the_handler(artifacts, tmp_path):
    bad = tmp_path / "store" / "mnist.mar"
    tampered_copy(artifacts.mar, bad)
    result = run_module("export", "verify", str(bad), check=False)
    assert result.returncode != 0 and "refusing" in result.stderr and "SHA-256" in result.stderr
    assert run_module("export", "verify", str(artifacts.mar)).returncode == 0

    process = TorchServeProcess(bad.parent, tmp_path / "ts")
    with pytest.raises(ServerError, match="no READY worker"):
        process.start(timeout=25)
    log = (tmp_path / "ts" / "logs" / "model_log.log").read_text()
    assert "refusing to serve model.pt" in log and "changed after export" in log


@pytest.fixture(scope="module")
def fault_server(artifacts, tmp_path_factory):
    """A TorchServe of its own with one worker (the shipped config starts one per core): these
    tests kill that worker, wait for its replacement, and load it for a minute."""
    process = TorchServeProcess(artifacts.model_store, tmp_path_factory.mktemp("faults"),
                                overrides={"default_workers_per_model": "1"})
    process.start()
    assert len(process.server.describe()["workers"]) == 1
    yield process.server
    process.stop()


class SteadyLoad(BackgroundClients):
    """`clients` threads sending the same image until stopped; records (time, ok) per request."""

    def __init__(self, server, body: bytes, clients: int):
        self.server, self.body = server, body
        self.results: list[tuple[float, bool]] = []
        super().__init__(clients)

    def run(self, index: int) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                ok = self.server.predict(self.body, "image/png", session=session, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            self.results.append((time.monotonic(), ok))


def wait_for_new_worker(server, old_pid: int, timeout: float) -> int:
    """The pid of a READY worker other than `old_pid` (the API shows the dead one for a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = server.describe()["workers"]
        ready = [w["pid"] for w in workers if w["status"] == "READY" and w["pid"] != old_pid]
        if ready:
            return ready[0]
        time.sleep(0.1)
    raise AssertionError(f"no new READY worker within {timeout} s: {workers}")


@pytest.mark.torchserve
@pytest.mark.slow
def test_worker_killed_under_load_recovers_within_10_seconds(fault_server, test_pngs):
    old_pid = fault_server.describe()["workers"][0]["pid"]
    with SteadyLoad(fault_server, test_pngs[0][0], clients=4) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        new_pid = wait_for_new_worker(fault_server, old_pid, timeout=30)
        time.sleep(5)
        tail_start = time.monotonic()
        time.sleep(5)
    failures = [t for t, ok in load.results if not ok and t >= killed_at]
    window = (max(failures) - killed_at) if failures else 0.0
    after = [ok for t, ok in load.results if t >= tail_start]
    report(f"worker kill -9 under load (4 clients): {len(failures)} failed requests, failure window "
           f"{window:.2f} s, worker {old_pid} -> {new_pid}, {len(after)} requests after recovery")
    assert new_pid != old_pid
    assert window <= 10
    assert after and all(after), "requests still fail after the worker came back"


@pytest.mark.torchserve
@pytest.mark.slow
def test_one_minute_at_concurrency_32_loses_nothing_and_leaks_nothing(fault_server, test_pngs):
    pid = fault_server.describe()["workers"][0]["pid"]
    worker = psutil.Process(pid)
    with SteadyLoad(fault_server, test_pngs[0][1], clients=32) as load:
        time.sleep(10)  # warm-up
        rss_warm = worker.memory_info().rss
        started, count_warm = time.monotonic(), len(load.results)
        time.sleep(60)
        rss_end = worker.memory_info().rss
        count_end = len(load.results)
    failed = sum(not ok for _, ok in load.results)
    rate = (count_end - count_warm) / (time.monotonic() - started)
    report(f"60 s at concurrency 32, one worker (Python client, 2 cores shared): {count_end - count_warm} "
           f"requests ({rate:.0f}/s), {failed} failed; worker RSS {rss_warm / 2**20:.1f} -> "
           f"{rss_end / 2**20:.1f} MiB")
    assert failed == 0
    assert fault_server.describe()["workers"][0]["pid"] == pid
    assert abs(rss_end - rss_warm) <= 0.10 * rss_warm


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_the_last_complete_checkpoint(tmp_path):
    args = [sys.executable, "-m", "train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR),
            "--checkpoint-dir", str(tmp_path), "--train-limit", "6000", "--test-limit", "500",
            "--threads", "1", "--epochs", "4"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 2, possibly mid-write
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    state = load_checkpoint(tmp_path / "last.pt")  # complete, whatever moment the kill hit
    assert 1 <= state["epoch"] < 4
    result = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {tmp_path / 'last.pt'} after epoch {state['epoch']}" in result.stdout
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
