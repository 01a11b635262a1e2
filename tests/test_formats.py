"""The model served from TorchServe without TorchScript: a torch.export/AOTInductor .pt2 archive
and an ONNX archive, each held to the parity bound against eager PyTorch and onnxruntime on real
test images, sequential and batched, on the CPU (test_gpu.py does the same on CUDA)."""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from contract.bundle import sha256_file
from formats import PT2_MAX_BATCH
from serve.process import TorchServeProcess
from tests import runtimes
from tests.helpers import ROOT, SERVED_FORMATS, build_format_archives, report, run_module

# CPU workers even on a GPU host: this file is the CPU half (test_gpu.py has the GPU's).
CPU_ONLY = {"number_of_gpu": "0"}

@pytest.fixture(scope="module")
def format_archives(artifacts, tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    return build_format_archives(artifacts, base, "cpu", base / "inductor-cache")


@pytest.fixture(scope="module", params=SERVED_FORMATS)
def format_server(request, format_archives, tmp_path_factory):
    """A real TorchServe serving one format's archive on the CPU; its time to a READY worker.

    The worker shares the export's inductor cache, as `make archive FORMAT=pt2` and `make serve`
    on one host do: aoti_load_package's device check compiles small CPU-feature probes once per
    cache (test_pt2_worker_needs_no_compiler shows that the model itself is never compiled)."""
    fmt = request.param
    process = TorchServeProcess(format_archives.stores[fmt], tmp_path_factory.mktemp(f"torchserve-{fmt}"),
                                overrides=CPU_ONLY,
                                env={"TORCHINDUCTOR_CACHE_DIR": str(format_archives.inductor_cache)})
    started = time.perf_counter()
    process.start()
    ready_seconds = time.perf_counter() - started
    report(f"TorchServe serving the {fmt} archive: READY after {ready_seconds:.1f} s")
    yield SimpleNamespace(format=fmt, server=process.server, process=process)
    process.stop()


@pytest.mark.slow
def test_bundle_records_each_format_and_archives_verify(format_archives):
    bundle = format_archives.bundle
    model_config = (ROOT / "handlers" / "model-config.yaml").read_text()
    batch_size = int(next(line.split(":")[1] for line in model_config.splitlines() if line.startswith("batchSize")))
    for fmt, file in (("torchscript", "model.pt"), ("pt2", "model.pt2"), ("onnx", "model.onnx")):
        record = bundle["formats"][fmt]
        assert record["file"] == file
        assert record["sha256"] == sha256_file(format_archives.build_dir / file) == bundle["files"][file]["sha256"]
        assert record["max_abs_dp"] <= 1e-5
    assert bundle["formats"]["pt2"]["device"] == "cpu"
    assert bundle["formats"]["pt2"]["max_batch"] == PT2_MAX_BATCH >= max(batch_size, 64, bundle["export_check"]["images"])
    for fmt in SERVED_FORMATS:
        with zipfile.ZipFile(format_archives.stores[fmt] / "mnist.mar") as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            assert json.loads(mar.read("bundle.json")) == bundle
        assert manifest["model"]["serializedFile"] == bundle["formats"][fmt]["file"]
        assert f"({fmt})" in format_archives.verified[fmt] and ": OK:" in format_archives.verified[fmt]


@pytest.mark.slow
def test_archive_of_a_format_not_built_is_refused_with_the_command_to_run(artifacts, tmp_path):
    result = run_module("export", "archive", "--format", "pt2", "--build-dir", str(artifacts.build_dir),
                        "--model-store", str(tmp_path), check=False)
    assert result.returncode != 0
    assert "make export FORMAT=pt2" in result.stderr + result.stdout
    assert not (tmp_path / "mnist.mar").exists()


@pytest.mark.torchserve
@pytest.mark.slow
def test_served_format_agrees_with_eager_and_onnxruntime(artifacts, format_archives, format_server, test_pngs):
    pngs, _ = test_pngs
    x = runtimes.preprocessed(pngs, format_archives.bundle)
    served, batches = runtimes.served(format_server.server, pngs)
    onnx, providers = runtimes.onnxruntime(format_archives.build_dir / "model.onnx", x)
    assert providers[0] == "CPUExecutionProvider"
    results = {"eager": runtimes.eager(artifacts.checkpoint_dir / "best.pt", x), "onnxruntime": onnx,
               f"torchserve {format_server.format}": served}
    if format_server.format == "pt2":
        results["pt2 in-process"] = runtimes.pt2(format_archives.build_dir / "model.pt2",
                                                 format_archives.bundle["formats"]["pt2"], x)
    log = (format_server.process.workdir / "logs" / "model_log.log").read_text()
    assert f"({format_server.format}) on cpu" in log  # the handler's line: which format it loaded
    for pair, value in runtimes.agreement(results).items():
        report(f"CPU parity, {format_server.format} archive, {len(pngs)} images, sequential: {pair}: "
               f"max |dp| = {value:.3g}")


@pytest.mark.torchserve
@pytest.mark.slow
def test_served_format_agrees_with_eager_when_batched(artifacts, format_archives, format_server, test_pngs):
    pngs, _ = test_pngs
    x = runtimes.preprocessed(pngs, format_archives.bundle)
    served, batches = runtimes.served(format_server.server, pngs, concurrency=16)
    assert max(batches) > 1, "concurrent requests should have been batched by TorchServe"
    maxima = runtimes.agreement({"eager": runtimes.eager(artifacts.checkpoint_dir / "best.pt", x),
                                 f"torchserve {format_server.format} (batched)": served})
    report(f"CPU parity, {format_server.format} archive, {len(pngs)} images, 16 concurrent clients, "
           f"batch sizes {sorted(set(batches))}: max |dp| = {max(maxima.values()):.3g}")


@pytest.mark.torchserve
@pytest.mark.slow
def test_pt2_worker_needs_no_compiler(artifacts, format_archives, test_pngs, tmp_path):
    """With CXX naming no compiler (the only one inductor would use) and an empty inductor cache,
    and answers: the model is not compiled when a worker starts. The cache stays free of built
    libraries."""
    cache = tmp_path / "inductor-cache"
    process = TorchServeProcess(format_archives.stores["pt2"], tmp_path / "torchserve", overrides=CPU_ONLY,
                                env={"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    started = time.perf_counter()
    with process as server:
        ready_seconds = time.perf_counter() - started
        pngs, _ = test_pngs
        served, _ = runtimes.served(server, pngs[:32])
    x = runtimes.preprocessed(pngs[:32], format_archives.bundle)
    runtimes.agreement({"eager": runtimes.eager(artifacts.checkpoint_dir / "best.pt", x), "torchserve pt2": served})
    assert not list(cache.rglob("*.so")), f"the worker built libraries: {list(cache.rglob('*.so'))}"
    report(f"TorchServe serving the pt2 archive with no C++ compiler and an empty inductor cache: "
           f"READY after {ready_seconds:.1f} s")


def test_pt2_compiled_for_another_device_is_refused():
    import formats
    from contract.bundle import BundleError

    with pytest.raises(BundleError, match="compiled for cuda but this worker runs on cpu.*make archive FORMAT=pt2"):
        formats.load("pt2", Path("model.pt2"), {"device": "cuda:0", "max_batch": PT2_MAX_BATCH}, "cpu")


def test_pt2_export_refuses_a_batch_size_it_was_not_compiled_for(tmp_path):
    from export.convert import check_batch_size_fits

    config = tmp_path / "model-config.yaml"
    config.write_text(f"batchSize: {PT2_MAX_BATCH}\n")
    check_batch_size_fits(config)
    config.write_text(f"batchSize: {PT2_MAX_BATCH + 1}\n")
    with pytest.raises(SystemExit, match="lower batchSize"):
        check_batch_size_fits(config)
