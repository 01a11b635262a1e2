"""The formats TorchServe serves the model in: how each is exported, checked and self-tested.

    torchscript  model.pt    torch.jit.script; what BaseHandler loads. Deprecated from torch 2.14.
    pt2          model.pt2   torch.export with a dynamic batch dimension, compiled ahead of time by
                             AOTInductor for one device (this CPU's instruction set, or a CUDA
                             GPU), loaded with torch._inductor.aoti_load_package: no compilation
                             when a worker starts.
    onnx         model.onnx  the file the edge runs, served with onnxruntime.

Each build_* function writes its file, runs the check images through it and compares them with
the eager model (export.main.compare: max |dp| <= 1e-5, same argmax), and returns what
bundle.json records under "formats": the file, its SHA-256 and size, the check's figure.
"""
from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import torch
import yaml

from contract.bundle import BundleError, file_entry

FILES = {"torchscript": "model.pt", "pt2": "model.pt2", "onnx": "model.onnx"}
DEFAULT_FORMAT = "torchscript"
# The largest batch the pt2 model is compiled for: above model-config.yaml's batchSize (what
# TorchServe's dynamic batching forms), the edge's --batch-size (64) and the export check's
# 256 images. Larger batches are run in chunks of this size.
PT2_MAX_BATCH = 1024


def build_format(fmt: str, model, x: torch.Tensor, reference: np.ndarray, directory: Path,
                 device: str = "cpu") -> dict:
    """Export `model` as `fmt` into `directory`, checked against `reference` (eager log-probs of x)."""
    build = {"torchscript": build_torchscript, "onnx": build_onnx, "pt2": build_pt2}[fmt]
    return build(model, x, reference, Path(directory), device)


def build_torchscript(model, x, reference, directory: Path, device: str) -> dict:
    from export.main import compare, export_torchscript

    path = directory / FILES["torchscript"]
    diff = compare("TorchScript", reference, export_torchscript(model, x, path))
    return {"file": path.name, **file_entry(path), "max_abs_dp": diff}


def build_onnx(model, x, reference, directory: Path, device: str) -> dict:
    from export.main import ONNX_OPSET, compare, export_onnx

    path = directory / FILES["onnx"]
    diff = compare("ONNX (onnxruntime CPU)", reference, export_onnx(model, x, path))
    return {"file": path.name, **file_entry(path), "max_abs_dp": diff, "opset": ONNX_OPSET}


def build_pt2(model, x, reference, directory: Path, device: str) -> dict:
    """torch.export + AOTInductor for `device` ('cpu' or 'cuda[:N]'): about 30 s of C++ (and on
    a GPU, kernel) compilation here, paid once at export instead of at every worker start."""
    from export.main import compare

    path = directory / FILES["pt2"]
    device = torch.device(device)
    if device.type == "cuda":
        # Compile and check with TF32 off: the parity bound holds against the CPU's eager model.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        model = copy.deepcopy(model).to(device)
    batch = torch.export.Dim("batch", min=1, max=PT2_MAX_BATCH)
    # An example batch of 2: a batch of 1 would let torch.export specialize the dimension to 1.
    program = torch.export.export(model, (x[:2].to(device),), dynamic_shapes={"x": {0: batch}})
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    runner = load_pt2(path, device)
    with torch.inference_mode():
        log_probs = run_in_chunks(runner, x.to(device), PT2_MAX_BATCH).cpu().numpy()
    diff = compare(f"pt2 (AOTInductor, {device})", reference, log_probs)
    return {"file": path.name, **file_entry(path), "max_abs_dp": diff, "device": str(device),
            "max_batch": PT2_MAX_BATCH, "torch_version": str(torch.__version__)}


def load_pt2(path, device: torch.device):
    """The compiled model in a .pt2 (a path or a file object), on the device it was compiled for."""
    index = (device.index or 0) if device.type == "cuda" else -1
    return torch._inductor.aoti_load_package(path, device_index=index)


def run_in_chunks(model, x: torch.Tensor, max_batch: int) -> torch.Tensor:
    if len(x) <= max_batch:
        return model(x)
    return torch.cat([model(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])


def check_batch_size_fits(model_config: Path) -> None:
    """The pt2 model must cover every batch TorchServe may form from model-config.yaml."""
    batch_size = int((yaml.safe_load(Path(model_config).read_text()) or {}).get("batchSize", 1))
    if batch_size > PT2_MAX_BATCH:
        raise SystemExit(f"[export] {model_config}: batchSize {batch_size} exceeds the pt2 model's "
                         f"largest batch {PT2_MAX_BATCH}: lower batchSize or raise PT2_MAX_BATCH "
                         "in export/formats.py")


def self_test_log_probs(fmt: str, record: dict, model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Log-probabilities of the archived model file (its bytes) for x: what `export verify` runs."""
    if fmt == "onnx":
        from contract.onnx_session import open_session, run_log_probs
        return run_log_probs(open_session(model_bytes, "cpu"), x)
    if fmt == "pt2":
        device = torch.device(record.get("device", "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BundleError(f"{record['file']} was compiled for {device}: verify it on a host with "
                              "that GPU, or rebuild it here with `make archive FORMAT=pt2`")
        model = load_pt2(io.BytesIO(model_bytes), device)
    elif fmt == "torchscript":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            model = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu")
        device = torch.device("cpu")
    else:
        raise BundleError(f"unknown model format {fmt!r}: expected one of {', '.join(FILES)}")
    with torch.inference_mode():
        return model(torch.from_numpy(x).to(device)).cpu().numpy()
