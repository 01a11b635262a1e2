"""Shared fixtures: a model trained on a subset of Fashion-MNIST (real images), its exports and
archive, and a real TorchServe serving it from a private directory, stopped at the end; and the
check that every test carries the markers of the real components it needs."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from tests.helpers import DATA_DIR, SUMMARY, missing_markers, png_bytes, run_module

# One thread per process: TorchServe's worker, onnxruntime and this process share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """A test that uses a fixture starting TorchServe, nginx or chromium, or training a model,
    must say so with the marker (explicitly, in its module): otherwise `make test-fast` would run
    it. Collection fails, naming each such test and the marker it lacks."""
    problems = []
    for item in items:
        missing = missing_markers(getattr(item, "fixturenames", ()), {m.name for m in item.iter_markers()})
        if missing:
            problems.append(f"  {item.nodeid}: add {', '.join(f'@pytest.mark.{m}' for m in sorted(missing))}")
    if problems:
        raise pytest.UsageError("tests use fixtures whose components they are not marked for:\n"
                                + "\n".join(problems))


@pytest.fixture(autouse=True)
def _torchserve_only_where_marked(request, monkeypatch):
    """A test not marked `torchserve` that starts one anyway fails, saying so: the fast tier
    stays free of servers even where a test starts its own instead of taking a fixture's."""
    if request.node.get_closest_marker("torchserve") is None:
        from serve.process import TorchServeProcess

        def refuse(self, *args, **kwargs):
            pytest.fail(f"{request.node.nodeid} starts TorchServe: mark it @pytest.mark.torchserve")
        monkeypatch.setattr(TorchServeProcess, "start", refuse)


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


@pytest.fixture(scope="session", autouse=True)
def serving_state(tmp_path_factory):
    """The record of what `serve start` served (serve/trust.py) in a folder of the suite's own,
    never the user's ~/.local/state: tests serve old and new archives in any order."""
    from serve.trust import STATE_DIR_ENV
    saved = os.environ.get(STATE_DIR_ENV)
    folder = tmp_path_factory.mktemp("serving-state") / "state"
    os.environ[STATE_DIR_ENV] = str(folder)
    yield folder
    os.environ.pop(STATE_DIR_ENV, None) if saved is None else os.environ.__setitem__(STATE_DIR_ENV, saved)


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
    """TorchServe serving the archive with the shipped config.properties (other ports), the gRPC
    API in front of it as `make serve` runs it."""
    from serve.process import TorchServeProcess
    process = TorchServeProcess(artifacts.model_store, tmp_path_factory.mktemp("torchserve"), grpc=True)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def server(torchserve):
    return torchserve.server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, signing_keys):
    """A model trained one epoch on 2,000 real images, exported, archived and signed with the
    suite's key: the real commands, small enough to rebuild in the kill tests."""
    base = tmp_path_factory.mktemp("tiny")
    run_module("train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR), "--epochs", "1",
               "--train-limit", "2000", "--test-limit", "500", "--threads", "1",
               "--checkpoint-dir", str(base / "checkpoints"))
    run_module("export", "build", "--checkpoint", str(base / "checkpoints" / "best.pt"), "--build-dir",
               str(base / "build"), "--data-dir", str(DATA_DIR), "--check-images", "64")
    run_module("export", "archive", "--build-dir", str(base / "build"), "--model-store", str(base / "store"))
    return SimpleNamespace(checkpoint=base / "checkpoints" / "best.pt", build_dir=base / "build",
                           model_store=base / "store", mar=base / "store" / "mnist.mar")


@pytest.fixture
def refuse_model_loading(monkeypatch):
    """Fail the test if anything loads a model (runs code from the archive)."""
    import torch

    def forbidden(*args, **kwargs):
        raise AssertionError("a model from the archive was loaded before the archive was trusted")
    monkeypatch.setattr(torch.jit, "load", forbidden)
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "InferenceSession", forbidden)
