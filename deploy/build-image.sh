#!/usr/bin/env bash
# Build the serving image offline: `make image` (CPU) or `make image VARIANT=gpu`.
#     deploy/build-image.sh [cpu|gpu] [TAG]        MAR=path/to/mnist.mar to bake another archive
# Assembles a small build context (the archive, the configuration, the probe and the contract,
# what torch to install) and builds it with the legacy builder (BuildKit's buildx is absent here).
# Files needed only while building (the torch wheel, the host's CA bundle) are served to the build
# over loopback instead of COPYed: a COPYed file stays in its layer even when a later step
# deletes it (the wheel would add 192 MB), and the legacy builder has no RUN --mount.
set -euo pipefail
variant=${1:-cpu}
tag=${2:-mnist-serve:$variant}
root=$(cd "$(dirname "$0")/.." && pwd)
mar=${MAR:-$root/model_store/mnist.mar}
[ -f "$mar" ] || { echo "$mar is missing: run \`make archive\` first" >&2; exit 1; }
# Only an archive that verifies is baked in: signature (against the configured public key), the
# files as TorchServe unpacks them, bundle.json's hashes, the self-test (export/verify.py). The
# container checks it again at every start (deploy/entrypoint.sh), against the digest pinned here
# and the public key mounted from a secret.
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
(cd "$root" && "$python" -m export verify "$mar") || {
    echo "refusing to build an image around $mar: it does not verify (see above)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "dockerd is not running: start it as root (dockerd &), or run \`make image-test\`, which does" >&2; exit 1; }
bash "$root/deploy/base-image.sh"

ctx=$(mktemp -d /var/tmp/mnist-image.XXXXXX)
files=$(mktemp -d /var/tmp/mnist-build-files.XXXXXX)
file_server=
trap '[ -n "$file_server" ] && kill "$file_server"; rm -rf "$ctx" "$files"' EXIT
mkdir -p "$ctx/app/model_store" "$ctx/app/serve" "$ctx/app/contract" "$ctx/app/export" "$files/wheels"
cat "$root/config.properties" "$root/deploy/container.properties" >"$ctx/app/config.properties"
cp "$root/metrics.yaml" "$root/deploy/entrypoint.sh" "$root/deploy/healthcheck.sh" "$ctx/app/"
cp "$root"/serve/{__init__,__main__,main,client,probe,process,trust}.py "$ctx/app/serve/"
# The verifier the entrypoint runs: export/verify.py and what it imports (not export/main.py: torch).
cp "$root"/export/{__init__,release,signing,verify}.py "$ctx/app/export/"
cp "$root"/contract/*.py "$ctx/app/contract/"
# verify's self-test loads the model through the format registry, as the handler does.
mkdir -p "$ctx/app/formats"
cp "$root"/formats/*.py "$ctx/app/formats/"
# The oip mode: its server and the archive verification it runs at every start.
mkdir -p "$ctx/app/oip"
cp "$root"/oip/{__init__,__main__,main,model,versions}.py "$ctx/app/oip/"
cp "$root/oip/requirements.txt" "$ctx/requirements-oip.txt"
cp "$mar" "$ctx/app/model_store/mnist.mar"
digest=$(sha256sum "$ctx/app/model_store/mnist.mar" | cut -d' ' -f1)
chmod 0644 "$ctx/app/model_store/mnist.mar"  # the image's non-root user reads it, whatever its mode here
cp "$root/deploy/Dockerfile" "$root/deploy/requirements-image.txt" "$ctx/"
# pip inside the build trusts what pip on this host trusts (a TLS-inspecting proxy's CA included).
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$files/ca.crt"

torch_range='torch>=2.11,<2.15'
case $variant in
cpu)
    # PyPI's Linux torch is the CUDA build (GBs of CUDA libraries). A CPU wheel lying in pip's
    # find-links on this host is used as it is; elsewhere PyTorch's CPU index provides one.
    wheel=$(ls ${PIP_FIND_LINKS:-/opt/wheels}/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$wheel" ]; then
        cp "$wheel" "$files/wheels/"
        basename "$wheel" | sed 's/^torch-\([^-]*\)-.*/torch==\1/' >"$ctx/torch.txt"
    else
        printf -- '--index-url https://download.pytorch.org/whl/cpu\n%s\n' "$torch_range" >"$ctx/torch.txt"
    fi
    # onnxruntime for an archive that serves model.onnx (make archive FORMAT=onnx)
    echo 'onnxruntime>=1.20' >"$ctx/extra.txt" ;;
gpu)
    echo "$torch_range" >"$ctx/torch.txt"            # PyPI's default Linux wheel: CUDA
    echo 'onnxruntime-gpu>=1.20' >"$ctx/extra.txt" ;;
*)  echo "usage: $0 [cpu|gpu] [TAG]" >&2; exit 2 ;;
esac
# A fixed port where it is free: the URL is part of the build step, and a new one would make
# Docker rebuild the venv layer every time.
port=$(python3 -c 'import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 47831))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$files" "$port" >/dev/null 2>&1 &
file_server=$!
for _ in $(seq 50); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/ca.crt')" 2>/dev/null && break; sleep 0.2; done
echo "building $tag ($variant; $(cat "$ctx/torch.txt" | tr '\n' ' '))"
DOCKER_BUILDKIT=0 docker build --network host -q --build-arg "FILES=http://127.0.0.1:$port" \
    --build-arg "EXPECTED_SHA256=$digest" -t "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes), serving mnist.mar SHA-256 $digest"
echo "pin it: EXPECTED_SHA256 in deploy/k8s/deployment.yaml = $digest; the public key goes in the secret mnist-signing-key"
