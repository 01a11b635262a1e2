"""Distributed training with torchrun (gloo, CPU): equivalence, two nodes on loopback, elastic restart.
Every test bounds its time and ends its process group, also when it fails."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import psutil
import pytest

from serve.process import free_ports
from tests.conftest import DATA_DIR, ROOT, report, run_module
from train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
# the tutorial's recipe: these tests are about the process group, not the recipe
TRAIN = ["-m", "train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR), "--recipe", "seed",
         "--threads", "1"]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@contextmanager
def launched(command: list[str], log):
    """A process group of its own, killed whole when the block ends."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        yield process
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def test_two_processes_of_32_equal_one_process_of_64(tmp_path):
    limit = ["--epochs", "1", "--train-limit", "1280", "--test-limit", "500", "--batch-size", "64"]  # 20 steps
    run_module(*TRAIN[1:], *limit, "--checkpoint-dir", str(tmp_path / "single"))
    with open(tmp_path / "log", "w") as log, launched(
            torchrun("--standalone", "--nproc_per_node=2", *TRAIN, *limit,
                     "--checkpoint-dir", str(tmp_path / "ddp")), log) as process:
        assert process.wait(timeout=180) == 0, (tmp_path / "log").read_text()
    single = load_checkpoint(tmp_path / "single" / "last.pt")
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["world_size"] == 2 and list(ddp["model_state"]) == list(single["model_state"])
    worst = max(float((single["model_state"][k] - ddp["model_state"][k]).abs().max()) for k in single["model_state"])
    report(f"DDP equivalence after 20 steps (2 x 32 vs 1 x 64, gloo): max |d param| = {worst:.3g}")
    assert worst <= 1e-6


def test_two_nodes_on_loopback_train_together(tmp_path):
    port = free_ports(1)[0]
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=loopback-test"]
    args = [*TRAIN, "--epochs", "1", "--train-limit", "3000", "--test-limit", "500",
            "--checkpoint-dir", str(tmp_path / "ck")]
    with open(tmp_path / "node0", "w") as log0, open(tmp_path / "node1", "w") as log1, \
            launched(torchrun(*common, "--node_rank=0", *args), log0) as node0, \
            launched(torchrun(*common, "--node_rank=1", *args), log1) as node1:
        assert node0.wait(timeout=180) == 0, (tmp_path / "node0").read_text()[-3000:]
        assert node1.wait(timeout=60) == 0, (tmp_path / "node1").read_text()[-3000:]
    state = load_checkpoint(tmp_path / "ck" / "last.pt")
    assert state["world_size"] == 2 and state["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.pt")) == ["best.pt", "last.pt"]


def workers_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in children if "train" in " ".join(p.cmdline())]


def test_killed_worker_restarts_the_group_which_resumes(tmp_path):
    checkpoints = tmp_path / "ck"
    args = torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1", *TRAIN, "--epochs", "3",
                    "--train-limit", "20000", "--test-limit", "1000", "--checkpoint-dir", str(checkpoints))
    with open(tmp_path / "log", "w") as log, launched(args, log) as launcher:
        deadline = time.monotonic() + 180
        while not (checkpoints / "last.pt").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, (tmp_path / "log").read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # into epoch 2
        victims = workers_of(launcher)
        assert len(victims) == 2, [p.cmdline() for p in victims]
        victims[-1].kill()
        assert launcher.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    output = (tmp_path / "log").read_text()
    state = load_checkpoint(checkpoints / "last.pt")
    assert "resumed from" in output, output[-3000:]
    assert state["epoch"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert not list(checkpoints.glob(".*.tmp"))
