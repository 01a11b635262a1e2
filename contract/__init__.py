"""The contract between export and every runtime, torch-free (numpy, Pillow, onnxruntime).

    bundle.py         bundle.json: read, check, write atomically; SHA-256 of files
    preprocessing.py  the one preprocessing function: request body -> normalized float32 array
    responses.py      the response and error JSON that the handler and the edge predictor answer
    onnx_session.py   onnxruntime sessions that run where they were asked to, TF32 off

Imported by export/, the TorchServe handler, edge/, serve/ and the tests, and packed into the
.mar beside the handler. It never imports torch, so the edge predictor runs without PyTorch.
"""

MODEL_NAME = "mnist"  # the REST path /predictions/mnist and model_store/mnist.mar

# "The same answer": max |dp| between any two runtimes' probabilities for the same image bytes,
# with identical argmax (docs/DESIGN.md, "Numerics").
TOLERANCE = 1e-5
