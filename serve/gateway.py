"""The nginx gateway (deploy/gateway.nginx.conf) run locally by Debian's nginx in front of a
running TorchServe: `python -m serve.gateway start|stop` (make gateway / make stop-gateway).

    TORCHSERVE_URL             TorchServe's inference API (default: config.properties' address,
                               where `make serve` starts it); TORCHSERVE_MANAGEMENT_URL and
                               TORCHSERVE_METRICS_URL likewise
    GATEWAY_PORT               the gateway's inference port on 127.0.0.1 (default 8180);
                               GATEWAY_MANAGEMENT_PORT (8181), GATEWAY_METRICS_PORT (8182)

The gateway's own token is minted at start into <run dir>/gateway-token (mode 0600); clients send
`Authorization: Bearer <it>`. TorchServe's keys (key_file.json in the directory it runs from)
travel on from the gateway only. nginx keeps its pid, logs and temporary files in the private run
directory (default logs/gateway/), never in /var/lib/nginx or /run. `start` returns once the
gateway answers, `stop` once nginx has exited.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from serve.client import Server, ServerError, read_properties
from serve.process import private_directory
from contract.paths import ROOT

CONF = ROOT / "deploy" / "gateway.nginx.conf"
RUN_DIR = ROOT / "logs" / "gateway"
METRICS_HOSTS = ("localhost", "127.0.0.1")


def render(run: Path, token: str, listen: dict[str, str], upstreams: dict[str, list[str]],
           keys: dict[str, str] | None = None, hosts=METRICS_HOSTS) -> str:
    """The configuration with its placeholders filled: `listen` and `upstreams` by role
    ("inference", "management", "metrics"), `keys` TorchServe's own (absent: token auth off)."""
    keys = keys or {}
    values = {
        "RUN": str(run), "TOKEN": token,
        "LISTEN": listen["inference"], "MANAGEMENT_LISTEN": listen["management"],
        "METRICS_LISTEN": listen["metrics"],
        "PORT": _port(listen["inference"]), "MANAGEMENT_PORT": _port(listen["management"]),
        "METRICS_PORT": _port(listen["metrics"]),
        "UPSTREAMS": _servers(upstreams["inference"]),
        "MANAGEMENT_UPSTREAMS": _servers(upstreams["management"]),
        "METRICS_UPSTREAMS": _servers(upstreams["metrics"]),
        "UPSTREAM_KEY": f"Bearer {keys['inference']}" if keys.get("inference") else "",
        "MANAGEMENT_KEY": f"Bearer {keys['management']}" if keys.get("management") else "",
        "HOSTS": " ".join(f"{name} 1;" for name in hosts),
    }
    text = CONF.read_text()
    for name in sorted(values, key=len, reverse=True):  # @MANAGEMENT_PORT@ before @PORT@
        text = text.replace(f"@{name}@", values[name])
    return text


def _port(address: str) -> str:
    return address.rsplit(":", 1)[-1]


def _servers(netlocs: list[str]) -> str:
    return " ".join(f"server {netloc};" for netloc in netlocs)


def nginx(run: Path, *args: str) -> list[str]:
    return ["nginx", "-p", str(run), "-c", str(run / "nginx.conf"), *args]


def wait_until_answering(url: str, timeout: float = 20, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"nginx exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not answer at {url} within {timeout:.0f} s")
            time.sleep(0.1)


def start(args) -> None:
    if shutil.which("nginx") is None:
        raise SystemExit("[gateway] nginx not found: run `make install` (apt-get install nginx)")
    props = read_properties(ROOT / "config.properties")
    urls = {"inference": os.environ.get("TORCHSERVE_URL") or props["inference_address"],
            "management": os.environ.get("TORCHSERVE_MANAGEMENT_URL") or props["management_address"],
            "metrics": os.environ.get("TORCHSERVE_METRICS_URL") or props["metrics_address"]}
    ports = {"inference": os.environ.get("GATEWAY_PORT", "8180"),
             "management": os.environ.get("GATEWAY_MANAGEMENT_PORT", "8181"),
             "metrics": os.environ.get("GATEWAY_METRICS_PORT", "8182")}
    server = Server(urls["inference"], urls["management"], urls["metrics"], Path(args.torchserve_dir))
    keys = {}
    if (Path(args.torchserve_dir) / "key_file.json").is_file():
        try:
            keys = {kind: server.key(kind) for kind in ("inference", "management")}
        except ServerError as error:
            raise SystemExit(f"[gateway] {error}")
    run = private_directory(Path(args.run_dir))
    if (run / "nginx.pid").is_file():
        raise SystemExit(f"[gateway] already running ({run / 'nginx.pid'}): `make stop-gateway` first")
    token_file = run / "gateway-token"
    if not token_file.is_file():
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
        token_file.chmod(0o600)
    listen = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
    text = render(run, token_file.read_text().strip(), listen,
                  {role: [urlsplit(url).netloc] for role, url in urls.items()}, keys)
    (run / "nginx.conf").write_text(text)
    (run / "nginx.conf").chmod(0o600)  # it holds TorchServe's keys
    check = subprocess.run(nginx(run, "-t", "-q"), capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise SystemExit(f"[gateway] nginx refused the configuration: {check.stderr.strip()}")
    process = subprocess.Popen(nginx(run), start_new_session=True)  # daemonizes; pid in nginx.pid
    process.wait(timeout=30)
    try:
        wait_until_answering(f"http://{listen['inference']}/ping")
    except RuntimeError as error:
        raise SystemExit(f"[gateway] {error}; see {run / 'error.log'}")
    print(f"[gateway] http://{listen['inference']} (inference), http://{listen['management']} "
          f"(management), http://{listen['metrics']}/metrics, in front of {urls['inference']}; "
          f"token in {token_file}", flush=True)


def stop(args) -> None:
    run = Path(args.run_dir)
    pid_file = run / "nginx.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        print("[gateway] not running")
        return
    try:
        os.kill(pid, signal.SIGQUIT)  # graceful: finish requests, then exit
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + 30
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    print("[gateway] stopped")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of nobody we know: exited
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("start", "stop"))
    p.add_argument("--run-dir", default=str(RUN_DIR), help="nginx's private directory")
    p.add_argument("--torchserve-dir", default=str(ROOT),
                   help="the directory TorchServe runs from (its key_file.json)")
    args = p.parse_args(argv)
    (start if args.command == "start" else stop)(args)


if __name__ == "__main__":
    main()
