"""onnxruntime sessions that run where they were asked to, with TF32 off.

onnxruntime falls back to the CPU silently when the CUDA execution provider cannot load (a
missing CUDA or cuDNN library, the CPU-only wheel): asking for CUDA and getting the CPU is an
error here, not a warning. Its CUDA provider also defaults to use_tf32=1, which breaks the 1e-5
agreement with PyTorch on Ampere and newer GPUs.
"""
from __future__ import annotations

import onnxruntime as ort


class ProviderUnavailable(RuntimeError):
    """The requested execution provider did not load."""


def open_session(model_path: str | bytes, device: str = "cpu", threads: int = 1,
                 allow_tf32: bool = False) -> ort.InferenceSession:
    """model_path: a path, or the model's bytes. device: 'cpu', 'cuda' or 'cuda:N'. threads:
    intra-op threads (CPU)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if device == "cpu":
        providers: list[str | tuple[str, dict]] = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ProviderUnavailable(
                "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu "
                "(requirements-gpu.txt) instead of onnxruntime, never both")
        device_id = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": int(allow_tf32)}),
                     "CPUExecutionProvider"]
    else:
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    model = model_path if isinstance(model_path, bytes) else str(model_path)
    session = ort.InferenceSession(model, options, providers=providers)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if session.get_providers()[0] != wanted:
        raise ProviderUnavailable(
            f"asked onnxruntime for {wanted} but the session runs on {session.get_providers()}: "
            "check that the CUDA and cuDNN libraries onnxruntime-gpu needs are on LD_LIBRARY_PATH")
    return session


class ModelMismatch(RuntimeError):
    """bundle.json does not describe the model it sits beside."""


def input_name(session: ort.InferenceSession) -> str:
    """The model's one input, asked of the session (bundle.json records the same name)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelMismatch(f"the model has inputs {[i.name for i in inputs]}; this project's models take one")
    return inputs[0].name


def run_log_probs(session: ort.InferenceSession, x, batch: int | None = None):
    """log-probabilities for a float32 (N, C, H, W) array, in chunks of `batch` if given."""
    import numpy as np

    name = input_name(session)
    if batch is None or len(x) <= batch:
        return session.run(None, {name: x})[0]
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def check_model_matches_bundle(session: ort.InferenceSession, bundle: dict) -> str:
    """The session's input name and shape and its class count against bundle.json; returns the
    input name."""
    expected = bundle["input"]
    name = input_name(session)
    if name != expected["name"]:
        raise ModelMismatch(f"the model's inputs are [{name!r}], bundle.json says {expected['name']!r}")
    shape = list(session.get_inputs()[0].shape[1:])
    if shape != [expected["channels"], expected["height"], expected["width"]]:
        raise ModelMismatch(f"the model takes (batch, {', '.join(map(str, shape))}), bundle.json says "
                            f"({expected['channels']}, {expected['height']}, {expected['width']})")
    classes = session.get_outputs()[0].shape[-1]
    if classes != len(bundle["classes"]):
        raise ModelMismatch(f"the model has {classes} outputs, bundle.json names {len(bundle['classes'])} classes")
    return name
