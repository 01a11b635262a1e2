"""Serve the draw-or-drop page: `python -m web [--port 8090] [--build build]`.

Open http://127.0.0.1:8090/, draw a digit or an object, or drop an image file: the page runs
build/model.onnx in the browser with onnxruntime-web (WASM, served from web/node_modules, so it
works offline). With TorchServe running (`make serve` from the repository root), tick "Also ask
TorchServe" to see the server's answer beside the browser's; this process adds the inference key.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from contract.paths import ROOT
from serve.client import Server
from web.server import SetupError, make_server



def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m web", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8090, help="0 picks a free port (printed)")
    p.add_argument("--host", default="127.0.0.1", help="a loopback address; nothing else is allowed")
    p.add_argument("--build", type=Path, default=ROOT / "build", help="directory with model.onnx and bundle.json")
    p.add_argument("--torchserve-config", type=Path, default=ROOT / "config.properties",
                   help="TorchServe's config.properties: where its inference API listens")
    p.add_argument("--torchserve-dir", type=Path, default=ROOT,
                   help="the directory TorchServe was started from (its key_file.json is there)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    args = p.parse_args(argv)

    torchserve = Server.from_config(args.torchserve_config, args.torchserve_dir)
    try:
        server = make_server(args.build, args.host, args.port, torchserve, args.quiet)
    except SetupError as error:
        raise SystemExit(f"[web] {error}")
    except OSError as error:
        raise SystemExit(f"[web] cannot listen on {args.host}:{args.port} ({error}): pick another with PORT=...")
    host, port = server.server_address[:2]
    print(f"[web] serving http://{host}:{port}/ (model from {args.build}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
