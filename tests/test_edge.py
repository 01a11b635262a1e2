"""The edge path: torch-free predictor, int8 quantization, ORT format."""
import json
import shutil

import numpy as np
import pytest

from contract.onnx_session import open_session, run_log_probs
from tests import runtimes
from tests.helpers import DATA_DIR, report, run_module, without_torch


@pytest.fixture(scope="module")
def edge_build(artifacts, tmp_path_factory):
    """A copy of the build with the int8 and ORT models added by the real commands."""
    build = tmp_path_factory.mktemp("edge") / "build"
    shutil.copytree(artifacts.build_dir, build)
    run_module("export", "quantize", "--build-dir", str(build), "--data-dir", str(DATA_DIR))
    run_module("export", "ort", "--build-dir", str(build))
    return build

@pytest.mark.slow
def test_predictor_runs_without_torch_and_matches_onnxruntime(artifacts, tmp_path, test_pngs):
    images = tmp_path / "images"
    images.mkdir()
    pngs, labels = test_pngs
    for i, png in enumerate(pngs[:100]):
        (images / f"{i:03d}.png").write_bytes(png)
    env = without_torch(tmp_path)
    probe = run_module("edge", "--help", env=env)
    assert "IMAGE_OR_DIR" in probe.stdout
    result = run_module("edge", str(images), "--model", str(artifacts.build_dir / "model.onnx"),
                        "--json", "--timing", env=env)
    answers = {answer["path"]: answer for answer in map(json.loads, result.stdout.splitlines())}
    assert len(answers) == 100 and "us/image" in result.stderr
    first = answers[str(images / "000.png")]
    assert set(first) == {"path", "label", "class", "probabilities", "framing"} and not first["framing"]["applied"]
    expected, _ = runtimes.onnxruntime(artifacts.build_dir / "model.onnx",
                                       runtimes.preprocessed(pngs[:100], artifacts.bundle))
    got = np.array([answers[str(images / f"{i:03d}.png")]["probabilities"] for i in range(100)])
    assert np.abs(got - expected).max() <= 1e-6


def test_torch_really_is_blocked(tmp_path):
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                            env={**os.environ, **without_torch(tmp_path)})
    assert result.returncode != 0 and "not available on this device" in result.stderr


@pytest.mark.slow
def test_unreadable_images_are_reported_and_the_rest_classified(artifacts, tmp_path, test_pngs):
    (tmp_path / "a.png").write_bytes(test_pngs[0][0])
    (tmp_path / "b.png").write_bytes(b"not an image")
    (tmp_path / "c.png").write_bytes(test_pngs[0][1])
    result = run_module("edge", str(tmp_path), "--model", str(artifacts.build_dir / "model.onnx"), check=False)
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and "1 of 3 images could not be read" in result.stderr
    assert lines[0].startswith(f"{tmp_path / 'a.png'}: ") and "error: " in lines[1] and "label" in lines[2]


@pytest.mark.slow
def test_any_file_is_reported_on_its_own_line_and_the_rest_classified(artifacts, tmp_path, test_pngs):
    """A huge (sparse, 10 GB) file, a pipe, a missing file, names with a line break or bytes that
    are not UTF-8: each gets its error on one line, at once, and the good images their answer."""
    import os
    good = tmp_path / "good.png"
    good.write_bytes(test_pngs[0][0])
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.truncate(10 * 10**9)  # reading it would take minutes and 10 GB: its size is checked first
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)  # reading a pipe nobody writes to would block forever
    forged = tmp_path / "x.png: Ankle boot (label 9, p=1.0000)\nz.png"
    forged.write_bytes(b"not an image")
    undecodable = os.fsdecode(bytes(tmp_path) + b"/\xff\xfe.png")
    with open(undecodable, "wb") as f:
        f.write(test_pngs[0][1])
    paths = [good, huge, pipe, tmp_path / "missing.png", forged, undecodable, good]
    result = run_module("edge", *map(str, paths), "--model", str(artifacts.build_dir / "model.onnx"),
                        check=False, timeout=60)
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and "4 of 7 images could not be read" in result.stderr, result.stderr
    assert len(lines) == 7, lines
    assert "label" in lines[0] and lines[0] == lines[6]
    assert "13 bytes" not in lines[1] and "10000000000 bytes exceeds" in lines[1]
    assert "not a regular file" in lines[2]
    assert "cannot read the file: No such file or directory" in lines[3]
    assert lines[4].startswith(str(tmp_path) + "/x.png: Ankle boot (label 9, p=1.0000)\\nz.png: error: ")
    assert "\\xff\\xfe.png: " in lines[5] and "label" in lines[5]
    json_lines = run_module("edge", *map(str, paths), "--json", "--model", str(artifacts.build_dir / "model.onnx"),
                            check=False, timeout=60).stdout.splitlines()
    assert [json.loads(line)["path"] for line in json_lines] == [str(p) for p in paths]


