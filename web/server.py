"""A small static server for the draw-or-drop page, and a same-origin proxy to TorchServe.

GET  /                    the page (web/index.html and its modules)
GET  /ort/<file>          onnxruntime-web's WASM build, from web/node_modules (npm ci; no CDN)
GET  /model/model.onnx    the exported model and the bundle.json beside it (--build DIR)
GET  /model/bundle.json
POST /predict             the request body (by Content-Length, or chunked within the same limit)
                          and the X-Framing header, sent on to TorchServe's
                          /predictions/<model> with the inference key; only TorchServe's status
                          and JSON body come back

The key is read server-side from TorchServe's key_file.json on every call (serve.client.Server)
and never reaches the page. The server listens on loopback only and answers only requests whose
Host is a loopback name, so that another site cannot reach the proxy through DNS rebinding.
"""
from __future__ import annotations

import ipaddress
import json
import re
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


MAX_CHUNK_LINE = 4096  # a chunk-size line or a trailer
MAX_TRAILER_LINES = 32
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\uffff]*")  # visible characters, spaces, tabs


class ClientError(ValueError):
    """The request itself is at fault; `status` is the HTTP code to answer."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _too_large(length: int) -> ClientError:
    return ClientError(f"body of {length} bytes exceeds the {MAX_BODY_BYTES}-byte limit; send a smaller image", 413)


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
            body = self._read_body()
        except ClientError as error:
            self.close_connection = True  # what is left of the body cannot be trusted as a request
            return self._send_json(error.status, responses.error(str(error), error.status))
        status, answer = self._ask_torchserve(body)
        self._send(status, answer, "application/json")

    def parse_request(self) -> bool:
        """The request line and headers, refusing malformed header lines with 400: a folded
        (obs-fold) or control-character value would otherwise travel on to TorchServe, or fail
        there and be blamed on it."""
        if not super().parse_request():
            return False
        bad = [name for name, value in self.headers.items()
               if not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value)]
        if bad or self.headers.defects:
            self.close_connection = True
            what = f"header {bad[0]!r}" if bad else "header block"
            self._send_json(400, responses.error(
                f"malformed {what}: send each header on one line as `Name: value` (no folded lines, "
                "no control characters)", 400))
            return False
        return True

    def _read_body(self) -> bytes:
        """The body by its Content-Length or, chunked, within the same MAX_BODY_BYTES limit."""
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None:
            if self.headers.get("Content-Length") is not None:
                raise ClientError("send either Content-Length or Transfer-Encoding, not both", 400)
            if coding.strip().lower() != "chunked":
                raise ClientError(f"Transfer-Encoding {coding!r} is not supported: send the body "
                                  "chunked or with a Content-Length", 501)
            return self._read_chunked()
        text = self.headers.get("Content-Length")
        if text is None:
            raise ClientError("send the image with a Content-Length or chunked", 411)
        if not text.strip().isdigit():
            raise ClientError("send the image with a valid Content-Length", 400)
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise _too_large(length)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ClientError(f"the body ended after {len(body)} of {length} bytes", 400)
        return body

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
            size_text = line.split(b";", 1)[0].strip()
            if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\n") or not _CHUNK_SIZE.fullmatch(size_text):
                raise ClientError("malformed chunked body: each chunk starts with its size in hex on a line", 400)
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY_BYTES:
                raise _too_large(len(body) + size)
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise ClientError("malformed chunked body: a chunk is shorter than its size says", 400)
            body += chunk
        for _ in range(MAX_TRAILER_LINES):  # trailers, read and dropped; an empty line ends them
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return bytes(body)
            if not line or len(line) > MAX_CHUNK_LINE:
                break
        raise ClientError("malformed chunked body: no end after the last chunk", 400)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a bad request line, too many headers) as the same JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a request line it could not read: answer 1.0
            self.request_version = "HTTP/1.0"
        text = message or self.responses.get(code, ("error",))[0]
        self._send_json(code, responses.error(f"{text}: send a well-formed HTTP/1.1 request", code))

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
        except requests.exceptions.InvalidHeader as error:  # the client's header, not TorchServe
            return 400, _json(responses.error(f"a header cannot be passed on ({error}): send plain "
                                              "Content-Type and X-Framing values", 400))
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

