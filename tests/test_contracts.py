"""The typed contracts (bundle.json, a checkpoint's settings), the format registry's import
direction and export's subcommands: fast, no training, no server."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from contract.bundle import FORMAT_VERSION, Bundle, BundleError, load_bundle, write_bundle
from tests.helpers import ROOT


def a_bundle(**changes) -> dict:
    """The smallest bundle.json the schema accepts."""
    bundle = {
        "format_version": FORMAT_VERSION, "model_name": "mnist", "architecture": "convnet",
        "dataset": "fashion-mnist", "classes": [str(i) for i in range(10)],
        "input": {"name": "input", "channels": 1, "height": 28, "width": 28, "mean": [0.28],
                  "std": [0.35], "framing": {"name": "fashion-mnist"}},
        "output": {"name": "log_probs"},
        "checkpoint": {"sha256": "0" * 64, "epoch": 1, "test_accuracy": 0.9},
        "files": {"model.pt": {"sha256": "0" * 64, "bytes": 1}},
        "formats": {"torchscript": {"file": "model.pt"}},
        "export_check": {"images": 256}, "onnx_opset": 18, "torch_version": "2", "created": "now",
        "self_test": {"image_png_base64": "", "label": 0, "probabilities": [0.1] * 10},
    }
    bundle.update(changes)
    return bundle


def test_a_bundle_round_trips_as_a_plain_dict(tmp_path):
    path = write_bundle(a_bundle(), tmp_path)
    on_disk = json.loads(path.read_text())
    assert on_disk == load_bundle(tmp_path) == {**a_bundle(), "edge": {}}  # the optional field's default
    assert Bundle.from_dict(on_disk).formats["torchscript"]["file"] == "model.pt"


@pytest.mark.parametrize("version", [1, 0, "2", None])
def test_a_bundle_of_an_older_version_is_refused_with_the_way_to_rebuild_it(tmp_path, version):
    (tmp_path / "bundle.json").write_text(json.dumps(a_bundle(format_version=version)))
    with pytest.raises(BundleError, match=r"format_version .* older export; rebuild it with `make export` "
                                          r"\(and the archive with `make archive`\)"):
        load_bundle(tmp_path)


def test_a_bundle_of_a_newer_version_is_refused(tmp_path):
    with pytest.raises(BundleError, match="newer export; update this checkout"):
        Bundle.from_dict(a_bundle(format_version=FORMAT_VERSION + 1))


@pytest.mark.parametrize("change,message", [
    ({"self_test": None}, "field 'self_test' is not a dict"),
    ({"onnx_opset": True}, "field 'onnx_opset' is not a int"),
    ({"model_version": "3"}, r"unknown field\(s\) model_version: add them to contract/bundle.py"),
    ({"formats": {"pt2": {"file": "model.pt2"}}}, "format 'pt2' names no file that bundle.json records"),
    ({"self_test": {"label": 0}}, "self_test lacks image_png_base64"),
])
def test_a_malformed_bundle_names_the_field(change, message):
    with pytest.raises(BundleError, match=message):
        Bundle.from_dict(a_bundle(**change))


def test_a_missing_field_is_refused_and_nothing_is_written(tmp_path):
    bundle = a_bundle()
    del bundle["formats"]
    with pytest.raises(BundleError, match="field 'formats' is missing; rebuild it with `make export`"):
        write_bundle(bundle, tmp_path)
    with pytest.raises(BundleError, match="input lacks framing"):
        write_bundle(a_bundle(input={"name": "input", "channels": 1, "height": 28, "width": 28,
                                     "mean": [0.0], "std": [1.0]}), tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_of_an_older_format_names_the_way_out(tmp_path):
    from train.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint

    save_checkpoint({"format_version": 1, "epoch": 3}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"older `python -m train` \(checkpoint format 1, this code "
                                              rf"reads {FORMAT_VERSION}\): train a new run with `make train`.*`make export`"):
        load_checkpoint(tmp_path / "best.pt")


def test_training_settings_are_checked_by_name():
    from train.main import parse_args
    from train.settings import SettingsError, TrainingSettings

    # flip and robust are the data set's to decide under the fast recipe: given here, as run() fills them
    settings = TrainingSettings.from_args(parse_args(["--recipe", "fast", "--no-flip", "--robust", "0"])).to_dict()
    assert settings["lr"] == 0.05 and settings["data_dir"] == "data"  # plain data: str, not Path
    assert TrainingSettings.from_dict(settings).to_dict() == settings
    for change, message in (({"lr": "0.1"}, "'lr' = '0.1' is not a float"),
                            ({"flip": 1}, "'flip' = 1 is not a bool"),
                            ({"augment": True}, r"unknown setting\(s\) augment")):
        with pytest.raises(SettingsError, match=message):
            TrainingSettings.from_dict({**settings, **change})
    del settings["shift"]
    with pytest.raises(SettingsError, match="setting 'shift' is missing"):
        TrainingSettings.from_dict(settings)


def test_imports_run_one_way():
    """formats/ ships in the archive: it must not need train/ or export/; export's modules do not
    import its CLI back."""
    code = ("import sys, formats, export.convert, export.verify\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'train' or m == 'export.main']\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_registry_knows_each_format_once():
    import formats
    from export.convert import BUILDERS

    assert set(formats.FORMATS) == set(BUILDERS) == {"torchscript", "pt2", "onnx"}
    assert [f.file for f in formats.FORMATS.values()] == ["model.pt", "model.pt2", "model.onnx"]
    assert [f.name for f in formats.FORMATS.values() if f.explainable] == ["torchscript"]
    with pytest.raises(BundleError, match="unknown model format 'tflite'"):
        formats.get("tflite")


def test_export_subcommands_take_only_their_own_options(capsys):
    from export.main import parse_args

    assert parse_args([]).command == "build"  # `python -m export` still builds
    assert parse_args(["--checkpoint", "x.pt"]).checkpoint.name == "x.pt"
    assert parse_args(["verify", "a.mar", "--allow-unsigned"]).archive.name == "a.mar"
    assert parse_args(["archive", "--format", "onnx"]).format == "onnx"
    for wrong in (["archive", "--checkpoint", "x.pt"], ["build", "--public-key", "k"], ["keys", "--build-dir", "b"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)
        assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    listed = capsys.readouterr().out
    assert all(f"    {name} " in listed for name in ("build", "archive", "quantize", "ort", "verify", "keys"))
