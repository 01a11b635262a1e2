"""The model that KServe's ModelServer serves: the archive's model.onnx in onnxruntime.

One input tensor per request, any name, dispatched on its datatype:

    FP32   [N, 1, 28, 28]         already normalized as bundle.json says (mean, std)
    UINT8  [N, 1, 28, 28] or [N, 28, 28]   raw pixels 0..255, light object on dark, as the
                                  REST body {"pixels": ...}: framed and normalized here
    BYTES  [N] or [N, 1]          each element one image file (or its base64 text): decoded,
                                  limited and framed exactly as a REST body (contract.preprocessing)

Outputs: "probabilities" FP32 [N, classes] and "label" INT64 [N]. A request parameter
"framing" ("auto", "on", "off") chooses framing for UINT8 and BYTES, as on REST.

Whatever cannot be used raises kserve's InvalidInput (HTTP 400, gRPC INVALID_ARGUMENT) with the
contract's message; inputs over a size limit raise TooLarge (HTTP 413, gRPC INVALID_ARGUMENT).
The session runs in a worker thread: onnxruntime releases the GIL, so REST and gRPC requests
keep being read while one is computed.
"""
from __future__ import annotations

import asyncio
import base64
import uuid
from pathlib import Path

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput

from contract import TOLERANCE
from contract.bundle import load_bundle, verify_file
from contract.onnx_session import check_model_matches_bundle, open_session, run_log_probs
from contract.preprocessing import InputSpec, decode_image, pixels_to_array, preprocess_framed
from contract.preprocessing import InvalidInput as ContractInvalidInput

ONNX_FILE = "model.onnx"
MAX_BATCH = 256  # images per request: a bound on the memory and time one request can take
OUTPUTS = ("probabilities", "label")


class TooLarge(InvalidInput):
    """An input over one of the contract's size limits (HTTP 413)."""


async def too_large_handler(_, error: TooLarge):
    """REST: 413 with the protocol's error JSON (kserve answers every InvalidInput with 400)."""
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=413, content={"error": str(error)})


class ModelSelfTestFailed(RuntimeError):
    """model.onnx does not answer bundle.json's recorded test image as export recorded."""


