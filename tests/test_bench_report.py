"""bench/: the report is written from the targets table, and the measuring modules measure."""
from __future__ import annotations

import dataclasses
import shutil

import pytest

from bench.report import targets
from bench.targets import TARGETS
from tests.helpers import ROOT, run_module

RUN = ROOT / "bench" / "results" / "vm-2026-11-26-run3.json"  # the run latest.md was written from


def test_the_committed_results_render_to_latest_md(tmp_path):
    from bench.report import load_results, write_markdown
    write_markdown(load_results(RUN), tmp_path / "latest.md")
    assert (tmp_path / "latest.md").read_text() == (ROOT / "bench" / "results" / "latest.md").read_text()


@pytest.mark.slow  # imports torch and matplotlib in a process of its own
def test_python_m_bench_render_writes_the_table_and_the_plot(tmp_path):
    copy = tmp_path / RUN.name
    shutil.copy(RUN, copy)
    run_module("bench", "--render", str(copy), timeout=300)
    assert copy.with_suffix(".md").read_text() == (ROOT / "bench" / "results" / "latest.md").read_text()
    assert copy.with_suffix(".png").stat().st_size > 10_000


def test_a_changed_threshold_changes_the_row_and_whether_it_is_met(monkeypatch):
    from bench.report import load_results
    results = load_results(RUN)
    before = {row[0]: row for row in targets(results)}
    onnx = next(row for name, row in before.items() if name.startswith("onnxruntime batch 1"))
    assert onnx[0].startswith("onnxruntime batch 1 <= 60 us") and onnx[2] == "yes"
    measured = results["inference"]["batch1"]["onnxruntime"]
    monkeypatch.setitem(TARGETS, "onnxruntime batch 1",
                        dataclasses.replace(TARGETS["onnxruntime batch 1"], threshold=measured / 2))
    after = next(row for row in targets(results) if row[0].startswith("onnxruntime batch 1"))
    assert after[0].startswith(f"onnxruntime batch 1 <= {measured / 2:g} us") and after[2] == "no"


def test_every_target_is_read_by_the_report():
    source = (ROOT / "bench" / "report.py").read_text()
    unread = [name for name in TARGETS if f"'{name}'" not in source and f'"{name}"' not in source]
    assert not unread, f"targets no report row reads: {unread}"


@pytest.mark.slow
def test_the_measuring_modules_measure_on_a_small_scale(artifacts):
    import torch

    from bench.accuracy import bench_framing
    from bench.inference import bench_inference
    from bench.step_breakdown import step_breakdown_on_one_thread
    from bench.training import load_training_data, time_fast_path

    inference = bench_inference(artifacts.build_dir, artifacts.checkpoint_dir / "best.pt")
    assert all(0 < us < 1e5 for us in inference["batch1"].values()), inference
    forms = bench_framing(artifacts.build_dir, 40)["forms"]
    assert set(forms) == {"dataset", "paper", "canvas", "phone"}
    assert forms["dataset"]["framing_auto"] > 0.5  # the suite's model is about 82% on the test set
    data = load_training_data()
    fast = time_fast_path(data, steps=100)
    assert fast["images_per_second"] > 0 and 0 < fast["test_accuracy_after_1_epoch"] <= 1
    threads = torch.get_num_threads()
    breakdown = step_breakdown_on_one_thread(data, threads)
    assert torch.get_num_threads() == threads
    parts = breakdown["microseconds"]
    assert parts["step"] >= max(v for k, v in parts.items() if k != "step") > 0
