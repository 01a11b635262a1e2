#!/bin/sh
# The container's entrypoint. tini, PID 1, hands SIGTERM to the whole process group: the Python
# launcher does not forward it to Java.
#   entrypoint.sh        TorchServe (the default)
#   entrypoint.sh oip    the Open Inference Protocol (KServe's ModelServer on the archive's
#                        model.onnx) on KServe's ports: REST 8080, gRPC 8081, verified the same
#                        way at every start (the pinned digest, the signature, no rollback).
#
# TorchServe: verify, then become TorchServe, at every start of the container. `serve start
# --foreground` copies the archive into a private folder, makes the copy read-only and checks that
# copy: the digest pinned by EXPECTED_SHA256, the signature against the public key mounted from a
# secret ($MNIST_SIGNING_PUBLIC_KEY), the files and hashes; only then does it exec TorchServe
# (--foreground, from /app/run) on that copy. A failed check exits non-zero with the reason:
# TorchServe never runs, and the readiness probe never says ready.
set -e
if [ -z "${EXPECTED_SHA256:-}" ]; then
    echo "[entrypoint] refusing to serve: EXPECTED_SHA256 is empty; pin the archive's SHA-256" \
         "(sha256sum model_store/mnist.mar) in the Deployment's env" >&2
    exit 1
fi
cd /app  # python -m serve imports /app/serve and /app/export; TorchServe itself gets no PYTHONPATH
if [ "${1:-}" = oip ]; then
    shift
    exec /opt/venv-oip/bin/python -m oip serve --host 0.0.0.0 --http-port 8080 --grpc-port 8081 \
        --model-store /app/model_store --expect-sha256 "$EXPECTED_SHA256" "$@"
fi
exec python3 -m serve start --foreground --config /app/config.properties \
    --model-store /app/model_store --workdir /app/run --expect-sha256 "$EXPECTED_SHA256"
