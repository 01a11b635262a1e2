"""TorchServe handler for the ConvNet: image bytes or JSON in, label and probabilities out.

POST /explanations/mnist takes the same bodies and answers the prediction plus an attribution
map for the predicted class: Captum's Integrated Gradients of that class's probability, from a
black image to the request's image, on the TorchScript model (explain_attributions below).

Its life follows TorchServe's BaseHandler: initialize -> (preprocess -> inference -> postprocess)
per batch. TorchServe hands over a batch of requests and fails the whole batch if the handler
raises, so a request that cannot be decoded is answered with its own 4xx status and JSON error
while the rest of the batch is served.

Per-model settings come from model-config.yaml (packed into the .mar by `make archive`):
    handler:
      torch_threads: 1     # intra-op threads per worker (workers x threads <= cores)
      allow_tf32: false    # true trades the 1e-5 parity bound for speed on Ampere and newer GPUs
      optimize_for_inference: true   # CPU: freeze the TorchScript model and fuse with oneDNN
      explain_steps: 64    # Integrated Gradients' integration points per explanation
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients
from ts.torch_handler.base_handler import BaseHandler

from contract import responses
from contract.bundle import BUNDLE_FILE, BundleError, load_bundle, verify_file
from contract.preprocessing import InputSpec, InvalidInput, preprocess

logger = logging.getLogger(__name__)

# TorchServe's frontend sends every request with the header explain: "True" for
# /explanations/{model} and "False" for /predictions/{model}; one batch can hold both kinds.
EXPLAIN_HEADER = "explain"


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
        self.initialize_explanations(int(settings.get("explain_steps", 64)))
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
        # BaseHandler.handle looks at the first request's "explain" header only and answers the
        # whole batch one way; here each request gets what it asked for, and the explanation
        # requests get their prediction as well. (TorchServe itself records each batch's
        # PredictionTime; a second timing metric per batch cost 4% of the worker's time.)
        self.context = context
        batch = self.preprocess(data)
        result = self.inference(batch)
        return self.add_explanations(batch, result, self.postprocess(result))

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

    # Explanations ---------------------------------------------------------------------------

    def initialize_explanations(self, steps: int) -> None:
        # The plain TorchScript model, kept before the CPU path freezes it: the frozen,
        # oneDNN-fused copy has no autograd ("element 0 of tensors does not require grad").
        self.explained_model = self.model
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
        images, errors = batch
        probabilities, _ = result
        wanted = self.explanation_requests(errors)
        if not wanted:
            return answers
        rows = list(wanted.values())
        labels = probabilities[rows].argmax(1)
        attributions, details = self.explain_attributions(images[rows], labels)
        for (idx, row), attribution, detail in zip(wanted.items(), attributions, details):
            answers[idx] = responses.dumps(responses.explanation(
                probabilities[row], self.classes, attribution, detail))
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
