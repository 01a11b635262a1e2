"""Export: the files, the contract, the archive, and the refusal of a model that does not match."""
import json
import zipfile

import numpy as np
import onnx
import pytest

from contract.onnx_session import open_session, run_log_probs
from export.convert import ExportMismatch, compare
from contract.bundle import BundleError, sha256_file, verify_file


@pytest.mark.slow
def test_onnx_is_one_file_with_a_dynamic_batch(artifacts):
    path = artifacts.build_dir / "model.onnx"
    assert not path.with_name("model.onnx.data").exists()
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 18
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    session = open_session(str(path))
    for batch in (1, 3, 64):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28), dtype=np.float32)
        assert run_log_probs(session, x).shape == (batch, 10)


@pytest.mark.slow
def test_bundle_json_is_the_contract(artifacts):
    bundle = artifacts.bundle
    assert bundle["model_name"] == "mnist" and bundle["dataset"] == "fashion-mnist"
    assert len(bundle["classes"]) == 10
    assert {k: bundle["input"][k] for k in ("channels", "height", "width")} == {"channels": 1, "height": 28, "width": 28}
    checkpoint = artifacts.checkpoint_dir / "best.pt"
    assert bundle["checkpoint"]["sha256"] == sha256_file(checkpoint)
    assert 0 < bundle["checkpoint"]["test_accuracy"] <= 1 and bundle["checkpoint"]["epoch"] >= 1
    for name in ("model.pt", "model.onnx"):
        assert bundle["files"][name]["sha256"] == sha256_file(artifacts.build_dir / name)
    assert bundle["export_check"]["images"] >= 200
    assert bundle["export_check"]["onnx_max_abs_dp"] <= 1e-5


@pytest.mark.slow
def test_a_changed_file_no_longer_verifies(artifacts, tmp_path):
    copy = tmp_path / "model.onnx"
    copy.write_bytes((artifacts.build_dir / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(BundleError, match="changed after export"):
        verify_file(artifacts.bundle, tmp_path, "model.onnx")


def test_mismatching_export_fails_with_the_numbers():
    reference = np.log(np.full((4, 10), 0.1))
    candidate = reference.copy()
    candidate[2, 3] = np.log(0.1 + 3e-5)
    with pytest.raises(ExportMismatch, match=r"max \|dp\| 3e-05"):
        compare("TorchScript", reference, candidate)
    assert compare("TorchScript", reference, reference) == 0


@pytest.mark.slow
def test_archive_holds_model_handler_preprocessing_contract_and_config(artifacts):
    with zipfile.ZipFile(artifacts.mar) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        packed_bundle = json.loads(mar.read("bundle.json"))
    assert {"model.pt", "mnist_handler.py", "contract/preprocessing.py", "contract/bundle.py",
            "bundle.json", "model-config.yaml"} <= names
    assert manifest["model"]["serializedFile"] == "model.pt"
    assert manifest["model"]["handler"] == "mnist_handler.py"
    assert packed_bundle == artifacts.bundle


@pytest.mark.slow
def test_samples_are_real_test_images(artifacts):
    samples = sorted((artifacts.build_dir / "samples").glob("*.png"))
    assert len(samples) == 5 and samples[0].name == "test0000-ankle-boot.png"
