"""The GPU path: eager PyTorch on CUDA, TorchServe with its worker on the GPU, onnxruntime's CUDA
provider, all with TF32 off, agree within 1e-5; and what TF32 would cost. `make test-gpu`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import formats
from tests import runtimes
from tests.helpers import DATA_DIR, build_format_archives, png_bytes, report, run_module


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return ("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu from "
                "requirements-gpu.txt instead of onnxruntime)")
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(cuda_skip_reason() is not None,
                                                  reason=str(cuda_skip_reason()))]
GPU_IMAGES = 512


@pytest.fixture(scope="module")
def gpu_pngs(fashion_test_set):
    images = fashion_test_set.images[:GPU_IMAGES].numpy()
    return [png_bytes(img) for img in images]


@pytest.fixture(autouse=True)
def tf32_off():
    """TF32 off in this process (PyTorch's cuDNN default is on); restored afterwards."""
    with formats.tf32(False):
        yield


@pytest.mark.torchserve
@pytest.mark.slow
def test_gpu_runtimes_agree(artifacts, server, gpu_pngs):
    description = server.describe()
    assert [w["gpu"] for w in description["workers"]] == [True], \
        f"the TorchServe worker is not on a GPU: {description['workers']}"
    x = runtimes.preprocessed(gpu_pngs, artifacts.bundle)
    onnx, providers = runtimes.onnxruntime(artifacts.build_dir / "model.onnx", x, "cuda:0")
    assert providers[0] == "CUDAExecutionProvider", providers
    served, batches = runtimes.served(server, gpu_pngs)
    results = {
        "eager cuda": runtimes.eager(artifacts.checkpoint_dir / "best.pt", x, "cuda:0"),
        "torchscript cuda": runtimes.torchscript(artifacts.build_dir / "model.pt", x, "cuda:0"),
        "torchserve gpu": served,
        "onnxruntime cuda": onnx,
    }
    device = torch.cuda.get_device_name(0)
    for pair, value in runtimes.agreement(results).items():
        report(f"GPU parity ({device}), {len(gpu_pngs)} images, sequential: {pair}: max |dp| = {value:.3g}")

    served_batched, batches = runtimes.served(server, gpu_pngs, concurrency=32)
    assert max(batches) > 1, "concurrent requests should have been batched by TorchServe"
    maxima = runtimes.agreement({"eager cuda": results["eager cuda"],
                                 "onnxruntime cuda": onnx, "torchserve gpu (batched)": served_batched})
    report(f"GPU parity ({device}), 32 concurrent clients, batch sizes {sorted(set(batches))}: "
           + "; ".join(f"{pair}: {value:.3g}" for pair, value in maxima.items()))


@pytest.mark.slow
def test_tf32_effect_is_reported(artifacts, gpu_pngs):
    """Not an equality check: measures how far TF32 moves the log-probabilities from float64."""
    from train.checkpoint import load_model

    x = torch.from_numpy(runtimes.preprocessed(gpu_pngs, artifacts.bundle))
    model = load_model(artifacts.checkpoint_dir / "best.pt")
    with torch.inference_mode():
        reference = model.double()(x.double()).numpy()
        model = model.float().cuda()
        figures = {}
        for tf32 in (False, True):
            with formats.tf32(tf32):
                out = model(x.cuda()).double().cpu().numpy()
            figures[f"PyTorch CUDA, TF32 {'on' if tf32 else 'off'}"] = np.abs(out - reference).max()
    for tf32 in (False, True):
        onnx = formats.load("onnx", artifacts.build_dir / "model.onnx", device="cuda:0", allow_tf32=tf32)
        out = onnx.log_probs(x.numpy()).astype(np.float64)
        figures[f"onnxruntime CUDA, use_tf32={int(tf32)}"] = np.abs(out - reference).max()
    for name, value in figures.items():
        report(f"TF32 effect ({torch.cuda.get_device_name(0)}), max |d log p| vs float64 CPU: {name}: {value:.3g}")
    assert figures["PyTorch CUDA, TF32 off"] < 1e-5 and figures["onnxruntime CUDA, use_tf32=0"] < 1e-5


def test_training_fast_path_on_cuda(tmp_path):
    """The tensor fast path keeps the data on the GPU; report the epoch time."""
    result = run_module("train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR),
                        "--device", "cuda", "--epochs", "2", "--checkpoint-dir", str(tmp_path))
    lines = [line for line in result.stdout.splitlines() if line.startswith("[train] epoch")]
    assert len(lines) == 2 and "device cuda" in result.stdout
    report(f"CUDA training ({torch.cuda.get_device_name(0)}): " + " | ".join(lines))


# The pt2 and ONNX archives on the GPU (issue 14): the pt2 model compiled by AOTInductor for
# cuda:0 here, the ONNX model run by onnxruntime's CUDA provider (TF32 off), each served by a
# TorchServe whose worker is on the GPU.

@pytest.fixture(scope="module")
def gpu_format_archives(artifacts, tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu-formats")
    return build_format_archives(artifacts, base, "cuda:0", base / "inductor-cache")


@pytest.fixture(scope="module", params=("pt2", "onnx"))
def gpu_format_server(request, gpu_format_archives, tmp_path_factory):
    from serve.process import TorchServeProcess
    fmt = request.param
    process = TorchServeProcess(gpu_format_archives.stores[fmt], tmp_path_factory.mktemp(f"torchserve-gpu-{fmt}"),
                                env={"TORCHINDUCTOR_CACHE_DIR": str(gpu_format_archives.inductor_cache)})
    process.start()
    yield fmt, process
    process.stop()


@pytest.mark.torchserve
@pytest.mark.slow
def test_gpu_served_formats_agree(artifacts, gpu_format_archives, gpu_format_server, gpu_pngs):
    fmt, process = gpu_format_server
    server = process.server
    assert gpu_format_archives.bundle["formats"]["pt2"]["device"] == "cuda:0"
    workers = server.describe()["workers"]
    assert [w["gpu"] for w in workers] == [True], f"the TorchServe worker is not on a GPU: {workers}"
    log = (process.workdir / "logs" / "model_log.log").read_text()
    assert f"({fmt}) on cuda" in log, "the handler did not log loading this format on the GPU"
    x = runtimes.preprocessed(gpu_pngs, gpu_format_archives.bundle)
    onnx, providers = runtimes.onnxruntime(gpu_format_archives.build_dir / "model.onnx", x, "cuda:0")
    assert providers[0] == "CUDAExecutionProvider", providers
    eager = runtimes.eager(artifacts.checkpoint_dir / "best.pt", x, "cuda:0")
    served, _ = runtimes.served(server, gpu_pngs)
    results = {"eager cuda": eager, "onnxruntime cuda": onnx, f"torchserve gpu {fmt}": served}
    if fmt == "pt2":
        results["pt2 cuda in-process"] = runtimes.pt2(gpu_format_archives.build_dir / "model.pt2",
                                                      gpu_format_archives.bundle["formats"]["pt2"], x, "cuda:0")
    device = torch.cuda.get_device_name(0)
    for pair, value in runtimes.agreement(results).items():
        report(f"GPU parity ({device}), {fmt} archive, {len(gpu_pngs)} images, sequential: {pair}: max |dp| = {value:.3g}")

    served_batched, batches = runtimes.served(server, gpu_pngs, concurrency=32)
    assert max(batches) > 1, "concurrent requests should have been batched by TorchServe"
    maxima = runtimes.agreement({"eager cuda": eager, f"torchserve gpu {fmt} (batched)": served_batched})
    report(f"GPU parity ({device}), {fmt} archive, 32 concurrent clients, batch sizes {sorted(set(batches))}: "
           f"max |dp| = {max(maxima.values()):.3g}")
