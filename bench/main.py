"""Benchmarks, each fast path beside its baseline in the same run: `python -m bench` (make bench).

1. training: the seed tutorial's loop (torchvision DataLoader, per-item ToTensor/Normalize) vs
   the tensor fast path, same model, batch 64 and recipe, three runs (the speedup's spread); then
   each recipe (`--recipes`, default seed and fast) to its end, with the training seconds it took
   to first reach 90% and 91% test accuracy;
2. in-process inference, batch 1 and 64: eager PyTorch, TorchScript, onnxruntime (1 thread);
3. REST: wrk against TorchServe as it ships (handlers/model-config.yaml and config.properties
   unchanged: one worker per core) with PNG and with JSON bodies, against variants (batching
   off/on, 1 and 2 workers), against the peers users pick instead (bench/peers.py: LitServe and
   BentoML serving the same ONNX model with the same preprocessing and the same JSON bodies),
   and against a minimal loopback HTTP server (the transport ceiling);
4. start-up: seconds from starting TorchServe to every worker READY;
5. formats: the archive served as TorchScript, pt2 (AOTInductor) and ONNX side by side: in-process
   latency at batch 1 and 64, REST throughput at concurrency 32, start-up, archive size
   (`python -m bench --formats-only --build DIR` runs this part alone).

Each part is a module of its own (training.py, step_breakdown.py, inference.py, accuracy.py,
serving.py, formats.py); the targets are a table (targets.py), which the report writer
(report.py) reads. Writes bench/results/<host>-<date>.json, bench/results/latest.md and
bench/results/latest.png.
The machine is shared and noisy: figures are medians, and comparisons are ratios within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from bench.accuracy import bench_framing
from bench.common import log, run
from bench.formats import bench_formats
from bench.inference import bench_inference
from bench.load import CORES
from bench.report import load_results, plot, write_markdown
from bench.protocols import bench_protocols
from bench.serving import bench_serving
from bench.step_breakdown import step_breakdown_on_one_thread
from bench.training import bench_recipes, bench_training_loops, load_training_data
from contract.paths import DATA_DIR, ROOT

RESULTS = ROOT / "bench" / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=6, help="wrk duration per point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--recipes", nargs="+", default=["seed", "fast"], help="train/main.py recipes to time")
    p.add_argument("--accuracy-targets", type=float, nargs="+", default=[0.90, 0.91],
                   help="test accuracies whose time to reach is reported per recipe")
    p.add_argument("--training-runs", type=int, default=3, help="runs of the seed loop vs fast path comparison")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--skip-peers", action="store_true", help="TorchServe alone, without LitServe and BentoML")
    p.add_argument("--peers-python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python",
                   help="the peers' venv interpreter (make peers-venv)")
    p.add_argument("--build", type=Path, default=None,
                   help="serve this existing export (with samples/) and skip training and inference")
    p.add_argument("--variants", nargs="+", default=["1x1", "16x1", "1x2", "16x2"],
                   help="TorchServe configurations as BATCHxWORKERS")
    p.add_argument("--frontend-threads", type=int, default=None,
                   help="TorchServe netty threads for the variants (default: TorchServe's, from the cores)")
    p.add_argument("--formats-only", action="store_true",
                   help="only compare the serving formats (5.); needs --build DIR exported with --format pt2")
    p.add_argument("--render", type=Path, default=None,
                   help="only rewrite the markdown table and plot from this results JSON")
    args = p.parse_args(argv)
    variants = [tuple(int(n) for n in v.split("x")) for v in args.variants]
    if args.render:
        results = load_results(args.render)
        write_markdown(results, args.render.with_suffix(".md"))
        plot(results, args.render.with_suffix(".png"))
        log(f"wrote {args.render.with_suffix('.md')} and {args.render.with_suffix('.png')}")
        return
    if not args.skip_serving and not shutil.which("wrk"):
        raise SystemExit("[bench] wrk not found: apt-get install wrk (make bench installs it where apt-get works)")
    import onnxruntime
    started = time.perf_counter()
    results = {"host": socket.gethostname(), "date": datetime.date.today().isoformat(),
               "cpu": platform.processor() or platform.machine(), "cores": CORES,
               "torch": str(torch.__version__), "onnxruntime": onnxruntime.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        build = args.build
        if build is None and args.formats_only:
            raise SystemExit("[bench] --formats-only needs --build DIR (an export made with --format pt2)")
        if build is None:
            data = load_training_data()
            results["training"] = bench_training_loops(data, CORES, args.training_runs)
            results["training"]["step_breakdown"] = step_breakdown_on_one_thread(data, CORES)
            del data  # the training images: not needed by the serving parts
            results["recipes"] = bench_recipes(work, CORES, args.recipes, args.accuracy_targets)
            checkpoint = results["recipes"]["recipes"][args.recipes[0]]["checkpoint"]
            build = work / "build"
            run("export", "build", "--format", "pt2", "--device", "cpu", "--checkpoint", checkpoint,
                "--build-dir", str(build), "--data-dir", str(DATA_DIR))
            results["inference"] = bench_inference(build, Path(checkpoint))
            results["framing"] = bench_framing(build)
        if not args.skip_serving and not args.formats_only:
            results["serving"] = bench_serving(build, work, args.seconds, args.concurrency, variants,
                                               args.frontend_threads, not args.skip_peers, args.peers_python)
        if not args.skip_serving and not args.formats_only:
            results["protocols"] = bench_protocols(build, work, args.concurrency[-1], args.seconds)
        if not args.skip_serving:
            results["formats"] = bench_formats(build, work, args.seconds)
    results["bench_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{results['host']}-{results['date']}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, RESULTS / "latest.md")
    plot(results, RESULTS / "latest.png")
    log(f"wrote {out}, {RESULTS / 'latest.md'}, {RESULTS / 'latest.png'} in {results['bench_seconds']:.0f} s")
