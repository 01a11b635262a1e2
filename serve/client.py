"""Talking to a running TorchServe: its addresses, its tokens, readiness, predictions.

TorchServe writes key_file.json into the directory it was started from. Clients read the keys
from there on every call (never cache them across calls: they rotate), and renew an expired
inference key with the API key, one renewal at a time (a lock beside the key file): a client that
finds the key already renewed by another uses the new one instead of rotating it again.

key_file.json holds all three keys, the API key among them. A client that should only predict gets
the inference key alone (`python -m serve token > inference.key`, then
`python -m serve predict --inference-key-file inference.key IMAGE`); it cannot renew the key.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from contract import MODEL_NAME


class ServerError(RuntimeError):
    """TorchServe is not running, not ready, or refused us; the message says what to do."""


def read_properties(path: Path | str) -> dict[str, str]:
    """A Java .properties file (key=value lines, # comments) as a dict."""
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def grpc_target(props: dict[str, str], api: str, default_port: int) -> str:
    """host:port of TorchServe's gRPC `api` ('inference' or 'management') as its config sets it."""
    host = props.get(f"grpc_{api}_address", "127.0.0.1")
    return f"{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{props.get(f'grpc_{api}_port', default_port)}"


def tokens_on(props: dict[str, str]) -> bool:
    """Whether TorchServe with these properties checks tokens (its default since 0.11)."""
    return props.get("disable_token_authorization", "false").lower() != "true"


@dataclass
class Server:
    """Where a TorchServe instance listens and where its key file lies."""
    inference_url: str
    management_url: str
    metrics_url: str
    workdir: Path  # the directory it was started from: key_file.json and logs/ are there
    # False where TorchServe runs with disable_token_authorization=true: the replicas of
    # deploy/, which only an authenticating gateway can reach.
    tokens: bool = True
    inference_key_file: Path | None = None  # the inference key alone, for clients without key_file.json
    grpc_inference_target: str = "127.0.0.1:7070"  # host:port of TorchServe's gRPC APIs
    grpc_management_target: str = "127.0.0.1:7071"

    @classmethod
    def from_config(cls, config: Path | str, workdir: Path | str | None = None) -> Server:
        config = Path(config)
        props = read_properties(config)
        return cls(props.get("inference_address", "http://127.0.0.1:8080"),
                   props.get("management_address", "http://127.0.0.1:8081"),
                   props.get("metrics_address", "http://127.0.0.1:8082"),
                   Path(workdir) if workdir else config.resolve().parent,
                   tokens_on(props),
                   grpc_inference_target=grpc_target(props, "inference", 7070),
                   grpc_management_target=grpc_target(props, "management", 7071))

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def key(self, kind: str) -> str:
        """The current 'inference', 'management' or 'API' key from key_file.json."""
        if kind == "inference" and self.inference_key_file is not None:
            try:
                return self.inference_key_file.read_text().strip()
            except OSError as error:
                raise ServerError(f"cannot read the inference key: {error}") from None
        try:
            return json.loads(self.key_file.read_text())[kind]["key"]
        except FileNotFoundError:
            raise ServerError(f"{self.key_file} not found: TorchServe is not running from "
                              f"{self.workdir} (start it with `make serve`)") from None
        except (KeyError, json.JSONDecodeError):
            raise ServerError(f"{self.key_file} has no {kind} key; was TorchServe started "
                              "with token authorization off?") from None

    def auth(self, kind: str) -> dict[str, str]:
        """The Authorization header for an 'inference' or 'management' call, if tokens are on."""
        return {"Authorization": f"Bearer {self.key(kind)}"} if self.tokens else {}

    def renew_key(self, kind: str, refused: str | None = None) -> str:
        """Mint a fresh inference or management key with the API key (TorchServe's /token API).

        `refused`: the key the server turned down. Renewals take a lock beside the key file; if
        the key changed meanwhile (another client renewed it), that key is returned as it is:
        concurrent renewals never rotate the key from under each other.
        """
        if kind == "inference" and self.inference_key_file is not None:
            raise ServerError(f"the server refused the inference key in {self.inference_key_file} "
                              "(expired or rotated): ask whoever runs the server for a fresh one "
                              "(`python -m serve token` there)")
        fd = os.open(self.workdir / ".key_file.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self.key(kind)
            if refused is not None and current != refused:
                return current
            response = requests.post(f"{self.management_url}/token", params={"type": kind},
                                     headers={"Authorization": f"Bearer {self.key('API')}"}, timeout=10)
            if response.status_code != 200:
                raise ServerError(f"renewing the {kind} key failed: HTTP {response.status_code} {response.text}")
            return self.key(kind)
        finally:
            os.close(fd)  # releases the lock

    def describe(self, model: str = MODEL_NAME, timeout: float = 5) -> dict:
        response = requests.get(f"{self.management_url}/models/{model}", timeout=timeout,
                                headers=self.auth("management"))
        if response.status_code != 200:
            raise ServerError(f"GET /models/{model}: HTTP {response.status_code} {response.text.strip()}")
        return response.json()[0]

    def wait_until_ready(self, model: str = MODEL_NAME, timeout: float = 180, process=None,
                         every_worker: bool = False) -> dict:
        """Block until `model` has a READY worker (every_worker: until all its workers are
        READY); return its description.

        Asks the management API, never /ping: /ping answers Healthy while workers crash-loop.
        `process` (a Popen), if given, is checked so that a dead server fails fast.
        """
        deadline, last, some_ready = time.monotonic() + timeout, "no answer yet", False
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ServerError(f"TorchServe exited with code {process.returncode}; see {self.workdir}/logs/")
            try:
                description = self.describe(model)
                ready = [w["status"] == "READY" for w in description["workers"]]
                if any(ready) and (all(ready) or not every_worker):
                    return description
                some_ready = any(ready)
                last = "workers: " + ", ".join(w["status"] for w in description["workers"])
            except (requests.ConnectionError, requests.Timeout, ServerError) as error:
                last = str(error)
            time.sleep(0.5)
        what = f"not every worker of {model} was READY" if some_ready else f"{model} had no READY worker"
        raise ServerError(f"{what} after {timeout:.0f} s ({last}); see {self.workdir}/logs/model_log.log")

    def predict(self, body: bytes, content_type: str = "application/octet-stream",
                model: str = MODEL_NAME, session: requests.Session | None = None,
                timeout: float = 30, headers: dict | None = None,
                params: dict | None = None, api: str = "predictions") -> requests.Response:
        """POST one request with the inference key, renewing the key once if it expired.

        The content type matters: a form type (urllib's and curl's default for POST data) makes
        TorchServe parse the body as a form. `headers` and `params` (the query string) are sent
        as given, e.g. headers={"X-Framing": "off"}.
        """
        post = (session or requests).post
        url = f"{self.inference_url}/{api}/{model}"
        for attempt in range(2):
            key = self.key("inference") if self.tokens else None
            sent = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {}),
                    "Content-Type": content_type}
            response = post(url, data=body, headers=sent, params=params, timeout=timeout)
            if (self.tokens and response.status_code == 400 and "InvalidKeyException" in response.text
                    and attempt == 0):
                self.renew_key("inference", refused=key)
                continue
            return response
        return response

    def explain(self, body: bytes, content_type: str = "application/octet-stream", **kwargs) -> requests.Response:
        """POST to /explanations: the prediction plus an attribution map for its label."""
        return self.predict(body, content_type, api="explanations", **kwargs)


def content_type_of(path: Path | str) -> str:
    suffix = Path(path).suffix.lower()
    return {".json": "application/json", ".png": "image/png", ".jpg": "image/jpeg",
            ".jpeg": "image/jpeg", ".gif": "image/gif", ".bmp": "image/bmp",
            ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}.get(
        suffix, "application/octet-stream")
