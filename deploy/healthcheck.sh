#!/bin/sh
# Docker's HEALTHCHECK for both modes of the image (Kubernetes uses the manifests' own probes).
# The mode is in PID 1's arguments (tini -g -- /app/entrypoint.sh [oip]):
#   TorchServe  python -m serve.probe ready: the model has a READY worker
#   oip         the protocol's own model readiness, GET /v2/models/mnist/ready on 8080
# The server in either mode listens only once the archive is verified: healthy means verified.
if tr '\0' '\n' </proc/1/cmdline | grep -qx oip; then
    exec /opt/venv-oip/bin/python -c '
import sys, urllib.request
try:
    answer = urllib.request.urlopen("http://127.0.0.1:8080/v2/models/mnist/ready", timeout=4)
    print(f"ready: yes (oip, HTTP {answer.status})")
except Exception as error:
    sys.exit(f"ready: no (oip: {error})")'
fi
exec env PYTHONPATH=/app python3 -m serve.probe ready --config /app/config.properties
