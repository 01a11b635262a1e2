"""Vendor the part of KServe's InferenceService CRD schema that deploy/kserve/ uses.

    python deploy/kserve/extract_crd_schema.py CRD.yaml COMMIT > deploy/kserve/schema/inferenceservice-v1beta1.json

CRD.yaml: config/crd/full/serving.kserve.io_inferenceservices.yaml of kserve/kserve (2 MB: every
framework's predictor, explainer, transformer, canary). Kept: the v1beta1 openAPIV3Schema with
spec.predictor and the predictor fields a custom container uses; the framework specs (sklearn,
onnx, triton, ...) are left out, so a manifest that names one fails validation here, loudly.
"""
import json
import sys

import yaml

PREDICTOR_FIELDS_LEFT_OUT = ("huggingface", "lightgbm", "model", "onnx", "paddle", "pmml", "pytorch",
                             "sklearn", "tensorflow", "triton", "xgboost", "workerSpec")


def main(crd_path: str, commit: str) -> None:
    crd = yaml.safe_load(open(crd_path))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema = version["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    predictor = spec["properties"]["predictor"]
    for name in PREDICTOR_FIELDS_LEFT_OUT:
        predictor["properties"].pop(name)
    spec["properties"] = {"predictor": predictor}
    schema["properties"].pop("status", None)
    print(json.dumps({
        "$comment": (f"From kserve/kserve {commit}, config/crd/full/serving.kserve.io_inferenceservices.yaml "
                     f"({crd['metadata']['name']}, v1beta1), by deploy/kserve/extract_crd_schema.py: "
                     f"spec.predictor only, without {', '.join(PREDICTOR_FIELDS_LEFT_OUT)}"),
        "group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": "v1beta1",
        "openAPIV3Schema": schema}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
