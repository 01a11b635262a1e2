"""The targets make bench is held to, as data: one row each, read by the report writer
(bench/report.py), which says for each whether this run met it."""
from __future__ import annotations

import operator
from dataclasses import dataclass

COMPARE = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    name: str
    compare: str  # ">=" or "<=": how the measured figure must stand to the threshold
    threshold: float
    unit: str
    computed: str  # how the figure compared is computed from the results

    def met(self, value: float) -> bool:
        return COMPARE[self.compare](value, self.threshold)


TARGETS = {t.name: t for t in (
    Target("training speedup", ">=", 4, "x",
           "fast path / seed loop images per second (medians of 100-step chunks), the lowest of the runs; "
           "batch 64, CPU, every core"),
    Target("training accuracy gap", "<=", 0.01, "",
           "|fast path - seed loop| test accuracy after one epoch, same recipe"),
    Target("recipe accuracy", ">=", 0.91, "",
           "the best recipe's test accuracy at the epoch that validation chose for best.pt"),
    Target("onnxruntime batch 1", "<=", 60, "us",
           "median microseconds per image, batch 1, 1 thread"),
    Target("onnxruntime vs eager", ">=", 4, "x",
           "eager PyTorch / onnxruntime microseconds per image, batch 1, 1 thread"),
    Target("real-world forms", "<=", 3, "points",
           "the worst form's accuracy below the data set's own form, framing auto, onnxruntime"),
    Target("shipped req/s", ">=", 3000, "req/s",
           "wrk against TorchServe as shipped, PNG bodies, at concurrency 32 (the largest measured if less)"),
    Target("shipped p99", "<=", 50, "ms", "wrk's p99 latency in that run"),
    Target("shipped non-2xx", "<=", 0, "responses", "non-2xx answers in that run"),
    Target("best peer", ">=", 2, "x",
           "TorchServe as shipped / the best peer's req/s, the same JSON bodies and concurrency"),
    Target("batching", ">=", 3, "x",
           "the best batched variant / the unbatched one with as many workers (else the fewest), req/s"),
    Target("GPU req/s", ">=", 20000, "req/s", "the best variant at the largest concurrency, on the GPU"),
    Target("GPU p99", "<=", 20, "ms", "that variant's p99 latency"),
    Target("GPU non-2xx", "<=", 0, "responses", "that variant's non-2xx answers"),
    Target("GPU concurrency", ">=", 128, "connections", "the concurrency the GPU figure is held to"),
    Target("GPU time to accuracy", "<=", 2, "s", "training seconds to 91.0% test accuracy on a GPU"),
)}
