"""Edge stage: a torch-free onnxruntime predictor, `python -m edge IMAGE_OR_DIR...`.

Imports only onnxruntime, numpy, Pillow and the standard library (plus handlers.preprocessing
and handlers.bundle, which are themselves torch-free), so it runs where PyTorch is not installed.
"""
