"""The JSON that every runtime answers, built once.

A prediction: {"label": int, "class": str, "probabilities": [floats in class order],
               "framing": {"mode": ..., "applied": bool, ...}} (what framing did; optional).
An error:     {"error": "what was wrong and what to send", "status": HTTP status}.
Bodies are strict JSON: NaN or infinity would be refused (ValueError) rather than written.
"""
from __future__ import annotations

import json

import numpy as np


def prediction(probabilities: np.ndarray, classes: list[str], framing: dict | None = None) -> dict:
    """One image's probabilities (float32 or float64, class order) -> the response object;
    `framing`, when given, says how the input was framed (contract/framing.py)."""
    label = int(np.argmax(probabilities))
    # float32 -> Python float is exact, and json writes the shortest round-trip repr
    answer = {"label": label, "class": classes[label], "probabilities": [float(p) for p in probabilities]}
    if framing is not None:
        answer["framing"] = framing
    return answer


def error(message: str, status: int) -> dict:
    return {"error": message, "status": status}


def dumps(obj) -> str:
    """Strict JSON text (no NaN/Infinity tokens, which strict parsers reject)."""
    return json.dumps(obj, allow_nan=False)
