#!/bin/sh
# TorchServe in the foreground from its own writable directory (logs/ go there). tini, PID 1,
# hands SIGTERM to the whole process group: the Python launcher does not forward it to Java.
set -e
cd /app/run
exec torchserve --start --foreground --ncs --ts-config /app/config.properties
