"""Serving stage: start TorchServe, wait for a READY worker, call it with the token.

`python -m serve start|stop|status|predict` (see serve/main.py); serve/client.py holds the
client side that `make predict`, the tests and the benchmark share.
"""
