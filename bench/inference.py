"""2. In-process inference, batch 1 and 64: eager PyTorch, TorchScript, onnxruntime (1 thread)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.common import log


def bench_inference(build: Path, checkpoint: Path) -> dict:
    import formats
    from export.edge_artifacts import median_us_per_image
    from train.checkpoint import load_model

    torch.set_num_threads(1)
    eager = load_model(checkpoint)
    scripted = formats.load("torchscript", build / "model.pt").run  # not frozen: as exported
    onnx = formats.load("onnx", build / "model.onnx", threads=1).run_numpy
    results = {}
    for batch, repeats in ((1, 3000), (64, 300)):
        x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
        t = torch.from_numpy(x)
        with torch.inference_mode():
            results[f"batch{batch}"] = {
                "eager": median_us_per_image(eager, t, repeats),
                "torchscript": median_us_per_image(scripted, t, repeats),
                "onnxruntime": median_us_per_image(onnx, x, repeats),
            }
    results.update(threads=1, device="cpu", unit="us per image, median")
    b1 = results["batch1"]
    log(f"inference batch 1: eager {b1['eager']:.1f} us, TorchScript {b1['torchscript']:.1f} us, "
        f"onnxruntime {b1['onnxruntime']:.1f} us")
    return results
