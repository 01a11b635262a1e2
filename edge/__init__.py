"""Edge stage: a torch-free onnxruntime predictor, `python -m edge IMAGE_OR_DIR...`.

Imports only onnxruntime, numpy, Pillow, the standard library and the torch-free `contract`
package, so it runs where PyTorch is not installed.
"""
