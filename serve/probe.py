"""Kubernetes-style probes for one TorchServe, as exit codes: 0 yes, 1 no, one line saying why.

    python -m serve.probe ready [--config config.properties] [--workdir DIR]
    python -m serve.probe live  [--config config.properties]

ready: the model has a READY worker (management API, with the management key when tokens are
on). TorchServe's /ping is no readiness signal: it answers Healthy while workers crash-loop, until
they have failed for the model's maxRetryTimeoutInSec (300 s by default), and before the model
has loaded at all. A tampered archive or a crash-looping worker is not ready.

live: the frontend answers HTTP on /ping, whatever it says about the model. Restarting the
container does not mend a bad model; it only hides it, so liveness asks for the process alone.

Run inside the container (exec probes, Docker's HEALTHCHECK): the management listener is on
loopback and the key file in TorchServe's working directory.
"""
from __future__ import annotations

import argparse
import sys

import requests

from contract import MODEL_NAME
from serve.client import Server, ServerError


def ready(server: Server, model: str, timeout: float) -> tuple[bool, str]:
    try:
        workers = server.describe(model, timeout=timeout)["workers"]
    except (requests.RequestException, ServerError) as error:
        return False, f"not ready: {error}"
    states = ", ".join(w["status"] for w in workers) or "no workers"
    return any(w["status"] == "READY" for w in workers), f"{model} workers: {states}"


def live(server: Server, timeout: float) -> tuple[bool, str]:
    try:  # with tokens on, /ping wants the inference key too (HTTP 400 without); either answers
        headers = server.auth("inference")
    except ServerError:
        headers = {}
    try:
        response = requests.get(f"{server.inference_url}/ping", headers=headers, timeout=timeout)
    except requests.RequestException as error:
        return False, f"frontend does not answer: {error.__class__.__name__}"
    return True, f"frontend answers (/ping: HTTP {response.status_code})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.probe", description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=["ready", "live"])
    parser.add_argument("--config", default="config.properties", help="TorchServe's config.properties")
    parser.add_argument("--workdir", help="where TorchServe was started (key_file.json); "
                                          "default: the config's directory")
    parser.add_argument("--model", default=MODEL_NAME)
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per HTTP call")
    args = parser.parse_args(argv)
    server = Server.from_config(args.config, args.workdir)
    ok, why = ready(server, args.model, args.timeout) if args.probe == "ready" else live(server, args.timeout)
    print(f"{args.probe}: {'yes' if ok else 'no'} ({why})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
