"""The export half of each format (formats/ holds the runtime half): write the model file,
then hold it, loaded as the runtimes load it, to the eager model.

    torchscript  model.pt    torch.jit.script; what BaseHandler loads. Deprecated from torch 2.14.
    pt2          model.pt2   torch.export with a dynamic batch dimension, compiled ahead of time by
                             AOTInductor for one device (this CPU's instruction set, or a CUDA
                             GPU), loaded with torch._inductor.aoti_load_package: no compilation
                             when a worker starts.
    onnx         model.onnx  the file the edge runs, served with onnxruntime.

Each build_* function writes its file, runs the check images through it and compares them with
the eager model (compare: max |dp| <= 1e-5, same argmax), and returns what bundle.json records
under "formats": the file, its SHA-256 and size, the check's figure.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import yaml

from contract import TOLERANCE
from contract.bundle import file_entry
import formats
from formats import FORMATS, PT2_MAX_BATCH

ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "log_probs"  # recorded in bundle.json; runtimes ask the model


class ExportMismatch(RuntimeError):
    """An exported model does not reproduce the eager model's outputs."""


def compare(name: str, reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |dp| between two log-probability arrays; raises ExportMismatch beyond TOLERANCE."""
    p_ref, p_new = np.exp(reference.astype(np.float64)), np.exp(candidate.astype(np.float64))
    max_diff = float(np.abs(p_ref - p_new).max())
    argmax_differs = int((p_ref.argmax(1) != p_new.argmax(1)).sum())
    print(f"[export] {name}: max |dp| {max_diff:.3g} over {len(reference)} images, "
          f"argmax differs on {argmax_differs}")
    if max_diff > TOLERANCE or argmax_differs:
        raise ExportMismatch(f"{name} does not match the eager model: max |dp| {max_diff:.3g} "
                             f"(limit {TOLERANCE}), argmax differs on {argmax_differs} images")
    return max_diff


def build_format(fmt: str, model, x: torch.Tensor, reference: np.ndarray, directory: Path,
                 device: str = "cpu") -> dict:
    """Export `model` as `fmt` into `directory`, checked against `reference` (eager log-probs of x)."""
    return BUILDERS[fmt](model, x, reference, Path(directory), device)


def build_torchscript(model, x, reference, directory: Path, device: str) -> dict:
    import warnings

    path = directory / FORMATS["torchscript"].file
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.14 but is what TorchServe loads natively.
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(path))
    log_probs = formats.load("torchscript", path).log_probs(x.numpy())
    diff = compare("TorchScript", reference, log_probs)
    return {"file": path.name, **file_entry(path), "max_abs_dp": diff}


def build_onnx(model, x, reference, directory: Path, device: str) -> dict:
    import onnx

    path = directory / FORMATS["onnx"].file
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(model, (x[:2],), str(path), dynamo=True, external_data=False,
                      opset_version=ONNX_OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes={"x": {0: batch}}, verbose=False)
    if path.with_name(path.name + ".data").exists():
        raise RuntimeError(f"torch.onnx.export wrote {path.name}.data beside the model")
    onnx.checker.check_model(str(path), full_check=True)
    log_probs = formats.load("onnx", path).log_probs(x.numpy())
    diff = compare("ONNX (onnxruntime CPU)", reference, log_probs)
    return {"file": path.name, **file_entry(path), "max_abs_dp": diff, "opset": ONNX_OPSET}


def build_pt2(model, x, reference, directory: Path, device: str) -> dict:
    """torch.export + AOTInductor for `device` ('cpu' or 'cuda[:N]'): about 30 s of C++ (and on
    a GPU, kernel) compilation, paid once at export instead of at every worker start."""
    path = directory / FORMATS["pt2"].file
    device = torch.device(device)
    if device.type == "cuda":
        # Compile and check with TF32 off: the parity bound holds against the CPU's eager model.
        formats.configure_tf32(False)
        model = copy.deepcopy(model).to(device)
    batch = torch.export.Dim("batch", min=1, max=PT2_MAX_BATCH)
    # An example batch of 2: a batch of 1 would let torch.export specialize the dimension to 1.
    program = torch.export.export(model, (x[:2].to(device),), dynamic_shapes={"x": {0: batch}})
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    record = {"file": path.name, "device": str(device), "max_batch": PT2_MAX_BATCH}
    log_probs = formats.load("pt2", path, record, device).log_probs(x.numpy())
    diff = compare(f"pt2 (AOTInductor, {device})", reference, log_probs)
    return {**record, **file_entry(path), "max_abs_dp": diff, "torch_version": str(torch.__version__)}


def check_batch_size_fits(model_config: Path) -> None:
    """The pt2 model must cover every batch TorchServe may form from model-config.yaml."""
    batch_size = int((yaml.safe_load(Path(model_config).read_text()) or {}).get("batchSize", 1))
    if batch_size > PT2_MAX_BATCH:
        raise SystemExit(f"[export] {model_config}: batchSize {batch_size} exceeds the pt2 model's "
                         f"largest batch {PT2_MAX_BATCH}: lower batchSize or raise PT2_MAX_BATCH "
                         "in formats/__init__.py")


BUILDERS = {"torchscript": build_torchscript, "pt2": build_pt2, "onnx": build_onnx}
assert set(BUILDERS) == set(FORMATS), "each format in formats.FORMATS needs its builder here"

