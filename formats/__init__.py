"""The model formats, each described once: its file, how it is loaded and run, its self-test.

    torchscript  model.pt    torch.jit.load; on the CPU frozen and fused by oneDNN
                             (optimize=True); the one format with gradients to explain with
    pt2          model.pt2   AOTInductor's package for one device, loaded with
                             aoti_load_package; batches above its max_batch run in chunks
    onnx         model.onnx  an onnxruntime session on the asked device (contract.onnx_session)

    load(fmt, source, record, device)  -> LoadedModel: call it on a float32 tensor (on
                                          .input_device) for log-probabilities, or use
                                          .log_probs(numpy array)
    self_test_log_probs(fmt, record, model_bytes, x)  what `export verify` runs
    configure_tf32(allow), tf32(allow)  the TF32 policy: off unless asked for

The runtime half of the format registry: packed into the .mar beside contract/ and imported
by the TorchServe handler, so it imports contract/ and the runtimes only (never train/ or
export/). export/convert.py holds the export half (writing each file, and its check).
torch and onnxruntime are imported when a format needs them.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

from contract.bundle import BundleError


@dataclass(frozen=True)
class Format:
    name: str          # bundle.json's key under "formats", `--format` on the command line
    file: str          # the model file in build/ and in the archive
    explainable: bool  # has autograd: the handler's /explanations need it
    loader: Callable   # (source, record, device, threads, allow_tf32, optimize) -> LoadedModel


@dataclass
class LoadedModel:
    """A model of any format: float32 (N, C, H, W) -> log-probabilities."""
    format: str
    run: Callable          # torch tensor on input_device -> torch tensor of log-probabilities
    input_device: Any      # torch.device the batch must be on (the CPU for onnxruntime)
    module: Any = None     # the plain TorchScript module (before freezing), for gradients
    session: Any = None    # the onnxruntime session (its providers say where it runs)
    run_numpy: Callable | None = None  # a numpy path without torch tensors, where there is one

    def __call__(self, x):
        return self.run(x)

    def log_probs(self, x):
        """numpy float32 (N, C, H, W) -> numpy log-probabilities."""
        if self.run_numpy is not None:
            return self.run_numpy(x)
        import torch
        with torch.inference_mode():
            return self.run(torch.from_numpy(x).to(self.input_device)).cpu().numpy()


def configure_tf32(allow: bool) -> None:
    """TF32 on or off for both cuDNN convolutions and matmuls.

    PyTorch enables TF32 for cuDNN convolutions by default, and importing TorchServe's
    BaseHandler raises the matmul precision to "high" (TF32) on Ampere and newer: both would
    break the 1e-5 agreement with onnxruntime and the eager reference.
    """
    import torch
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.set_float32_matmul_precision("high" if allow else "highest")


@contextlib.contextmanager
def tf32(allow: bool):
    """configure_tf32(allow) for the block, then the previous policy back."""
    import torch
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    configure_tf32(allow)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _opened(source):
    """A path as a string, the model's bytes as a file object: what torch's loaders take."""
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)


def load_torchscript(source, record, device, threads, allow_tf32, optimize) -> LoadedModel:
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        module = torch.jit.load(_opened(source), map_location=device).eval()
    run = module
    if optimize and device.type == "cpu":
        # Frozen, with oneDNN's fused convolutions: faster per image on the CPU and within 1e-6
        # of the plain model (the parity tests hold it to 1e-5). Frozen, it has no autograd.
        run = torch.jit.optimize_for_inference(torch.jit.freeze(module))
    return LoadedModel("torchscript", run, device, module=module)


def load_pt2(source, record, device, threads, allow_tf32, optimize) -> LoadedModel:
    """The compiled model on `device`; refuses a package compiled for another kind of device."""
    import torch
    compiled_for = torch.device(record["device"])
    if compiled_for.type != device.type:
        raise BundleError(f"{FORMATS['pt2'].file} was compiled for {compiled_for.type} but this worker "
                          f"runs on {device}: rebuild the archive on the serving host with "
                          "`make archive FORMAT=pt2`")
    index = (device.index or 0) if device.type == "cuda" else -1
    # Loads the shared library AOTInductor built at export: nothing is compiled here.
    runner = torch._inductor.aoti_load_package(_opened(source), device_index=index)
    max_batch = int(record["max_batch"])

    def run(images):
        # Compiled for batches up to max_batch; TorchServe's batchSize stays below it.
        if len(images) <= max_batch:
            return runner(images)
        return torch.cat([runner(images[i:i + max_batch]) for i in range(0, len(images), max_batch)])

    return LoadedModel("pt2", run, device)


def load_onnx(source, record, device, threads, allow_tf32, optimize) -> LoadedModel:
    """An onnxruntime session on `device` that fails loudly when the CUDA provider did not load."""
    import torch

    from contract.onnx_session import input_name, open_session

    model = bytes(source) if isinstance(source, (bytes, bytearray)) else str(source)
    session = open_session(model, str(device), threads=threads, allow_tf32=allow_tf32)
    name = input_name(session)  # asked of the model once, not per batch

    def run_numpy(x):
        return session.run(None, {name: x})[0]

    # onnxruntime takes host arrays and copies to the GPU itself.
    return LoadedModel("onnx", lambda images: torch.from_numpy(run_numpy(images.cpu().numpy())),
                       torch.device("cpu"), session=session, run_numpy=run_numpy)


FORMATS = {f.name: f for f in (
    Format("torchscript", "model.pt", explainable=True, loader=load_torchscript),
    Format("pt2", "model.pt2", explainable=False, loader=load_pt2),
    Format("onnx", "model.onnx", explainable=False, loader=load_onnx),
)}
DEFAULT_FORMAT = "torchscript"
# The largest batch the pt2 model is compiled for: above model-config.yaml's batchSize (what
# TorchServe's dynamic batching forms), the edge's --batch-size (64) and the export check's
# 256 images. Larger batches are run in chunks of this size (bundle.json records it).
PT2_MAX_BATCH = 1024


def get(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise BundleError(f"unknown model format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def load(fmt: str, source: Path | str | bytes, record: dict | None = None, device="cpu", *,
         threads: int = 1, allow_tf32: bool = False, optimize: bool = False) -> LoadedModel:
    """The model in `source` (a path or the file's bytes), in format `fmt`, on `device`.

    record: bundle.json's "formats" entry for it (pt2 needs its device and max_batch).
    optimize: TorchScript on the CPU is frozen and fused, as the handler serves it.
    """
    import torch
    return get(fmt).loader(source, record or {}, torch.device(device), threads, allow_tf32, optimize)


def self_test_log_probs(fmt: str, record: dict, model_bytes: bytes, x):
    """Log-probabilities of the archived model file (its bytes) for x: what `export verify` runs,
    on the device a pt2 model was compiled for and on the CPU otherwise."""
    import torch
    device = torch.device(record["device"]) if fmt == "pt2" else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BundleError(f"{record['file']} was compiled for {device}: verify it on a host with "
                          "that GPU, or rebuild it here with `make archive FORMAT=pt2`")
    return load(fmt, model_bytes, record, device).log_probs(x)
