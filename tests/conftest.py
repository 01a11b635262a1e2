"""Shared fixtures: a model trained on a subset of Fashion-MNIST (real images), its exports and
archive, and a real TorchServe serving it from a private directory, stopped at the end."""
from __future__ import annotations

import io
import os
import subprocess
import threading
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
SUMMARY: list[str] = []  # measured figures, printed at the end of the run

# One thread per process: TorchServe's worker, onnxruntime and this process share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_module(*args: str, check: bool = True, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repository root, as a user would run it."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        pytest.fail(f"python -m {' '.join(args)} exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
    return result


def encode_image(image, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
    """An image file's bytes from a PIL image or a numpy array, optionally converted to `mode`."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    (image.convert(mode) if mode else image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    return encode_image(array, "PNG")


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


def report(line: str) -> None:
    SUMMARY.append(line)
    print(line)


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.section("measured")
        for line in SUMMARY:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def fashion_test_set():
    from train.data import DataUnavailable, ensure_dataset, load_split
    try:
        info = ensure_dataset("fashion-mnist", DATA_DIR, allow_download=False)
    except DataUnavailable as error:
        pytest.fail(f"the tests need real images: {error}")
    return load_split(info, DATA_DIR, train=False)


@pytest.fixture(scope="session")
def test_pngs(fashion_test_set):
    """256 real test images as PNG bytes, and their labels."""
    images = fashion_test_set.images[:256].numpy()
    return [png_bytes(img) for img in images], fashion_test_set.labels[:256].tolist()


@pytest.fixture(scope="session", autouse=True)
def signing_keys(tmp_path_factory):
    """A key pair of the suite's own, named by the environment for every command the tests run:
    archives are signed with it and verified against it (never the user's ~/.config keys)."""
    from export.signing import PRIVATE_KEY_ENV, PUBLIC_KEY_ENV, create_key_pair
    private, public = create_key_pair(tmp_path_factory.mktemp("signing-keys"))
    saved = {name: os.environ.get(name) for name in (PRIVATE_KEY_ENV, PUBLIC_KEY_ENV)}
    os.environ[PRIVATE_KEY_ENV], os.environ[PUBLIC_KEY_ENV] = str(private), str(public)
    yield SimpleNamespace(private=private, public=public)
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, fashion_test_set, signing_keys):
    """Train 2 epochs of the seed recipe (about 82% test accuracy), export, archive: the real
    commands, in a temp dir. Two threads: nothing else runs yet."""
    base = tmp_path_factory.mktemp("artifacts")
    # the tutorial's recipe, 2 epochs: a quick model (the default recipe trains 30 epochs)
    run_module("train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR), "--recipe", "seed",
               "--epochs", "2", "--threads", "2", "--checkpoint-dir", str(base / "checkpoints"))
    run_module("export", "build", "--checkpoint", str(base / "checkpoints" / "best.pt"),
               "--build-dir", str(base / "build"), "--data-dir", str(DATA_DIR))
    run_module("export", "archive", "--build-dir", str(base / "build"),
               "--model-store", str(base / "model_store"))
    from contract.bundle import load_bundle
    return SimpleNamespace(checkpoint_dir=base / "checkpoints", build_dir=base / "build",
                           model_store=base / "model_store", mar=base / "model_store" / "mnist.mar",
                           bundle=load_bundle(base / "build"))


@pytest.fixture(scope="session")
def torchserve(artifacts, tmp_path_factory):
    """TorchServe serving the archive with the shipped config.properties (other ports)."""
    from serve.process import TorchServeProcess
    process = TorchServeProcess(artifacts.model_store, tmp_path_factory.mktemp("torchserve"))
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def server(torchserve):
    return torchserve.server
