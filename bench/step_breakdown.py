"""The profiling study of a fast-path training step: where its time goes, part by part."""
from __future__ import annotations

import statistics
import time

import torch

from bench.common import log
from bench.training import TrainingData, fast_path_model


def step_breakdown(data: TrainingData, steps: int = 300) -> dict:
    """Where a fast-path step's time goes, layer by layer: the median microseconds of each part
    over `steps` steps (batch 64, channels-last, the seed's SGD), on the threads set now.

    Timed with the wall clock between the forward calls and with gradient hooks in the backward
    pass, not with torch.profiler: under the profiler, max-pooling's backward looked like 0.4 ms
    of zero-filling on this host, and timed so it is 0.09 ms.
    """
    import torch.nn.functional as F

    from train.loop import epoch_order

    model, optimizer = fast_path_model()
    order = epoch_order(len(data.y_train), 1, 1)
    seen, parts = {}, {}

    def reached(name):
        def hook(_):
            seen[name] = time.perf_counter()
        return hook

    for step in range(steps + 30):  # the first 30 warm up
        batch = order[step * 64:(step + 1) * 64]
        x = data.x_train[batch]
        # train/model.py's forward, written out to be timed layer by layer
        t0 = time.perf_counter()
        conv1 = model.conv1(x)
        t1 = time.perf_counter()
        pool1 = F.max_pool2d(conv1, 2)
        t2 = time.perf_counter()
        relu1 = F.relu(pool1)
        conv2 = model.conv2(relu1)
        t3 = time.perf_counter()
        hidden = F.relu(model.fc1(torch.flatten(F.relu(F.max_pool2d(conv2, 2)), 1)))
        log_probs = F.log_softmax(model.fc2(hidden), dim=1)
        loss = F.nll_loss(log_probs, data.y_train[batch])
        t4 = time.perf_counter()
        if step == 0:  # the written-out forward must stay the model's
            with torch.no_grad():
                torch.testing.assert_close(log_probs, model(x))
        for name, tensor in (("conv1", conv1), ("pool1", pool1), ("relu1", relu1), ("conv2", conv2)):
            tensor.register_hook(reached(name))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t5 = time.perf_counter()
        optimizer.step()
        t6 = time.perf_counter()
        if step < 30:
            continue
        # a gradient hook runs when the gradient of its tensor is ready, i.e. when the backward of
        # the layer after it has finished
        for part, seconds in (("conv1 forward", t1 - t0), ("max-pool 1 forward", t2 - t1),
                              ("ReLU + conv2 forward", t3 - t2), ("rest of the forward (pool 2, fc, loss)", t4 - t3),
                              ("backward to conv2's output", seen["conv2"] - t4),
                              ("conv2 backward", seen["relu1"] - seen["conv2"]),
                              ("ReLU 1 backward", seen["pool1"] - seen["relu1"]),
                              ("max-pool 1 backward", seen["conv1"] - seen["pool1"]),
                              ("conv1 backward", t5 - seen["conv1"]), ("SGD step", t6 - t5), ("step", t6 - t0)):
            parts.setdefault(part, []).append(seconds * 1e6)
    medians = {part: statistics.median(values) for part, values in parts.items()}
    convolution = sum(v for k, v in medians.items() if k.startswith(("conv1", "conv2")))
    threads = torch.get_num_threads()
    log(f"training step breakdown ({threads} thread(s)): {medians['step']:.0f} us per step, convolutions "
        f"{100 * convolution / medians['step']:.0f}%")
    return {"threads": threads, "steps": steps, "microseconds": medians}


def step_breakdown_on_one_thread(data: TrainingData, threads: int) -> dict:
    """step_breakdown on one thread (the parts of one core's work), the `threads` set back after."""
    torch.set_num_threads(1)
    try:
        return step_breakdown(data)
    finally:
        torch.set_num_threads(threads)
