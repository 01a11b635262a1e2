"""What more than one test module uses, in one place: running the stages as a user would, image
bytes, background clients, the figures printed at the end, and the builders and probes that
several modules share. Test modules import from here (and take fixtures from conftest.py), never
from each other. The odd and hostile request bodies are in hostile.py, as data.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from contract.bundle import load_bundle
from contract.paths import DATA_DIR, ROOT
from serve.process import free_ports, write_config

__all__ = ["DATA_DIR", "ROOT"]  # re-exported: the tests' one import for both

SUMMARY: list[str] = []  # measured figures, printed at the end of the run (conftest.py)


def run_module(*args: str, check: bool = True, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repository root, as a user would run it."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        pytest.fail(f"python -m {' '.join(args)} exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
    return result


def report(line: str) -> None:
    SUMMARY.append(line)
    print(line)


# ---------------------------------------------------------------- images

def encode_image(image, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
    """An image file's bytes from a PIL image or a numpy array, optionally converted to `mode`."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    (image.convert(mode) if mode else image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    return encode_image(array, "PNG")


# ---------------------------------------------------------------- processes and clients

class BackgroundClients:
    """`clients` threads each running `self.run(index)` from the start of a with-block until its
    end; subclasses send the requests and record the results."""

    def __init__(self, clients: int):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def without_torch(tmp_path) -> dict:
    """An environment in which `import torch` fails, as on a device without PyTorch."""
    blocker = tmp_path / "no_torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is not available on this device')\n")
    return {"PYTHONPATH": str(blocker)}


def worker_pids(server) -> list[int]:
    return sorted(w["pid"] for w in server.describe()["workers"])


# the tutorial's recipe: tests of the process group and the loop, not of the recipe
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


# ---------------------------------------------------------------- archives

SERVED_FORMATS = ("pt2", "onnx")


def tampered_copy(mar, target) -> None:
    """The archive with one byte of model.pt changed, bundle.json left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "model.pt":
                data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
            dst.writestr(item, data)


def build_format_archives(artifacts, base: Path, device: str, inductor_cache: Path) -> SimpleNamespace:
    """The `artifacts` checkpoint exported with --format pt2 (compiled for `device`: a slow C++
    compilation, once per session), and one archive per served format, each verified."""
    build = base / "build"
    run_module("export", "build", "--format", "pt2", "--device", device,
               "--checkpoint", str(artifacts.checkpoint_dir / "best.pt"),
               "--build-dir", str(build), "--data-dir", str(DATA_DIR),
               env={"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)})
    stores, verified = {}, {}
    for fmt in SERVED_FORMATS:
        stores[fmt] = base / f"model_store-{fmt}"
        run_module("export", "archive", "--format", fmt, "--build-dir", str(build),
                   "--model-store", str(stores[fmt]))
        verified[fmt] = run_module("export", "verify", str(stores[fmt] / "mnist.mar")).stdout
    return SimpleNamespace(build_dir=build, bundle=load_bundle(build), stores=stores, verified=verified,
                           inductor_cache=inductor_cache)


# ---------------------------------------------------------------- test tiers

# The real components a fixture brings up, as pytest markers (pyproject.toml registers them; `make
# test-fast` leaves every marked test out). pytest's fixture closure makes a test that uses
# `server` also use `torchserve` and `artifacts`, so each component is named once, at its root.
FIXTURE_MARKERS: dict[str, set[str]] = {
    "artifacts": {"slow"},  # trains two epochs on the whole training set
    "tiny": {"slow"},  # trains, exports and archives (test_security.py)
    "torchserve": {"torchserve"},
    "fault_server": {"torchserve"},
    "format_server": {"torchserve"},
    "gpu_format_server": {"torchserve"},
    "fleet": {"torchserve", "gateway"},  # two replicas behind nginx
    "browser": {"browser"},  # headless chromium
}


def missing_markers(fixturenames, markers) -> set[str]:
    """The markers that the fixtures a test uses imply and the test does not carry."""
    implied = set().union(*(FIXTURE_MARKERS.get(name, set()) for name in fixturenames))
    return implied - set(markers)


# ---------------------------------------------------------------- archives and `serve` commands

def rewrite(mar: Path, target: Path, replace: dict | None = None, add: dict | None = None,
            drop: tuple = ()) -> Path:
    """A copy of `mar` with members replaced, added or dropped; the signature is carried over as is."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename not in drop:
                dst.writestr(item.filename, replace.get(item.filename, src.read(item)))
        for name, data in add.items():
            dst.writestr(name, data)
    return target


def serve_config(path: Path) -> Path:
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    write_config(ROOT / "config.properties", path, {
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "grpc_inference_port": str(grpc_inference), "grpc_management_port": str(grpc_management),
        "initial_worker_port": str(20000 + inference % 20000)})
    return path


def serve(*args, workdir: Path, config: Path, check=True, env=None):
    return run_module("serve", *args, "--workdir", str(workdir), "--config", str(config), check=check,
                      timeout=300, env=env)


# Debian's chromium, driven by playwright (never `playwright install`), for the page's tests.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--headless"]
