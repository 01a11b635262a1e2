#!/usr/bin/env bash
# Installs what the project needs: Java 17 (TorchServe's frontend), Debian's Fashion-MNIST
# package, npm's onnxruntime-web and Debian's chromium (the browser page and its tests), and .venv
# with requirements.txt. Idempotent: a second run changes nothing.
#   bash install.sh            (what `make install` runs)
#   VENV=path bash install.sh  another venv location
#   REQUIREMENTS=requirements-gpu.txt bash install.sh   CUDA hosts: onnxruntime-gpu instead of onnxruntime
set -euo pipefail
cd "$(dirname "$0")"
venv=${VENV:-.venv}
requirements=${REQUIREMENTS:-requirements.txt}
stamp="$venv/.installed-$(basename "$requirements" .txt)"

can_apt() { [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; }
apt_updated=false
apt_install() {
  can_apt || return 1
  $apt_updated || { apt-get update -qq && apt_updated=true; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
java_major() { java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1") ? v[2] : v[1]; exit}'; }

if ! command -v java >/dev/null || (( $(java_major) < 17 )); then
  if can_apt; then
    echo "[install] TorchServe needs Java 17+: apt-get install openjdk-17-jre-headless"
    apt_install openjdk-17-jre-headless
  else
    echo "[install] TorchServe needs Java 17 or newer and none was found." >&2
    echo "          Debian/Ubuntu: sudo apt-get install openjdk-17-jre-headless; then run make install again." >&2
    exit 1
  fi
fi

if [[ ! -d /usr/share/datasets/fashion-mnist && ! -e data/FashionMNIST/raw/train-images-idx3-ubyte ]]; then
  echo "[install] Fashion-MNIST: apt-get install dataset-fashion-mnist"
  apt_install dataset-fashion-mnist || echo "[install] note: could not install Debian's dataset-fashion-mnist;" \
    "put the IDX files into data/FashionMNIST/raw or let torchvision download them"
fi

# The browser page (web/): onnxruntime-web from npm, and Debian's chromium, which its tests drive.
if ! command -v npm >/dev/null; then
  echo "[install] the browser page needs npm: apt-get install nodejs npm"
  apt_install nodejs npm || echo "[install] note: install Node.js and npm, then run make install again (make web needs them)"
fi
if [[ ! -x /usr/bin/chromium ]]; then
  echo "[install] the browser tests need Debian's chromium: apt-get install chromium"
  apt_install chromium || echo "[install] note: could not install chromium; tests/test_web.py will fail until it is there"
fi
if command -v npm >/dev/null && [[ ! web/node_modules/.package-lock.json -nt web/package-lock.json ]]; then
  echo "[install] npm ci --prefix web (onnxruntime-web, served to the page from web/node_modules)"
  npm ci --prefix web --ignore-scripts --no-audit --no-fund --loglevel=error
fi
if ! command -v nginx >/dev/null; then
  # The gateway (deploy/gateway.nginx.conf: make gateway, tests/test_gateway.py, test_production.py);
  # plain nginx, no extra module.
  echo "[install] the gateway tests need nginx: apt-get install nginx"
  apt_install nginx || echo "[install] note: could not install nginx; the gateway and" \
    "rolling-update tests will fail saying so (Debian/Ubuntu: sudo apt-get install nginx)"
fi

if [[ -f "$stamp" && "$stamp" -nt "$requirements" && -z $(find requirements -newer "$stamp" -name "*.txt") && "$stamp" -nt install.sh ]]; then
  exit 0
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
# onnxruntime and onnxruntime-gpu install the same module: never leave both in one environment.
other=$([[ "$requirements" == *gpu* ]] && echo onnxruntime || echo onnxruntime-gpu)
"$venv/bin/python" -m pip uninstall -q -y "$other" 2>/dev/null || true
echo "[install] pip install -r $requirements into $venv (torch is a large download where it is not cached)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
rm -f "$venv"/.installed-*
touch "$stamp"
echo "[install] done: $("$venv/bin/python" -c 'import torch, ts, onnxruntime; print("torch", torch.__version__, "| torchserve", ts.__version__, "| onnxruntime", onnxruntime.__version__)')"