@pytest.mark.slow
def test_results_are_printed_as_each_batch_is_done(artifacts, tmp_path, test_pngs, monkeypatch):
    import io
    import sys
    from edge import main as edge_main
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(test_pngs[0][i])
    stdout, printed_before_read = io.StringIO(), []
    read = edge_main.read_image_file

    def read_and_count(path):
        printed_before_read.append(stdout.getvalue().count("\n"))
        return read(path)
    monkeypatch.setattr(edge_main, "read_image_file", read_and_count)
    monkeypatch.setattr(sys, "stdout", stdout)
    edge_main.main([str(tmp_path), "--batch-size", "1", "--model", str(artifacts.build_dir / "model.onnx")])
    assert printed_before_read == [0, 1, 2] and stdout.getvalue().count("\n") == 3


@pytest.mark.parametrize("arguments, words", [
    ([], "the following arguments are required: images"),
    (["x.png", "--batch-size", "0"], "0 is not a positive whole number"),
    (["x.png", "--threads", "two"], "'two' is not a whole number"),
    (["x.png", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_arguments_get_a_usage_error(arguments, words):
    result = run_module("edge", *arguments, check=False)
    assert result.returncode == 2 and "usage: python -m edge" in result.stderr and words in result.stderr


@pytest.mark.slow
def test_clear_errors_for_a_missing_model_and_a_mismatching_bundle(artifacts, tmp_path):
    result = run_module("edge", "x.png", "--model", str(tmp_path / "none.onnx"), check=False)
    assert result.returncode != 0 and "no model at" in result.stderr
    shutil.copy(artifacts.build_dir / "model.onnx", tmp_path / "model.onnx")
    bundle = dict(artifacts.bundle, input=dict(artifacts.bundle["input"], height=32))
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    result = run_module("edge", "x.png", "--model", str(tmp_path / "model.onnx"), check=False)
    assert result.returncode != 0 and "bundle.json says (1, 32, 28)" in result.stderr
    (tmp_path / "bundle.json").write_text(json.dumps(dict(artifacts.bundle, input=dict(artifacts.bundle["input"], name="pixels"))))
    result = run_module("edge", "x.png", "--model", str(tmp_path / "model.onnx"), check=False)
    assert result.returncode != 0 and "bundle.json says 'pixels'" in result.stderr


@pytest.mark.slow
def test_int8_model_keeps_accuracy(edge_build):
    bundle = json.loads((edge_build / "bundle.json").read_text())
    figures = bundle["edge"]["int8"]
    assert figures["test_images"] == 10000
    assert figures["accuracy_fp32"] - figures["accuracy_int8"] <= 0.005
    assert figures["argmax_agreement"] >= 0.99
    assert figures["bytes_int8"] < figures["bytes_fp32"] / 2
    assert bundle["files"]["model.int8.onnx"]["bytes"] == (edge_build / "model.int8.onnx").stat().st_size
    report(f"int8 (test model, CPU, 1 thread): accuracy {100 * figures['accuracy_int8']:.2f}% vs fp32 "
           f"{100 * figures['accuracy_fp32']:.2f}%, agreement {100 * figures['argmax_agreement']:.2f}%, "
           f"{figures['bytes_int8']} vs {figures['bytes_fp32']} bytes")


@pytest.mark.slow
def test_ort_format_model_matches_the_onnx_model(edge_build, test_pngs):
    from contract.bundle import verify_file
    bundle = json.loads((edge_build / "bundle.json").read_text())
    for name in ("model.ort", "model.required_operators.config"):
        verify_file(bundle, edge_build, name)
    x = runtimes.preprocessed(test_pngs[0], bundle)
    fp32 = run_log_probs(open_session(str(edge_build / "model.onnx")), x)
    ort = run_log_probs(open_session(str(edge_build / "model.ort")), x)
    assert np.abs(np.exp(fp32) - np.exp(ort)).max() <= 1e-5
    assert "Conv" in (edge_build / "model.required_operators.config").read_text()
