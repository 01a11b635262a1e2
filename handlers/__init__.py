"""TorchServe handler and the torch-free code it shares with export, edge and tests.

preprocessing.py  image bytes / JSON -> normalized float32 array (numpy + Pillow only)
bundle.py         bundle.json, the contract between export and every runtime
mnist_handler.py  the TorchServe handler (imports torch and ts)
"""
