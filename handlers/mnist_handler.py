"""TorchServe handler for the ConvNet: image bytes or JSON in, label and probabilities out.

Its life follows TorchServe's BaseHandler: initialize -> (preprocess -> inference -> postprocess)
per batch. TorchServe hands over a batch of requests and fails the whole batch if the handler
raises, so a request that cannot be decoded is answered with its own 4xx status and JSON error
while the rest of the batch is served.

Per-model settings come from model-config.yaml (packed into the .mar by `make archive`):
    handler:
      torch_threads: 1     # intra-op threads per worker (workers x threads <= cores)
      allow_tf32: false    # true trades the 1e-5 parity bound for speed on Ampere and newer GPUs
      optimize_for_inference: true   # CPU: freeze the TorchScript model and fuse with oneDNN

Metrics (requests by status, batch size, decode time per request, model time per batch) go
through TorchServe's context.metrics and must be declared in the server's metrics_config
(metrics.yaml in the repository) to reach Prometheus.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from http import HTTPStatus
from pathlib import Path

import numpy as np
import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from contract import responses
from contract.bundle import BUNDLE_FILE, BundleError, load_bundle, verify_file
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
    # between the steps as (images, errors) tuples. images: (n_valid, C, H, W) on the model's
    # device, or None; errors: one slot per request, None where the request is valid.

    def initialize(self, context):
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        serialized_file = context.manifest["model"]["serializedFile"]
        try:
            self.bundle = load_bundle(model_dir / BUNDLE_FILE)
            verify_file(self.bundle, model_dir, serialized_file)
        except BundleError as error:
            logger.error("refusing to serve %s: %s", serialized_file, error)
            raise
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        torch.set_num_threads(int(settings.get("torch_threads", 1)))
        configure_tf32(bool(settings.get("allow_tf32", False)))
        super().initialize(context)  # device from TorchServe's gpu_id; torch.jit.load; eval()
        if self.device.type == "cpu" and settings.get("optimize_for_inference", True):
            # Frozen, with oneDNN's fused convolutions: 2x faster per image at batch 8 (measured
            # on the 2-core CPU host, README "Performance"); within 1e-6 of the plain model
            # (the parity tests hold it to 1e-5).
            self.model = torch.jit.optimize_for_inference(torch.jit.freeze(self.model))
        self.spec = InputSpec.from_bundle(self.bundle)
        self.classes = self.bundle["classes"]
        with torch.inference_mode():  # first call compiles TorchScript's graph: not a user's wait
            self.model(torch.zeros(1, self.spec.channels, self.spec.height, self.spec.width,
                                   device=self.device))
        logger.info("serving %s (%s, %d classes) on %s, TF32 %s, %d torch thread(s); SHA-256 verified",
                    self.bundle["model_name"], self.bundle["dataset"], len(self.classes), self.device,
                    "on" if settings.get("allow_tf32") else "off", torch.get_num_threads())

    def handle(self, data, context):
        # BaseHandler.handle also routes "explain"/"describe" headers to code paths that fail or
        # answer once per batch; this model offers neither, so every request takes the same path.
        # (TorchServe itself records each batch's PredictionTime; a second timing metric per
        # batch cost 4% of the worker's time under load.)
        self.context = context
        self.decode_ms, self.model_ms = [], None
        answers = self.postprocess(self.inference(self.preprocess(data)))
        try:
            self.record_metrics()
        except Exception as error:  # a metrics configuration without ours must not cost answers
            if not getattr(self, "metrics_warned", False):
                logger.warning("handler metrics not recorded (%s): start TorchServe with "
                               "metrics_config=metrics.yaml from the repository", error)
                self.metrics_warned = True
        return answers

    def preprocess(self, data):
        arrays, errors = [], []
        for idx, row in enumerate(data):
            content_type = self.context.get_request_header(idx, "Content-Type") or ""
            started = time.perf_counter()
            try:
                arrays.append(preprocess(request_body(row, content_type), self.spec))
                errors.append(None)
            except InvalidInput as error:
                errors.append(error)
            except Exception:  # a decoder bug must not fail the other requests of the batch
                logger.exception("unexpected error while decoding a request")
                errors.append(InvalidInput("the server could not decode this request", 500))
            self.decode_ms.append((time.perf_counter() - started) * 1000)
        images = torch.from_numpy(np.concatenate(arrays)).to(self.device) if arrays else None
        return images, errors

    def inference(self, batch):
        images, errors = batch
        if images is None:
            return None, errors
        started = time.perf_counter()
        with torch.inference_mode():
            probabilities = self.model(images).exp().cpu().numpy()
        self.model_ms = (time.perf_counter() - started) * 1000
        return probabilities, errors

    def postprocess(self, result) -> list[str]:
        probabilities, errors = result
        answers, valid = [], 0
        batch_size = str(len(errors))
        self.statuses = Counter(200 if error is None else error.status for error in errors)
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

    def record_metrics(self) -> None:
        """The batch's figures for Prometheus, as declared in metrics.yaml (model_metrics).

        Each update is one log line that the frontend parses, so counts are summed per status
        and per batch; decode time is the one figure sent per request.
        """
        metrics, model = self.context.metrics, [self.context.model_name]
        if metrics is None:  # a handler driven outside TorchServe
            return
        requests = metrics.get_metric("mnist_requests", MetricTypes.COUNTER)
        for status, count in self.statuses.items():
            requests.add_or_update(count, model + [str(status)])
        metrics.get_metric("mnist_batch_size", MetricTypes.HISTOGRAM).add_or_update(
            len(self.decode_ms), model)
        decode = metrics.get_metric("mnist_decode_milliseconds", MetricTypes.HISTOGRAM)
        for milliseconds in self.decode_ms:
            decode.add_or_update(milliseconds, model)
        if self.model_ms is not None:
            metrics.get_metric("mnist_model_milliseconds", MetricTypes.HISTOGRAM).add_or_update(
                self.model_ms, model)
