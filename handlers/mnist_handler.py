"""TorchServe handler for the ConvNet: image bytes or JSON in, label and probabilities out.

Its life follows TorchServe's BaseHandler: initialize -> (preprocess -> inference -> postprocess)
per batch. TorchServe hands over a batch of requests and fails the whole batch if the handler
raises, so a request that cannot be decoded is answered with its own 4xx status and JSON error
while the rest of the batch is served.

The archive's model file is in one of three formats (bundle.json's "formats" says which):
TorchScript (model.pt, loaded by BaseHandler), pt2 (model.pt2, compiled ahead of time by
AOTInductor, loaded with aoti_load_package) or ONNX (model.onnx, run by onnxruntime). The format
only decides how initialize() loads the model; inference() calls the one callable it made.

Per-model settings come from model-config.yaml (packed into the .mar by `make archive`):
    handler:
      torch_threads: 1     # intra-op threads per worker (workers x threads <= cores)
      allow_tf32: false    # true trades the 1e-5 parity bound for speed on Ampere and newer GPUs
      optimize_for_inference: true   # CPU: freeze the TorchScript model and fuse with oneDNN
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from pathlib import Path

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from contract import responses
from contract.bundle import BUNDLE_FILE, BundleError, load_bundle, served_format, verify_file
from contract.preprocessing import InputSpec, InvalidInput, preprocess

logger = logging.getLogger(__name__)


def configure_tf32(allow: bool) -> None:
    """TF32 on or off for both cuDNN convolutions and matmuls.

    PyTorch enables TF32 for cuDNN convolutions by default, and importing TorchServe's
    BaseHandler raises the matmul precision to "high" (TF32) on Ampere and newer: both would
    break the 1e-5 agreement with onnxruntime and the eager reference.
    """
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.set_float32_matmul_precision("high" if allow else "highest")


def worker_device(properties: dict) -> torch.device:
    """The device TorchServe gives this worker, chosen as BaseHandler chooses it."""
    if torch.cuda.is_available() and properties.get("gpu_id") is not None:
        return torch.device(f"cuda:{properties['gpu_id']}")
    return torch.device("cpu")


def load_compiled_model(path: Path, record: dict, device: torch.device):
    """The pt2 model as a callable on `device`; refuses a package compiled for another device."""
    compiled_for = torch.device(record["device"])
    if compiled_for.type != device.type:
        raise BundleError(f"{path.name} was compiled for {compiled_for.type} but this worker runs on "
                          f"{device}: rebuild the archive on the serving host with `make archive FORMAT=pt2`")
    # Loads the shared library AOTInductor built at export: nothing is compiled here.
    runner = torch._inductor.aoti_load_package(str(path), device_index=device.index if device.type == "cuda" else -1)
    max_batch = int(record["max_batch"])

    def run(images: torch.Tensor) -> torch.Tensor:
        # Compiled for batches up to max_batch; TorchServe's batchSize stays below it.
        return torch.cat([runner(images[i:i + max_batch]) for i in range(0, len(images), max_batch)])

    return run


def load_onnx_model(path: Path, device: torch.device, threads: int, allow_tf32: bool):
    """The ONNX model as a callable: an onnxruntime session on the worker's device that fails
    loudly when the CUDA provider did not load (contract.onnx_session)."""
    from contract.onnx_session import open_session, run_log_probs

    session = open_session(str(path), str(device), threads=threads, allow_tf32=allow_tf32)
    # onnxruntime takes host arrays and copies to the GPU itself.
    return lambda images: torch.from_numpy(run_log_probs(session, images.cpu().numpy()))


def request_body(row, content_type: str = ""):
    """The payload of one request: the raw body, or the one field of a multipart upload.

    A urlencoded form (what curl -d and urllib send by default) is not an image: it yields None,
    which the preprocessing answers with a hint about the Content-Type.
    """
    if not isinstance(row, dict):
        return row
    if content_type.startswith("application/x-www-form-urlencoded"):
        return None
    for key in ("data", "body"):
        if key in row:
            return row[key]
    return next(iter(row.values())) if len(row) == 1 else None


class MnistHandler(BaseHandler):
    # TorchServe takes the handler module's only class as the entry point: batches travel
    # between the steps as (images, errors) tuples. images: (n_valid, C, H, W) on self.device,
    # or None; errors: one slot per request, None where the request is valid. self.model, in
    # every format, maps a float32 batch to log-probabilities.

    def initialize(self, context):
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        serialized_file = context.manifest["model"]["serializedFile"]
        try:
            self.bundle = load_bundle(model_dir / BUNDLE_FILE)
            verify_file(self.bundle, model_dir, serialized_file)
            self.format, record = served_format(self.bundle, serialized_file)
        except BundleError as error:
            logger.error("refusing to serve %s: %s", serialized_file, error)
            raise
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        threads, allow_tf32 = int(settings.get("torch_threads", 1)), bool(settings.get("allow_tf32", False))
        torch.set_num_threads(threads)
        configure_tf32(allow_tf32)
        model_device = worker_device(properties)
        if self.format == "torchscript":
            super().initialize(context)  # device from TorchServe's gpu_id; torch.jit.load; eval()
            if self.device.type == "cpu" and settings.get("optimize_for_inference", True):
                # Frozen, with oneDNN's fused convolutions: 2x faster per image at batch 8 (measured
                # on the 2-core CPU host, README "Performance"); within 1e-6 of the plain model
                # (the parity tests hold it to 1e-5).
                self.model = torch.jit.optimize_for_inference(torch.jit.freeze(self.model))
        elif self.format == "pt2":
            self.device = model_device
            self.model = load_compiled_model(model_dir / serialized_file, record, self.device)
        else:
            self.device = torch.device("cpu")  # where preprocess leaves the batch for onnxruntime
            self.model = load_onnx_model(model_dir / serialized_file, model_device, threads, allow_tf32)
        self.initialized = True
        self.spec = InputSpec.from_bundle(self.bundle)
        self.classes = self.bundle["classes"]
        # The first call optimizes TorchScript's graph and allocates the other runtimes' buffers:
        # not a user's wait.
        with torch.inference_mode():
            self.model(torch.zeros(1, self.spec.channels, self.spec.height, self.spec.width,
                                   device=self.device))
        logger.info("serving %s (%s, %d classes) from %s (%s) on %s, TF32 %s, %d torch thread(s); "
                    "SHA-256 verified", self.bundle["model_name"], self.bundle["dataset"], len(self.classes),
                    serialized_file, self.format, model_device, "on" if allow_tf32 else "off",
                    torch.get_num_threads())

    def handle(self, data, context):
        # BaseHandler.handle also routes "explain"/"describe" headers to code paths that fail or
        # answer once per batch; this model offers neither, so every request takes the same path.
        # (TorchServe itself records each batch's PredictionTime; a second timing metric per
        # batch cost 4% of the worker's time under load.)
        self.context = context
        return self.postprocess(self.inference(self.preprocess(data)))

    def preprocess(self, data):
        arrays, errors = [], []
        for idx, row in enumerate(data):
            content_type = self.context.get_request_header(idx, "Content-Type") or ""
            try:
                arrays.append(preprocess(request_body(row, content_type), self.spec))
                errors.append(None)
            except InvalidInput as error:
                errors.append(error)
            except Exception:  # a decoder bug must not fail the other requests of the batch
                logger.exception("unexpected error while decoding a request")
                errors.append(InvalidInput("the server could not decode this request", 500))
        images = torch.from_numpy(np.concatenate(arrays)).to(self.device) if arrays else None
        return images, errors

    def inference(self, batch):
        images, errors = batch
        if images is None:
            return None, errors
        with torch.inference_mode():
            probabilities = self.model(images).exp().cpu().numpy()
        return probabilities, errors

    def postprocess(self, result) -> list[str]:
        probabilities, errors = result
        answers, valid = [], 0
        batch_size = str(len(errors))
        for idx, error in enumerate(errors):
            self.context.set_response_content_type(idx, "application/json")
            # how many requests shared this model call: lets clients see dynamic batching work
            self.context.set_response_header(idx, "X-Batch-Size", batch_size)
            if error is not None:
                self.context.set_response_status(error.status, HTTPStatus(error.status).phrase, idx)
                answers.append(responses.dumps(error.to_response()))
                continue
            answers.append(responses.dumps(responses.prediction(probabilities[valid], self.classes)))
            valid += 1
        return answers
