#!/usr/bin/env bash
# Smoke test of the serving image (`make image-test`): build it; started with a tampered archive
# mounted, without the public key, or with another signer's key, it must exit non-zero with the
# reason before TorchServe runs; run the way the Deployment does (non-root, read-only root file
# system, no capabilities, the public key mounted read-only), wait for Docker's HEALTHCHECK (the
# readiness probe) to say healthy, answer REST calls, expose metrics, stop cleanly.
# Starts dockerd when none runs (as root) and stops it again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${TAG:-mnist-serve:cpu}
sample=${IMG:-$(ls "$root"/build/samples/*.png 2>/dev/null | head -1 || true)}
[ -f "$sample" ] || { echo "no sample image: run \`make export\` (build/samples/) or pass IMG=file.png" >&2; exit 1; }
started=$SECONDS
dockerd_pid=
container=
cleanup() {
    [ -n "$container" ] && docker rm -f "$container" >/dev/null 2>&1 || true
    if [ -n "$dockerd_pid" ]; then kill "$dockerd_pid"; wait "$dockerd_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || ! command -v curl >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing docker.io and debootstrap (apt-get)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap curl >/dev/null
    else
        echo "needs Docker and debootstrap: sudo apt-get install docker.io debootstrap" >&2; exit 1
    fi
fi
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { echo "dockerd is not running and starting it needs root" >&2; exit 1; }
    dockerd >/tmp/image-test-dockerd.log 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail /tmp/image-test-dockerd.log >&2; exit 1; }
fi
fail() { echo "image-test FAILED: $*" >&2; [ -z "$container" ] || docker logs --tail 30 "$container" >&2 || true; exit 1; }

python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
# The trusted public key, as the Deployment mounts its secret: a root-owned 0444 file.
public_key=${MNIST_SIGNING_PUBLIC_KEY:-$HOME/.config/mnist-bundle/signing-key.pub}
[ -f "$public_key" ] || { echo "no public key at $public_key: run \`make keys\` and \`make archive\`" >&2; exit 1; }
keys=$(mktemp -d /var/tmp/mnist-image-test.XXXXXX)
trap 'cleanup; rm -rf "$keys"' EXIT
install -m 0444 "$public_key" "$keys/signing-key.pub"
# Another signer's key pair: their public key mounted, the archive is not theirs.
(cd "$root" && "$python" -c 'import sys; from pathlib import Path; from export.signing import create_key_pair
create_key_pair(Path(sys.argv[1]))' "$keys/stranger")
chmod 0444 "$keys/stranger/signing-key.pub"
# An archive whose handler was changed after signing: it would run its code at the first load.
(cd "$root" && "$python" - "${MAR:-$root/model_store/mnist.mar}" "$keys/tampered.mar" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        data = src.read(item)
        if item.filename == "mnist_handler.py":
            data += b"\nopen('/app/run/handler-ran', 'w').write('tampered code ran')\n"
        dst.writestr(item.filename, data)
PY
)
chmod 0444 "$keys/tampered.mar"
tampered_digest=$(sha256sum "$keys/tampered.mar" | cut -d' ' -f1)

bash "$root/deploy/build-image.sh" cpu "$tag"
run_flags=(--read-only --tmpfs /tmp --tmpfs /app/run:uid=10001,gid=10001 --cap-drop ALL --security-opt no-new-privileges)
key_mount=(-v "$keys/signing-key.pub:/etc/mnist-bundle/signing-key.pub:ro")
# Each refused start: exit status not 0, the reason in its output, and TorchServe never exec'd.
refused_start() {
    local name=$1 reason=$2; shift 2
    local out status mode=
    [ "${1:-}" != --oip ] || { mode=oip; shift; }
    out=$(timeout 120 docker run --rm "${run_flags[@]}" "$@" "$tag" $mode 2>&1) && status=0 || status=$?
    [ "$status" != 0 ] || fail "$name: the container started ($out)"
    [[ $out == *"$reason"* ]] || fail "$name: exit $status without the reason '$reason': $out"
    [[ $out != *"[serve] exec"* && $out != *"Torchserve version"* ]] || fail "$name: TorchServe ran: $out"
    echo "refused ($name): exit $status, $(grep -m1 -o 'refusing to serve: .\{0,110\}' <<<"$out" || echo "$out" | head -1)"
}
refused_start "tampered archive mounted, the image's pin" "not the pinned" "${key_mount[@]}" \
    -v "$keys/tampered.mar:/app/model_store/mnist.mar:ro"
refused_start "tampered archive mounted and pinned" "changed after signing" "${key_mount[@]}" \
    -v "$keys/tampered.mar:/app/model_store/mnist.mar:ro" -e "EXPECTED_SHA256=$tampered_digest"
refused_start "no public key mounted" "which does not exist"
refused_start "another signer's key" "not signed by the configured public key" \
    -v "$keys/stranger/signing-key.pub:/etc/mnist-bundle/signing-key.pub:ro"
refused_start "no pinned digest" "EXPECTED_SHA256 is empty" "${key_mount[@]}" -e EXPECTED_SHA256=
refused_start "oip mode, tampered archive mounted" "not the pinned" --oip "${key_mount[@]}" \
    -v "$keys/tampered.mar:/app/model_store/mnist.mar:ro"
refused_start "oip mode, another signer's key" "not signed by the configured public key" --oip \
    -v "$keys/stranger/signing-key.pub:/etc/mnist-bundle/signing-key.pub:ro"

container=$(docker run -d "${run_flags[@]}" "${key_mount[@]}" -p 127.0.0.1::8080 -p 127.0.0.1::8082 "$tag")
run_started=$SECONDS
for _ in $(seq 180); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
    [ "$health" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$container")" = true ] || fail "the container exited"
    sleep 1
done
[ "$health" = healthy ] || fail "not healthy after 180 s"
echo "healthy $((SECONDS - run_started)) s after docker run"
# The logs in a variable first: with pipefail, grep -q quitting at the first match would make
# `docker logs` die of SIGPIPE and the pipeline fail.
start_logs=$(docker logs "$container" 2>&1)
grep -q 'serving the verified read-only copy' <<<"$start_logs" || fail "no verification at start in the logs"
inference=$(docker port "$container" 8080 | head -1)
metrics=$(docker port "$container" 8082 | head -1)

answer=$(curl -sS -w ' HTTP %{http_code}' -H 'Content-Type: image/png' --data-binary @"$sample" "http://$inference/predictions/mnist")
echo "$(basename "$sample"): ${answer:0:60}... ${answer##* }"
[[ $answer == *'"label"'*'"probabilities"'*' HTTP 200' ]] || fail "prediction: $answer"
bad=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Content-Type: application/octet-stream' --data-binary 'not an image' "http://$inference/predictions/mnist")
[ "$bad" = 400 ] || fail "a bad request got HTTP $bad, not 400"
sleep 1  # the worker's metrics reach the frontend through its log
curl -sS "http://$metrics/metrics" | grep -q '^mnist_requests{.*Status="400"' || fail "no handler metrics at /metrics"
[ "$(docker exec "$container" id -u)" = 10001 ] || fail "not running as uid 10001"
# Listening sockets (/proc/net/tcp, state 0A): management 8081 (1F91) on loopback only.
docker exec "$container" awk '$4 == "0A" {print $2}' /proc/net/tcp | grep -q '^0100007F:1F91$' || fail "management is not on loopback"
! docker exec "$container" awk '$4 == "0A" {print $2}' /proc/net/tcp | grep -q '^00000000:1F91$' || fail "management listens on all interfaces"
echo "memory in use after these requests: $(docker stats --no-stream --format '{{.MemUsage}}' "$container")"
stop_started=$SECONDS
docker stop -t 30 "$container" >/dev/null
echo "stopped in $((SECONDS - stop_started)) s; image $(docker image inspect -f '{{.Size}}' "$tag") bytes"

# The Open Inference Protocol mode (what deploy/kserve/ runs), the same flags and key.
container=$(docker run -d "${run_flags[@]}" "${key_mount[@]}" -p 127.0.0.1::8080 "$tag" oip)
run_started=$SECONDS
oip=$(docker port "$container" 8080 | head -1)
for _ in $(seq 120); do
    curl -sf "http://$oip/v2/models/mnist/ready" >/dev/null 2>&1 && break
    [ "$(docker inspect -f '{{.State.Running}}' "$container")" = true ] || fail "the oip container exited"
    sleep 1
done
curl -sf "http://$oip/v2/models/mnist/ready" >/dev/null || fail "oip mode: not ready after 120 s"
for _ in $(seq 60); do  # Docker's HEALTHCHECK (deploy/healthcheck.sh) follows the mode
    health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
    [ "$health" = healthy ] && break
    sleep 1
done
[ "$health" = healthy ] || fail "oip mode: Docker's HEALTHCHECK says $health"
oip_logs=$(docker logs "$container" 2>&1)
grep -q 'as pinned' <<<"$oip_logs" || fail "oip mode: no pinned verification at start in the logs"
echo "oip mode ready and healthy $((SECONDS - run_started)) s after docker run: $(curl -sS "http://$oip/v2/models/mnist" | head -c 60)..."
body=$(mktemp /var/tmp/mnist-oip-body.XXXXXX)
"$python" -c 'import base64, json, sys
print(json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                              "data": [base64.b64encode(open(sys.argv[1], "rb").read()).decode()]}]}))' "$sample" >"$body"
answer=$(curl -sS -w ' HTTP %{http_code}' -H 'Content-Type: application/json' -d @"$body" "http://$oip/v2/models/mnist/infer")
rm -f "$body"
[[ $answer == *'"label"'*' HTTP 200' ]] || fail "oip infer: $answer"
bad=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' -d '{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}]}' "http://$oip/v2/models/mnist/infer")
[ "$bad" = 400 ] || fail "oip mode: a bad request got HTTP $bad, not 400"
docker stop -t 30 "$container" >/dev/null
echo "oip mode: answered, refused a bad body with 400, stopped"
echo "image-test passed in $((SECONDS - started)) s"
