"""The one load generator for every server `make bench` measures: wrk, with a Lua script that
POSTs the same body file over and over, and its output parsed into numbers."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

CORES = len(os.sched_getaffinity(0))

WRK_SCRIPT = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{content_type}"
wrk.headers["Authorization"] = "Bearer {token}"
"""


def write_script(path: Path, body: Path, content_type: str, token: str = "none") -> Path:
    """A wrk script that POSTs `body`; peers ignore the Authorization header TorchServe needs."""
    path.write_text(WRK_SCRIPT.format(body=body, content_type=content_type, token=token))
    return path


def parse_wrk(output: str) -> dict:
    def ms(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
        return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    percentiles = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", output, re.M))
    total = int(re.search(r"(\d+) requests in", output).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50_ms": ms(percentiles["50"]), "p99_ms": ms(percentiles["99"]), "requests": total,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    threads = 1 if connections < 8 else max(2, min(8, CORES // 4))
    result = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                             "--latency", "-s", str(script), url], capture_output=True, text=True, check=True)
    return parse_wrk(result.stdout)