class MnistOnnxModel(Model):
    def __init__(self, name: str, model_dir: Path, threads: int = 1, version: str | None = None):
        super().__init__(name)
        self.version = version  # release.json's model_version: what infer answers carry
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.session = None
        self.bundle: dict = {}

    def load(self) -> bool:
        """Open model.onnx after checking it against bundle.json's SHA-256, and self-test it."""
        self.bundle = load_bundle(self.model_dir)
        path = verify_file(self.bundle, self.model_dir, ONNX_FILE)
        self.spec = InputSpec.from_bundle(self.bundle)
        self.session = open_session(path, "cpu", threads=self.threads)
        self.input_name = check_model_matches_bundle(self.session, self.bundle)
        self.classes = list(self.bundle["classes"])
        self.self_test()
        self.ready = True
        return self.ready

    def self_test(self) -> None:
        """bundle.json's test image through the whole path: decode, frame, normalize, run."""
        test = self.bundle["self_test"]
        x = decode_image(base64.b64decode(test["image_png_base64"]), self.spec)
        p = np.exp(run_log_probs(self.session, x).astype(np.float64))[0]
        diff = float(np.abs(p - np.asarray(test["probabilities"])).max())
        if int(p.argmax()) != test["label"] or diff > TOLERANCE:
            raise ModelSelfTestFailed(f"model.onnx answers label {int(p.argmax())} (max |dp| {diff:.3g}) "
                                      f"where bundle.json expects label {test['label']}")

    def get_input_types(self) -> list[dict]:
        c, h, w = self.spec.channels, self.spec.height, self.spec.width
        return [{"name": self.input_name, "datatype": "FP32", "shape": [-1, c, h, w]},
                {"name": "pixels", "datatype": "UINT8", "shape": [-1, c, h, w]},
                {"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.classes)]},
                {"name": "label", "datatype": "INT64", "shape": [-1]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this server speaks the Open Inference Protocol (v2) only: POST "
                               f"/v2/models/{self.name}/infer")
        requested = [o.name for o in payload.request_outputs or []]
        unknown = [n for n in requested if n not in OUTPUTS]
        if unknown:
            raise InvalidInput(f"unknown output {unknown[0]!r}; this model has outputs {list(OUTPUTS)}")
        framing = _parameter(payload.parameters, "framing")
        probabilities = await asyncio.to_thread(self._probabilities, payload, framing)
        outputs = []
        for name in requested or OUTPUTS:
            data = probabilities if name == "probabilities" else probabilities.argmax(axis=1).astype(np.int64)
            output = InferOutput(name=name, shape=list(data.shape),
                                 datatype="FP32" if name == "probabilities" else "INT64")
            output.set_data_from_numpy(data, binary_data=payload.use_binary_outputs)
            outputs.append(output)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                             model_version=self.version, infer_outputs=outputs,
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)

    def _probabilities(self, payload: InferRequest, framing) -> np.ndarray:
        x = self.model_input(payload, framing)
        return np.exp(run_log_probs(self.session, x)).astype(np.float32)

    def model_input(self, payload: InferRequest, framing=None) -> np.ndarray:
        """The request's one tensor -> float32 (N, C, H, W), normalized; InvalidInput if unusable."""
        if len(payload.inputs) != 1:
            raise InvalidInput(f"send exactly one input tensor (FP32, UINT8 or BYTES), got "
                               f"{len(payload.inputs)}")
        tensor = payload.inputs[0]
        shape = [int(d) for d in tensor.shape]
        if not shape or shape[0] < 1:
            raise InvalidInput(f"input {tensor.name!r} has shape {shape}: the first dimension is the "
                               "batch and must be at least 1")
        if shape[0] > MAX_BATCH:
            raise TooLarge(f"batch of {shape[0]} exceeds the limit of {MAX_BATCH} images per request; "
                           "split it into several requests")
        try:
            if tensor.datatype == "FP32":
                return self._normalized(tensor, shape)
            if tensor.datatype == "UINT8":
                return self._pixels(tensor, shape, framing)
            if tensor.datatype == "BYTES":
                return self._images(tensor, shape, framing)
        except ContractInvalidInput as error:
            raise (TooLarge if error.status == 413 else InvalidInput)(str(error)) from None
        raise InvalidInput(f"input {tensor.name!r} has datatype {tensor.datatype}; send FP32 "
                           f"{self._chw()} (normalized), UINT8 {self._chw()} (pixels 0..255) or BYTES "
                           "[N] (image files)")

    def _chw(self, channels: bool = True) -> str:
        c, h, w = self.spec.channels, self.spec.height, self.spec.width
        return f"[N,{c},{h},{w}]" if channels else f"[N,{h},{w}]"

    def _array(self, tensor, shape) -> np.ndarray:
        try:
            array = tensor.as_numpy()
        except (ValueError, TypeError, OverflowError) as error:
            raise InvalidInput(f"input {tensor.name!r}: its data does not match its datatype "
                               f"{tensor.datatype} and shape {shape} ({error})") from None
        if array.size != int(np.prod(shape)):
            raise InvalidInput(f"input {tensor.name!r} holds {array.size} values where its shape {shape} "
                               f"needs {int(np.prod(shape))}")
        return array.reshape(shape)

    def _normalized(self, tensor, shape) -> np.ndarray:
        c, h, w = self.spec.channels, self.spec.height, self.spec.width
        if shape[1:] != [c, h, w]:
            raise InvalidInput(f"FP32 input {tensor.name!r} has shape {shape}; send {self._chw()}, "
                               f"(pixel / 255 - {self.spec.mean[0]:g}) / {self.spec.std[0]:g}, or UINT8 "
                               "pixels 0..255")
        x = np.ascontiguousarray(self._array(tensor, shape), dtype=np.float32)
        if not np.isfinite(x).all():
            raise InvalidInput(f"FP32 input {tensor.name!r} holds NaN or infinity")
        return x

    def _pixels(self, tensor, shape, framing) -> np.ndarray:
        c, h, w = self.spec.channels, self.spec.height, self.spec.width
        if shape[1:] not in ([c, h, w], [h, w]):
            raise InvalidInput(f"UINT8 input {tensor.name!r} has shape {shape}; send {self._chw()} or "
                               f"{self._chw(False)}, pixels 0..255, light object on a dark background")
        pixels = self._array(tensor, shape).reshape(shape[0], h, w)
        # The REST body {"pixels": ...} goes through the same function: same framing, same numbers.
        return np.concatenate([pixels_to_array(image.tolist(), self.spec, framing) for image in pixels])

    def _images(self, tensor, shape, framing) -> np.ndarray:
        if shape[1:] not in ([], [1]):
            raise InvalidInput(f"BYTES input {tensor.name!r} has shape {shape}; send [N] (or [N,1]), "
                               "one image file per element")
        files = self._array(tensor, shape).reshape(-1)
        arrays = []
        for i, data in enumerate(files):
            try:  # the REST body's path: image bytes, their base64 text, or the JSON bodies
                arrays.append(preprocess_framed(data, self.spec, framing)[0])
            except ContractInvalidInput as error:
                raise type(error)(f"image {i}: {error}", error.status) from None
        return np.concatenate(arrays)


def _parameter(parameters, key: str):
    """A request parameter from REST (a dict) or gRPC (InferParameter messages); None if absent."""
    if not parameters or key not in parameters:
        return None
    value = parameters[key]
    if hasattr(value, "WhichOneof"):
        kind = value.WhichOneof("parameter_choice")
        return getattr(value, kind) if kind else None
    return value
