"""The Open Inference Protocol (KServe v2) over REST and gRPC: `python -m oip` (oip/main.py),
KServe's own ModelServer on the archive's model.onnx (oip/model.py)."""
