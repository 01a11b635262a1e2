"""The page's proxy (`python -m web`, web/server.py) in front of a real TorchServe: chunked bodies
are read within the body limit, malformed requests are refused with 400 and never blamed on
TorchServe. Raw sockets and curl, so that nothing tidies the request on its way."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from http.server import ThreadingHTTPServer

import pytest

from contract.preprocessing import MAX_BODY_BYTES
from web.server import PageHandler

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]


@pytest.fixture(scope="module")
def proxy(server):
    """The page's request handler on a free loopback port, proxying to the test TorchServe."""
    handler = type("Handler", (PageHandler,), {"routes": {}, "torchserve": server, "quiet": True})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def exchange(port: int, raw: bytes) -> tuple[int, dict]:
    """Send `raw` as it is, read the one answer: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body)


def request(body: bytes, headers: list[str]) -> bytes:
    return ("POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(h + "\r\n" for h in headers)
            + "\r\n").encode("latin-1") + body


def chunked(data: bytes, size: int = 1000) -> bytes:
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_a_chunked_body_is_answered_like_the_same_body_with_a_length(proxy, test_pngs):
    png = test_pngs[0][0]
    plain = exchange(proxy, request(png, ["Content-Type: image/png", f"Content-Length: {len(png)}"]))
    streamed = exchange(proxy, request(chunked(png, 100), ["Content-Type: image/png", "Transfer-Encoding: chunked"]))
    assert plain[0] == streamed[0] == 200, (plain, streamed)
    assert streamed[1]["probabilities"] == plain[1]["probabilities"]
    with_extension = png[:50], png[50:]
    body = b"".join(b"%x;name=value\r\n%s\r\n" % (len(p), p) for p in with_extension) + b"0\r\nX-Trailer: 1\r\n\r\n"
    assert exchange(proxy, request(body, ["Content-Type: image/png", "Transfer-Encoding: chunked"]))[0] == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_upload_from_stdin(proxy, test_pngs):
    """`curl -T -` sends stdin chunked, as a browser's fetch with a stream body does."""
    png = test_pngs[0][0]
    result = subprocess.run(["curl", "-sS", "-X", "POST", "-T", "-", "-H", "Content-Type: image/png",
                             "-w", "\n%{http_code}", f"http://127.0.0.1:{proxy}/predict"],
                            input=png, capture_output=True, timeout=60)
    body, _, status = result.stdout.rpartition(b"\n")
    assert status == b"200", (result.stdout, result.stderr)
    assert json.loads(body)["label"] in range(10)


def test_chunked_bodies_meet_the_same_limit_and_form(proxy):
    status, answer = exchange(proxy, request(chunked(b"\0" * (MAX_BODY_BYTES + 1), 65536), ["Transfer-Encoding: chunked"]))
    assert status == 413 and f"{MAX_BODY_BYTES}-byte limit" in answer["error"]
    one_huge_chunk = b"%x\r\n" % (MAX_BODY_BYTES * 64) + b"\0" * 1000
    assert exchange(proxy, request(one_huge_chunk, ["Transfer-Encoding: chunked"]))[0] == 413
    for bad in (b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nabc", b"3\r\nabcXY0\r\n\r\n", b"-3\r\nabc\r\n0\r\n\r\n",
                b"3\r\nabc\r\n"):
        status, answer = exchange(proxy, request(bad, ["Transfer-Encoding: chunked"]))
        assert status == 400 and "chunked" in answer["error"], (bad, status, answer)
    status, answer = exchange(proxy, request(b"abc", ["Transfer-Encoding: chunked", "Content-Length: 3"]))
    assert status == 400 and "not both" in answer["error"]
    assert exchange(proxy, request(b"abc", ["Transfer-Encoding: gzip, chunked"]))[0] == 501
    status, answer = exchange(proxy, request(b"", []))
    assert status == 411 and "Content-Length" in answer["error"]


def test_malformed_headers_are_the_clients_fault(proxy, test_pngs):
    png = test_pngs[0][0]
    length = f"Content-Length: {len(png)}"
    for headers in (["X-Framing: on", " off", length],  # an obs-folded line
                    ["Content-Type: image/png", "\tfolded", length],
                    ["Content-Type: image/\x01png", length],
                    ["Bad Header: x", length],
                    ["no colon at all", length]):
        status, answer = exchange(proxy, request(png, headers))
        assert status == 400 and "TorchServe" not in answer["error"], (headers, status, answer)
        assert "header" in answer["error"]
    status, answer = exchange(proxy, b"POST /predict HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 400 and answer["status"] == 400
    # the proxy and TorchServe still serve
    assert exchange(proxy, request(png, ["Content-Type: image/png", length]))[0] == 200
