#!/bin/sh
# TorchServe in the foreground from its own writable directory (logs/ go there). tini, PID 1,
# hands SIGTERM to the whole process group: the Python launcher does not forward it to Java.
#   entrypoint.sh        TorchServe (the default)
#   entrypoint.sh oip    the Open Inference Protocol (KServe's ModelServer on the archive's
#                        model.onnx) on KServe's ports: REST 8080, gRPC 8081. It verifies the
#                        archive against $MNIST_SIGNING_PUBLIC_KEY at every start.
set -e
if [ "${1:-}" = oip ]; then
    shift
    cd /app
    exec /opt/venv-oip/bin/python -m oip serve --host 0.0.0.0 --http-port 8080 --grpc-port 8081 \
        --model-store /app/model_store "$@"
fi
cd /app/run
exec torchserve --start --foreground --ncs --ts-config /app/config.properties
