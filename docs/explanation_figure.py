"""Draw docs/explanations.png: images, TorchServe's explanations of them, and the edge CLI's.

    .venv/bin/python docs/explanation_figure.py [--build-dir build] [--model-store model_store]

Starts a private TorchServe on the archive (free ports, stopped at the end), asks
/explanations/mnist about the first images in <build-dir>/samples, computes the same
Integrated Gradients with the edge's onnxruntime code, and puts them side by side.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# A script run by path: the checkout must be importable before contract.paths can say where it is.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.bundle import load_bundle  # noqa: E402
from contract.onnx_session import check_model_matches_bundle, open_session  # noqa: E402
from contract.paths import ROOT  # noqa: E402
from contract.preprocessing import InputSpec, decode_image  # noqa: E402
from edge.explain import black_baseline, integrated_gradients, model_view, overlay_png  # noqa: E402
from serve.process import TorchServeProcess  # noqa: E402


def server_explanations(model_store: Path, pngs: list[bytes]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="explain-figure-") as workdir:
        with TorchServeProcess(model_store, Path(workdir)) as server:
            answers = []
            for png in pngs:
                started = time.perf_counter()
                response = server.explain(png, "image/png", timeout=120)
                seconds = time.perf_counter() - started
                if response.status_code != 200:
                    raise SystemExit(f"/explanations answered {response.status_code}: {response.text}")
                answer = response.json()
                detail = answer["explanation"]
                print(f"/explanations: {answer['class']} in {seconds * 1e3:.0f} ms; output {detail['output']:.6g}, "
                      f"baseline_output {detail['baseline_output']:.6g}, convergence_delta "
                      f"{detail['convergence_delta']:.3g}, map sum {sum(map(sum, answer['attributions'])):.6g}")
                answers.append(answer)
            return answers


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-dir", type=Path, default=ROOT / "build")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--edge-steps", type=int, default=64, help="the server's explain_steps, for a like comparison")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "explanations.png")
    args = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundle = load_bundle(args.build_dir)
    spec = InputSpec.from_bundle(bundle)
    samples = sorted((args.build_dir / "samples").glob("*.png"))[: args.images]
    if not samples:
        raise SystemExit(f"no images in {args.build_dir / 'samples'}: run `make export` first")
    pngs = [path.read_bytes() for path in samples]
    answers = server_explanations(args.model_store, pngs)
    session = open_session(str(args.build_dir / "model.onnx"), "cpu", 1)
    input_name = check_model_matches_bundle(session, bundle)
    baseline = black_baseline(spec)

    fig, axes = plt.subplots(len(pngs), 3, figsize=(7.5, 2.6 * len(pngs)), squeeze=False)
    for row, (png, answer) in zip(axes, zip(pngs, answers)):
        image = decode_image(png, spec)
        served = np.array(answer["attributions"])
        edge = integrated_gradients(session, input_name, image, baseline, answer["label"], args.edge_steps)
        detail = answer["explanation"]
        gap = detail["output"] - detail["baseline_output"]
        panels = [(model_view(image, spec), f"{answer['class']}, P = {detail['output']:.3f}"),
                  (overlay_png(model_view(image, spec), served),
                   f"TorchServe /explanations\nsum {served.sum():.3f} of {gap:.3f}"),
                  (overlay_png(model_view(image, spec), edge),
                   f"edge CLI (onnxruntime)\nsum {edge.sum():.3f} of {gap:.3f}")]
        for ax, (picture, title) in zip(row, panels):
            if isinstance(picture, bytes):
                picture = np.asarray(Image.open(io.BytesIO(picture)))
            ax.imshow(picture, cmap="gray", vmin=0, vmax=255)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"Integrated Gradients of the predicted class's probability, black baseline, "
                 f"{answers[0]['explanation']['steps']} steps\nred raises it, blue lowers it", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
