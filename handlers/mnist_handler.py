"""TorchServe handler for the ConvNet: image bytes or JSON in, label and probabilities out.

POST /explanations/mnist takes the same bodies and answers the prediction plus an attribution
map for the predicted class: Captum's Integrated Gradients of that class's probability, from a
black image to the request's image, on the TorchScript model (explain_attributions below).

Its life follows TorchServe's BaseHandler: initialize -> (preprocess -> inference -> postprocess)
per batch. TorchServe hands over a batch of requests and fails the whole batch if the handler
raises, so a request that cannot be decoded is answered with its own 4xx status and JSON error
while the rest of the batch is served.

The archive's model file is in one of three formats (bundle.json's "formats" says which):
TorchScript (model.pt), pt2 (model.pt2, compiled ahead of time by AOTInductor) or ONNX
(model.onnx, run by onnxruntime). The format registry (formats/, packed into the archive) loads
it; inference() calls the one callable it made, whatever the format.

Per-model settings come from model-config.yaml (packed into the .mar by `make archive`):
    handler:
      torch_threads: 1     # intra-op threads per worker (workers x threads <= cores)
      allow_tf32: false    # true trades the 1e-5 parity bound for speed on Ampere and newer GPUs
      optimize_for_inference: true   # CPU: freeze the TorchScript model and fuse with oneDNN
      explain_steps: 64    # Integrated Gradients' integration points per explanation

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
from captum.attr import IntegratedGradients
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from contract import responses
from contract.bundle import BUNDLE_FILE, BundleError, load_bundle, served_format, verify_file
from contract.preprocessing import InputSpec, InvalidInput, preprocess, preprocess_framed
import formats

logger = logging.getLogger(__name__)

# TorchServe's frontend sends every request with the header explain: "True" for
# /explanations/{model} and "False" for /predictions/{model}; one batch can hold both kinds.
EXPLAIN_HEADER = "explain"
# A gRPC request reaches the handler without any header (only its input map), so the absent
# explain header is what tells it apart. TorchServe's StreamPredictions completes a call only on a
# response whose headers say ts_stream_next "false" (without one its frontend throws and the
# worker is restarted); Predictions ignores the header. REST responses must not carry it: on REST
# it switches the frontend to a chunked answer.
STREAM_NEXT_HEADER = "ts_stream_next"


def worker_device(properties: dict) -> torch.device:
    """The device TorchServe gives this worker, chosen as BaseHandler chooses it."""
    if torch.cuda.is_available() and properties.get("gpu_id") is not None:
        return torch.device(f"cuda:{properties['gpu_id']}")
    return torch.device("cpu")


FILE_FIELDS = ("file", "image", "data")  # preferred multipart fields, in order

# A request's framing choice, auto | on | off (a JSON body's "framing" key wins). A header, not a
# query parameter: TorchServe 0.12.0 does not hand ?framing=... to the handler (seen here).
FRAMING_HEADER = "x-framing"


def request_body(row, content_type: str = "", part_types: dict[str, str] | None = None):
    """The payload of one request: the raw body, or the file field of a multipart upload.

    TorchServe hands over one dict per request: query parameters and form fields by name, the
    raw body as "body" (added last, so that a query parameter "?body=" cannot replace it), and
    gRPC's input under the client's name ("data" by convention). `part_types` are the per-part content types: a multipart file upload
    has one, plain fields and query parameters have none. A urlencoded form (curl -d, urllib's
    default) cannot carry an image: InvalidInput says what to send instead.
    """
    if not isinstance(row, dict):
        return row
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        raise InvalidInput("a form post (curl -d, urllib's default) cannot carry an image: send the "
                           "file's bytes with curl --data-binary @file -H 'Content-Type: "
                           "application/octet-stream' (or curl -T file), or a multipart upload "
                           "with a file field (curl -F file=@file)")
    if media_type.startswith("multipart/"):
        files = [name for name in row if (part_types or {}).get(name)]
        candidates = [*(f for f in FILE_FIELDS if f in files), *files, *(f for f in FILE_FIELDS if f in row)]
        if not candidates:
            raise InvalidInput("send a multipart upload with a file field (curl -F file=@digit.png); "
                               f"this one has only the fields {sorted(row)[:8]}")
        return row[candidates[0]]
    for key in ("body", "data"):
        if key in row:
            return row[key]
    if len(row) == 1:  # gRPC's input map, under whatever name the client chose
        return next(iter(row.values()))
    raise InvalidInput("the request has no body: send the image's bytes, or JSON")


def request_headers(context, idx: int) -> tuple[dict[str, str], dict[str, str]]:
    """(request headers with lower-case names, content type of each request part by name)."""
    headers, part_types = {}, {}
    for name, value in (context.get_all_request_header(idx) or {}).items():
        if isinstance(value, dict):  # TorchServe files each part's content type under its name
            part_types[name] = value.get("content-type") or ""
        elif isinstance(value, str):
            headers[name.lower()] = value
    return headers, part_types


class MnistHandler(BaseHandler):
    # TorchServe takes the handler module's only class as the entry point: batches travel
    # between the steps as (images, errors, framings) tuples. images: (n_valid, C, H, W) on
    # self.device, or None; errors: one slot per request, None where the request is valid;
    # framings: one slot per request, what framing did (None for an error). self.model, in every
    # format, maps a float32 batch to log-probabilities.

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
        formats.configure_tf32(allow_tf32)
        model_device = worker_device(properties)
        self.manifest = context.manifest
        try:
            self.model = formats.load(self.format, model_dir / serialized_file, record, model_device,
                                      threads=threads, allow_tf32=allow_tf32,
                                      optimize=bool(settings.get("optimize_for_inference", True)))
        except BundleError as error:
            logger.error("refusing to serve %s: %s", serialized_file, error)
            raise
        self.device = self.model.input_device  # where preprocess leaves the batch
        self.explained_model = None  # compiled or ONNX: a forward pass only, no gradients
        if formats.get(self.format).explainable:
            self.initialize_explanations(self.model.module, int(settings.get("explain_steps", 64)))
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
        # BaseHandler.handle looks at the first request's "explain" header only and answers the
        # whole batch one way; here each request gets what it asked for, and the explanation
        # requests get their prediction as well.
        self.context = context
        self.decode_ms, self.model_ms = [], None
        batch = self.preprocess(data)
        result = self.inference(batch)
        answers = self.add_explanations(batch, result, self.postprocess(result))
        try:
            self.record_metrics()
        except Exception as error:  # a metrics configuration without ours must not cost answers
            if not getattr(self, "metrics_warned", False):
                logger.warning("handler metrics not recorded (%s): start TorchServe with "
                               "metrics_config=metrics.yaml from the repository", error)
                self.metrics_warned = True
        failure = self.shared_grpc_failure()
        if failure is not None:
            raise PredictionException(str(failure), failure.status)
        return answers

    def shared_grpc_failure(self) -> InvalidInput | None:
        """The error to fail the whole batch with, when every request in it came over gRPC and
        failed alike; None otherwise.

        TorchServe's gRPC frontend answers each response of a batch with gRPC OK whatever status
        the handler set for it; only a failed batch reaches the client as a gRPC status (400 ->
        INVALID_ARGUMENT, 413 -> RESOURCE_EXHAUSTED, 500 -> INTERNAL). Failing a batch fails every
        request in it, so it is done only where that is each request's own answer; a gRPC
        request batched with others keeps its error JSON inside an OK reply (docs/grpc.md).
        """
        failures = self.failures
        if not failures or not all(self.via_grpc) or any(f is None for f in failures):
            return None
        first = failures[0]
        same = all(f.status == first.status and str(f) == str(first) for f in failures)
        return first if same else None

    def preprocess(self, data):
        arrays, errors, framings = [], [], []
        self.via_grpc = []
        for idx, row in enumerate(data):
            headers, part_types = request_headers(self.context, idx)
            self.via_grpc.append(EXPLAIN_HEADER not in headers)
            started = time.perf_counter()
            try:
                body = request_body(row, headers.get("content-type", ""), part_types)
                array, framed = preprocess_framed(body, self.spec, headers.get(FRAMING_HEADER))
                arrays.append(array)
                errors.append(None)
                framings.append(framed)
            except InvalidInput as error:
                errors.append(error)
                framings.append(None)
            except Exception:  # a decoder bug must not fail the other requests of the batch
                logger.exception("unexpected error while decoding a request")
                errors.append(InvalidInput("the server could not decode this request", 500))
                framings.append(None)
            self.decode_ms.append((time.perf_counter() - started) * 1000)
        images = torch.from_numpy(np.concatenate(arrays)).to(self.device) if arrays else None
        return images, errors, framings

    def inference(self, batch):
        images, errors, framings = batch
        if images is None:
            return None, errors, framings
        started = time.perf_counter()
        with torch.inference_mode():
            probabilities = self.model(images).exp().cpu().numpy()
        self.model_ms = (time.perf_counter() - started) * 1000
        return probabilities, errors, framings

    def postprocess(self, result) -> list[str]:
        probabilities, errors, framings = result
        answers, statuses, valid = [], [], 0
        self.failures = []  # per request: the error it is answered with, or None
        batch_size = str(len(errors))
        for idx, error in enumerate(errors):
            self.context.set_response_content_type(idx, "application/json")
            # how many requests shared this model call: lets clients see dynamic batching work
            self.context.set_response_header(idx, "X-Batch-Size", batch_size)
            if self.via_grpc[idx]:
                self.context.set_response_header(idx, STREAM_NEXT_HEADER, "false")  # the last message
            if error is None:
                row, valid = probabilities[valid], valid + 1
                if np.isfinite(row).all():
                    answers.append(responses.dumps(responses.prediction(row, self.classes, framings[idx])))
                    statuses.append(200)
                    self.failures.append(None)
                    continue
                logger.error("the model answered NaN or infinity for a valid input")
                error = InvalidInput("the model could not classify this image (a server fault)", 500)
            self.context.set_response_status(error.status, HTTPStatus(error.status).phrase, idx)
            answers.append(responses.dumps(error.to_response()))
            statuses.append(error.status)
            self.failures.append(error)
        self.statuses = Counter(statuses)  # answered by status, for record_metrics
        return answers

    # Explanations ---------------------------------------------------------------------------

    def initialize_explanations(self, module, steps: int) -> None:
        # The plain TorchScript model, not the copy the CPU path froze: the frozen, oneDNN-fused
        # copy has no autograd ("element 0 of tensors does not require grad").
        self.explained_model = module
        for parameter in self.explained_model.parameters():
            parameter.requires_grad_(False)  # gradients with respect to the input only
        self.explain_steps = steps
        # The baseline is a black image, through the same preprocessing as every request.
        spec = InputSpec.from_bundle(self.bundle)
        self.explain_baseline = torch.from_numpy(
            preprocess({"pixels": [[0] * spec.width] * spec.height}, spec)).to(self.device)
        self.integrated_gradients = IntegratedGradients(lambda x: self.explained_model(x).exp())

    def explanation_requests(self, errors) -> dict[int, int]:
        """{request index: row of its image in the batch} for the valid /explanations requests."""
        rows, row = {}, 0
        for idx, error in enumerate(errors):
            if error is None:
                if self.context.get_request_header(idx, EXPLAIN_HEADER) == "True":
                    rows[idx] = row
                row += 1
        return rows

    def add_explanations(self, batch, result, answers: list[str]) -> list[str]:
        """Replace the answers of /explanations requests by prediction + attribution map."""
        images, errors, framings = batch
        probabilities = result[0]
        wanted = self.explanation_requests(errors)
        if not wanted:
            return answers
        if self.explained_model is None:
            return self.refuse_explanations(wanted, answers)
        rows = list(wanted.values())
        labels = probabilities[rows].argmax(1)
        attributions, details = self.explain_attributions(images[rows], labels)
        for (idx, row), attribution, detail in zip(wanted.items(), attributions, details):
            answers[idx] = responses.dumps(responses.explanation(
                probabilities[row], self.classes, attribution, detail, framings[idx]))
        return answers

    def refuse_explanations(self, wanted: dict[int, int], answers: list[str]) -> list[str]:
        """A pt2 or ONNX archive runs a forward pass only: /explanations says so, with the way out."""
        error = InvalidInput(f"this archive serves the {self.format} model, which has no gradients "
                             "to explain with; explanations need the TorchScript archive (make archive "
                             "FORMAT=torchscript), or run `python -m edge IMAGE --explain DIR`", 501)
        for idx in wanted:
            self.context.set_response_status(error.status, HTTPStatus(error.status).phrase, idx)
            answers[idx] = responses.dumps(error.to_response())
            self.failures[idx] = error
        self.statuses[200] -= len(wanted)
        self.statuses[error.status] += len(wanted)
        return answers

    def explain_attributions(self, images: torch.Tensor, labels: np.ndarray):
        """Integrated Gradients of each image's probability of `labels`: (n, H, W) maps summed
        over the channels, and per image what was computed (for completeness checks)."""
        target = torch.as_tensor(labels, device=self.device)
        baseline = self.explain_baseline.expand_as(images)
        with torch.enable_grad():
            attributions, delta = self.integrated_gradients.attribute(
                images, baseline, target=target, n_steps=self.explain_steps,
                method="gausslegendre", return_convergence_delta=True)
        with torch.inference_mode():
            index = target[:, None]
            output = self.explained_model(images).exp().gather(1, index)[:, 0]
            baseline_output = self.explained_model(baseline).exp().gather(1, index)[:, 0]
        maps = attributions.detach().sum(1).cpu().numpy()
        details = [{"method": "integrated gradients (Captum)", "model": "TorchScript",
                    "target": "probability of the predicted class",
                    "baseline": "black image (every pixel 0), preprocessed like the request",
                    "steps": self.explain_steps, "integration": "gausslegendre",
                    "output": float(out), "baseline_output": float(base), "convergence_delta": float(d)}
                   for out, base, d in zip(output.tolist(), baseline_output.tolist(), delta.tolist())]
        return maps, details
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
