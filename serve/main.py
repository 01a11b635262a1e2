"""Serve the archive with TorchServe from the repository root.

    python -m serve start             torchserve --start --ncs --ts-config config.properties,
                                      then wait for a READY worker and print how to call it
    python -m serve predict IMAGE...  POST each image with the inference key; prints the answer
    python -m serve status            the model's workers
    python -m serve stop              torchserve --stop
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from serve.client import MODEL_NAME, Server, ServerError, content_type_of
from serve.process import torchserve_command

ROOT = Path(__file__).resolve().parent.parent


def start(args, server: Server) -> None:
    mar = ROOT / "model_store" / f"{MODEL_NAME}.mar"
    if not mar.exists():
        raise SystemExit(f"{mar} is missing: run `make archive` first")
    command = [torchserve_command(), "--start", "--ncs", "--ts-config", str(args.config)]
    print("[serve] " + " ".join(command[1:]).replace(str(ROOT) + "/", ""))
    # The Java process inherits the launcher's stdout: a pipe here would never close, so its
    # console output goes to a file beside TorchServe's own logs.
    (ROOT / "logs").mkdir(exist_ok=True)
    console = ROOT / "logs" / "torchserve-console.log"
    with open(console, "w") as out:
        returncode = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    said = console.read_text()
    if returncode != 0 or "already running" in said:
        raise SystemExit(f"[serve] torchserve --start failed: {said.strip()[-2000:]}")
    description = server.wait_until_ready(timeout=args.timeout)
    worker = next(w for w in description["workers"] if w["status"] == "READY")
    print(f"[serve] {MODEL_NAME} is READY (worker pid {worker['pid']}, gpu {worker['gpu']}, "
          f"batch size {description['batchSize']}, max delay {description['maxBatchDelay']} ms)")
    print("[serve] call it with the inference key from key_file.json:\n"
          "  TOKEN=$(python3 -c \"import json; print(json.load(open('key_file.json'))['inference']['key'])\")\n"
          f"  curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/octet-stream' "
          f"--data-binary @image.png {server.inference_url}/predictions/{MODEL_NAME}\n"
          "  or: make predict IMG=image.png        stop it with: make stop")


def predict(args, server: Server) -> int:
    failures = 0
    for path in args.images:
        response = server.predict(Path(path).read_bytes(), content_type_of(path))
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else response.text
        if response.status_code == 200 and not args.json:
            top = body["probabilities"][body["label"]]
            print(f"{path}: {body['class']} (label {body['label']}, p={top:.4f})")
        else:
            print(f"{path}: HTTP {response.status_code} {json.dumps(body)}" if response.status_code != 200
                  else json.dumps(body))
        failures += response.status_code != 200
    return 1 if failures else 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("start", "stop", "status", "predict"))
    p.add_argument("images", nargs="*", help="image files for predict")
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY")
    p.add_argument("--json", action="store_true", help="print the full JSON answers")
    args = p.parse_args(argv)
    server = Server.from_config(args.config, ROOT)
    try:
        if args.command == "start":
            start(args, server)
        elif args.command == "stop":
            subprocess.run([torchserve_command(), "--stop"], cwd=ROOT, check=False)
        elif args.command == "status":
            print(json.dumps(server.describe(), indent=2))
        else:
            if not args.images:
                raise SystemExit("predict needs image paths: python -m serve predict IMAGE...")
            sys.exit(predict(args, server))
    except ServerError as error:
        raise SystemExit(f"[serve] {error}")
    except OSError as error:  # connection refused, missing image file
        raise SystemExit(f"[serve] {error}")
