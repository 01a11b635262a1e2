"""Smaller and faster models for the edge, made from build/model.onnx with onnxruntime's own tools.

    quantize: build/model.int8.onnx, static QDQ quantization (int8 weights per channel, uint8
              activations), calibrated on real training images; reports accuracy, agreement,
              size and latency against the fp32 model on the full test set
    ort:      build/model.ort (+ required_operators.config) for onnxruntime's minimal and
              mobile builds

Both record their files' SHA-256 in build/bundle.json. New files are made in a temporary folder
inside build/ and renamed into place by contract.bundle.replace_recorded_files: a kill at any
point leaves the previous files or the new ones, and bundle.json true about whichever is there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from contract.bundle import BUNDLE_FILE, load_bundle, replace_recorded_files, verify_file
from contract.onnx_session import input_name, open_session, run_log_probs
from contract.preprocessing import InputSpec, normalize
from train.data import ensure_dataset, load_split

CALIBRATION_IMAGES = 512
MAX_ACCURACY_LOSS = 0.005  # 0.5 percentage points
MIN_AGREEMENT = 0.99


def split_as_input(bundle: dict, data_dir: Path, train: bool, limit: int | None = None):
    """Images of the bundle's data set, normalized by the handler's own function, and labels."""
    info = ensure_dataset(bundle["dataset"], data_dir, allow_download=False)
    split = load_split(info, data_dir, train=train)
    images = split.images[:limit].numpy() if limit else split.images.numpy()
    labels = split.labels[:limit].numpy() if limit else split.labels.numpy()
    spec = InputSpec.from_bundle(bundle)
    return np.concatenate([normalize(img, spec) for img in images]), labels


def median_us_per_image(fn, x, repeats: int) -> float:
    """Median microseconds per image of `fn(x)` over `repeats` calls, after one warm-up call."""
    fn(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e6 / len(x)


def latency_us(session, x: np.ndarray, batch: int, repeats: int) -> float:
    name = input_name(session)
    return median_us_per_image(lambda a: session.run(None, {name: a}), x[:batch], repeats)


def quantize(build_dir: Path, data_dir: Path) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quant_pre_process, quantize_static)

    bundle = load_bundle(build_dir / BUNDLE_FILE)
    fp32, int8 = verify_file(bundle, build_dir, "model.onnx"), build_dir / "model.int8.onnx"
    calibration, _ = split_as_input(bundle, data_dir, train=True, limit=CALIBRATION_IMAGES)

    name = input_name(open_session(str(fp32)))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, len(calibration) // 64))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    with tempfile.TemporaryDirectory(dir=build_dir, prefix=".quantize-") as tmp:
        prepared, staged = Path(tmp) / "prepared.onnx", Path(tmp) / int8.name
        quant_pre_process(str(fp32), str(prepared))  # shape inference + graph cleanup first
        quantize_static(str(prepared), str(staged), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        sync(staged)
        report = compare_int8(bundle, data_dir, fp32, staged)
        replace_recorded_files(build_dir, {int8.name: staged}, "int8", report)
    loss = report["accuracy_fp32"] - report["accuracy_int8"]
    print(f"[export] {int8}: {report['bytes_int8'] / 1024:.0f} KiB (fp32 {report['bytes_fp32'] / 1024:.0f} KiB); "
          f"test accuracy {100 * report['accuracy_int8']:.2f}% vs fp32 {100 * report['accuracy_fp32']:.2f}% "
          f"over {report['test_images']} images; argmax agreement {100 * report['argmax_agreement']:.2f}%; "
          f"us/image (1 thread) batch 1: {report['us_per_image_int8_batch1']:.1f} vs "
          f"{report['us_per_image_fp32_batch1']:.1f}, batch 64: {report['us_per_image_int8_batch64']:.1f} "
          f"vs {report['us_per_image_fp32_batch64']:.1f}")
    if loss > MAX_ACCURACY_LOSS or report["argmax_agreement"] < MIN_AGREEMENT:
        print(f"[export] warning: int8 loses {100 * loss:.2f} points of accuracy (limit "
              f"{100 * MAX_ACCURACY_LOSS:.1f}) or agrees on fewer than {100 * MIN_AGREEMENT:.0f}% of images")
    return report


def sync(path: Path) -> None:
    """Flush a file written by another library to disk before it is renamed into place."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def compare_int8(bundle: dict, data_dir: Path, fp32: Path, int8: Path) -> dict:
    """Accuracy, agreement, size and latency of the int8 model against the fp32 one."""
    x, labels = split_as_input(bundle, data_dir, train=False)
    fp32_session, int8_session = open_session(str(fp32)), open_session(str(int8))
    p32 = run_log_probs(fp32_session, x, 256).argmax(1)
    p8 = run_log_probs(int8_session, x, 256).argmax(1)
    report = {
        "test_images": int(len(labels)),
        "calibration_images": CALIBRATION_IMAGES,
        "accuracy_fp32": float((p32 == labels).mean()),
        "accuracy_int8": float((p8 == labels).mean()),
        "argmax_agreement": float((p32 == p8).mean()),
        "bytes_fp32": fp32.stat().st_size,
        "bytes_int8": int8.stat().st_size,
        "threads": 1,
        "us_per_image_fp32_batch1": latency_us(fp32_session, x, 1, 500),
        "us_per_image_int8_batch1": latency_us(int8_session, x, 1, 500),
        "us_per_image_fp32_batch64": latency_us(fp32_session, x, 64, 100),
        "us_per_image_int8_batch64": latency_us(int8_session, x, 64, 100),
    }
    return report


def convert_to_ort(build_dir: Path) -> Path:
    """build/model.onnx -> build/model.ort and build/model.required_operators.config."""
    with tempfile.TemporaryDirectory(dir=build_dir, prefix=".ort-") as tmp:
        shutil.copy2(verify_file(load_bundle(build_dir), build_dir, "model.onnx"), Path(tmp) / "model.onnx")
        out = Path(tmp) / "out"
        subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                        str(Path(tmp) / "model.onnx"), "--output_dir", str(out),
                        "--optimization_style", "Fixed"], check=True, stdout=subprocess.DEVNULL)
        staged = {name: out / name for name in ("model.ort", "model.required_operators.config")}
        for path in staged.values():
            sync(path)
        replace_recorded_files(build_dir, staged, "ort")
    print(f"[export] wrote {build_dir / 'model.ort'} ({(build_dir / 'model.ort').stat().st_size / 1024:.0f} KiB) "
          f"and {build_dir / 'model.required_operators.config'}")
    return build_dir / "model.ort"
