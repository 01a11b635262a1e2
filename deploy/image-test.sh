#!/usr/bin/env bash
# Smoke test of the serving image (`make image-test`): build it, run it the way the Deployment
# does (non-root, read-only root filesystem, no capabilities), wait for Docker's HEALTHCHECK
# (the readiness probe) to say healthy, answer REST calls, expose metrics, stop cleanly.
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
fail() { echo "image-test FAILED: $*" >&2; docker logs --tail 30 "$container" >&2 || true; exit 1; }

bash "$root/deploy/build-image.sh" cpu "$tag"
container=$(docker run -d --read-only --tmpfs /tmp --tmpfs /app/run:uid=10001,gid=10001 \
    --cap-drop ALL --security-opt no-new-privileges -p 127.0.0.1::8080 -p 127.0.0.1::8082 "$tag")
run_started=$SECONDS
for _ in $(seq 180); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
    [ "$health" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$container")" = true ] || fail "the container exited"
    sleep 1
done
[ "$health" = healthy ] || fail "not healthy after 180 s"
echo "healthy $((SECONDS - run_started)) s after docker run"
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
echo "image-test passed in $((SECONDS - started)) s"
