"""PyTorch, TorchScript, TorchServe and onnxruntime give the same answer on the CPU."""
import pytest

from tests import runtimes
from tests.helpers import report

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]


def test_all_runtimes_agree_on_200_real_images(artifacts, server, test_pngs):
    pngs, labels = test_pngs
    x = runtimes.preprocessed(pngs, artifacts.bundle)
    served, batches = runtimes.served(server, pngs)
    onnx, providers = runtimes.onnxruntime(artifacts.build_dir / "model.onnx", x)
    assert providers[0] == "CPUExecutionProvider"
    results = {
        "eager": runtimes.eager(artifacts.checkpoint_dir / "best.pt", x),
        "torchscript": runtimes.torchscript(artifacts.build_dir / "model.pt", x),
        "torchserve": served,
        "onnxruntime": onnx,
    }
    assert len(pngs) >= 200
    maxima = runtimes.agreement(results)
    for pair, value in maxima.items():
        report(f"CPU parity, {len(pngs)} images, sequential: {pair}: max |dp| = {value:.3g}")
    accuracy = (results["eager"].argmax(1) == labels).mean()
    assert accuracy > 0.75, "the test model should have learned something"


def test_batched_serving_agrees_with_eager(artifacts, server, test_pngs):
    pngs, _ = test_pngs
    x = runtimes.preprocessed(pngs, artifacts.bundle)
    served, batches = runtimes.served(server, pngs, concurrency=16)
    assert max(batches) > 1, "concurrent requests should have been batched by TorchServe"
    maxima = runtimes.agreement({"eager": runtimes.eager(artifacts.checkpoint_dir / "best.pt", x),
                                 "torchserve (batched)": served})
    report(f"CPU parity, {len(pngs)} images, 16 concurrent clients, batch sizes "
           f"{sorted(set(batches))}: max |dp| = {max(maxima.values()):.3g}")
