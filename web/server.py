"""A small static server for the draw-or-drop page, and a same-origin proxy to TorchServe.

GET  /                    the page (web/index.html and its modules)
GET  /ort/<file>          onnxruntime-web's WASM build, from web/node_modules (npm ci; no CDN)
GET  /model/model.onnx    the exported model and the bundle.json beside it (--build DIR)
GET  /model/bundle.json
POST /predict             the request body (and the X-Framing header), sent on to TorchServe's
                          /predictions/<model> with the inference key; only TorchServe's status
                          and JSON body come back

The key is read server-side from TorchServe's key_file.json on every call (serve.client.Server)
and never reaches the page. The server listens on loopback only and answers only requests whose
Host is a loopback name, so that another site cannot reach the proxy through DNS rebinding.
"""
from __future__ import annotations

import ipaddress
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from contract import responses
from contract.bundle import BUNDLE_FILE, BundleError, load_bundle
from contract.preprocessing import MAX_BODY_BYTES
from serve.client import Server, ServerError

WEB_DIR = Path(__file__).resolve().parent
ORT_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"
MODEL_FILE = "model.onnx"
PAGE_FILES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js",
              "/preprocessing.js": "preprocessing.js", "/framing.js": "framing.js", "/style.css": "style.css"}
# The WASM-only build and the single-threaded-capable runtime it loads (no WebGPU, no WebGL).
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".wasm": "application/wasm", ".json": "application/json", ".onnx": "application/octet-stream"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}
FRAMING_HEADER = "X-Framing"  # the page's framing choice, passed on (the handler checks it)


class SetupError(RuntimeError):
    """Something the page needs is missing; the message says which command makes it."""


def check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SetupError(f"--host {host} is not a loopback address: the proxy holds TorchServe's "
                         "inference key. Put a TLS reverse proxy with its own authentication in front instead")


def static_routes(build_dir: Path) -> dict[str, Path]:
    """URL path -> file, every file the page may load; checked at start so that a missing piece
    fails with the command that makes it, not with a 404 in the browser."""
    missing = [name for name in ORT_FILES if not (ORT_DIST / name).is_file()]
    if missing:
        raise SetupError(f"onnxruntime-web is not installed ({ORT_DIST} lacks {', '.join(missing)}): "
                         "run `make install` (or `npm ci --prefix web`)")
    for name in (MODEL_FILE, BUNDLE_FILE):
        if not (build_dir / name).is_file():
            raise SetupError(f"{build_dir / name} not found: run `make export` (or pass --build DIR)")
    try:  # the page reads bundle.json as it is: one of another format version is refused here
        load_bundle(build_dir / BUNDLE_FILE)
    except BundleError as error:
        raise SetupError(str(error)) from None
    routes = {url: WEB_DIR / name for url, name in PAGE_FILES.items()}
    routes.update({f"/ort/{name}": ORT_DIST / name for name in ORT_FILES})
    routes.update({f"/model/{name}": build_dir / name for name in (MODEL_FILE, BUNDLE_FILE)})
    return routes


class PageHandler(BaseHTTPRequestHandler):
    routes: dict[str, Path] = {}
    torchserve: Server | None = None
    quiet = False
    timeout = 30  # seconds a client may take to send its request: a stalled one frees its thread

    def do_GET(self):
        if not self._host_is_loopback():
            return
        path = self.path.split("?", 1)[0]
        file = self.routes.get(path)
        if file is None:
            return self._send_json(404, responses.error(f"no such page: {path}", 404))
        body = file.read_bytes()
        self._send(200, body, CONTENT_TYPES.get(file.suffix, "application/octet-stream"))

    def do_POST(self):
        if not self._host_is_loopback():
            return
        if self.path != "/predict":
            return self._send_json(404, responses.error(f"no such endpoint: POST {self.path}", 404))
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers['Host']}":
            return self._send_json(403, responses.error(f"cross-origin request from {origin} refused", 403))
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return self._send_json(400, responses.error("send the image with a valid Content-Length", 400))
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._send_json(413, responses.error(
                f"body of {length} bytes exceeds the {MAX_BODY_BYTES}-byte limit; send a smaller image", 413))
        body = self.rfile.read(length)
        status, answer = self._ask_torchserve(body)
        self._send(status, answer, "application/json")

    def _ask_torchserve(self, body: bytes) -> tuple[int, bytes]:
        server = self.torchserve
        if server is None:
            return 503, _json(responses.error("no TorchServe configured: start the page with "
                                              "`python -m web --torchserve-dir DIR`", 503))
        try:
            framing = self.headers.get(FRAMING_HEADER)
            reply = server.predict(body, self.headers.get("Content-Type") or "application/octet-stream",
                                   headers={FRAMING_HEADER: framing} if framing else None)
            key = server.key("inference") if server.tokens else None
        except ServerError as error:
            return 503, _json(responses.error(str(error), 503))
        except requests.RequestException as error:
            return 502, _json(responses.error(f"TorchServe at {server.inference_url} did not answer "
                                              f"({type(error).__name__}): start it with `make serve`", 502))
        if key and key.encode() in reply.content:  # never let an echo of the key reach the page
            return 502, _json(responses.error("TorchServe's answer contained its key; withheld", 502))
        try:
            json.loads(reply.content)
        except ValueError:  # e.g. the frontend's empty 413: the page always gets JSON
            text = reply.text.strip()[:200] or "an empty body"
            return reply.status_code, _json(responses.error(
                f"TorchServe answered HTTP {reply.status_code} with {text}", reply.status_code))
        return reply.status_code, reply.content

    def _host_is_loopback(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        if host in LOOPBACK_NAMES:
            return True
        self._send_json(421, responses.error(f"Host {host!r} refused: open the page at http://127.0.0.1", 421))
        return False

    def _send_json(self, status: int, obj: dict) -> None:
        self._send(status, _json(obj), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a re-export must reach the page on reload
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)


def _json(obj: dict) -> bytes:
    return responses.dumps(obj).encode()


def make_server(build_dir: Path, host: str = "127.0.0.1", port: int = 8090,
                torchserve: Server | None = None, quiet: bool = False) -> ThreadingHTTPServer:
    check_loopback(host)
    handler = type("Handler", (PageHandler,), {"routes": static_routes(Path(build_dir)),
                                               "torchserve": torchserve, "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server

