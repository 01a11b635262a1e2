# The stages, in order: install -> data -> train -> export -> archive -> serve -> predict -> stop.
# `make help` lists the targets; variables: DATASET, EPOCHS, NPROC, FORMAT, IMG, PORT, PYTHON, TRAIN_ARGS, PYTEST_ARGS, VARIANT.
SHELL := /bin/bash
VENV := .venv
PEERS_VENV := .venv-peers
OIP_VENV := .venv-oip
PYTHON ?= $(VENV)/bin/python
DATASET ?= auto
# Empty: the recipe's own number of epochs (train/main.py RECIPES).
EPOCHS ?=
NPROC ?= 1
# The model file the .mar serves: torchscript (model.pt), pt2 (torch.export + AOTInductor,
# compiled here for this host's CPU or GPU) or onnx (model.onnx, the edge's file).
FORMAT ?= torchscript
TRAIN_ARGS ?=
PYTEST_ARGS ?=
PORT ?= 8090
VARIANT ?= cpu
# The venv's bin/ first: torchserve, torch-model-archiver and java-launched workers come from it.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help install data train export archive keys quantize ort edge web serve predict stop test test-gpu parity peers-venv bench demo image image-test clean test-fast lint format oip-venv serve-oip stop-oip gateway stop-gateway bench-forms

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## Java 17 check, Debian's Fashion-MNIST, .venv with requirements.txt (idempotent)
	@bash install.sh

data: install  ## fetch/prepare DATASET (auto|mnist|fashion-mnist) under data/
	$(PYTHON) -m train --dataset $(DATASET) --prepare-data-only

train: install  ## train DATASET with the default recipe (EPOCHS=N: other than its own) -> checkpoints/{last,best}.pt (NPROC>1: torchrun)
ifeq ($(NPROC),1)
	$(PYTHON) -m train --dataset $(DATASET) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)
else
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m train --dataset $(DATASET) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)
endif

export: install  ## checkpoints/best.pt -> build/model.pt, build/model.onnx, build/bundle.json (FORMAT=pt2: + build/model.pt2)
	$(PYTHON) -m export build --format $(FORMAT)

archive: export  ## build/ -> model_store/mnist.mar serving FORMAT=torchscript|pt2|onnx, signed when `make keys` made a key (else says loudly)
	$(PYTHON) -m export archive --format $(FORMAT)

keys: install  ## a signing key pair in ~/.config/mnist-bundle/ (never in the repository); keeps an existing one
	$(PYTHON) -m export keys

quantize: install  ## build/model.onnx -> build/model.int8.onnx (static QDQ int8) + its report
	$(PYTHON) -m export quantize

ort: install  ## build/model.onnx -> build/model.ort (+ required operators) for minimal builds
	$(PYTHON) -m export ort

edge: install  ## classify IMG=paths (files or directories) with onnxruntime alone, no torch
	@test -n "$(IMG)" || { echo "usage: make edge IMG=build/samples"; exit 2; }
	$(PYTHON) -m edge $(IMG) --timing

web: install  ## the draw-or-drop page on http://127.0.0.1:8090/ (PORT=...): build/model.onnx in the browser
	$(PYTHON) -m web --port $(PORT)

serve: install  ## verify the archive's signature, start TorchServe from the root; returns when READY
	$(PYTHON) -m serve start

predict: install  ## send IMG=path (one or more) to the running server with the token
	@test -n "$(IMG)" || { echo "usage: make predict IMG=path/to/image.png"; exit 2; }
	$(PYTHON) -m serve predict $(IMG)

stop:  ## stop the TorchServe started by `make serve`; returns when it has exited
	-$(PYTHON) -m serve stop

test: install oip-venv  ## every test: TorchServe, nginx, chromium, training (GPU tests skip, saying why, where there is no GPU)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-gpu:  ## the GPU tests alone; PYTHON=python3 on hosts that bring their own PyTorch
	$(PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

parity: install  ## the parity tests: eager, TorchScript, TorchServe, onnxruntime agree
	$(PYTHON) -m pytest tests/test_parity.py $(PYTEST_ARGS)

peers-venv: $(PEERS_VENV)/.installed  ## the venv of the peers make bench compares (LitServe, BentoML)

$(PEERS_VENV)/.installed: bench/requirements-peers.txt
	[ -x $(PEERS_VENV)/bin/python ] || python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements-peers.txt
	touch $@

bench: install peers-venv oip-venv  ## side-by-side benchmarks, peers included -> bench/results/latest.{md,png} and a JSON
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -qq wrk >/dev/null; } || \
		{ echo "make bench needs wrk: apt-get install wrk"; exit 1; }
	$(PYTHON) -m bench

demo: install  ## the whole path: data, train, export, archive, serve, predict, stop
	$(MAKE) data train keys archive TRAIN_ARGS="$(TRAIN_ARGS) $(if $(wildcard checkpoints/last.pt),--resume)"
	$(MAKE) serve
	$(PYTHON) -m serve predict build/samples/*.png; status=$$?; $(MAKE) stop; \
		$(PYTHON) -m train --summary; exit $$status

image: archive  ## the serving image mnist-serve:VARIANT (cpu, gpu) from model_store/mnist.mar, offline (dockerd running)
	bash deploy/build-image.sh $(VARIANT)

image-test: archive  ## build the CPU image and smoke-test it: healthy, REST answers, metrics (starts dockerd if needed)
	bash deploy/image-test.sh

clean:  ## remove build outputs (keeps data/, checkpoints/ and the venv)
	rm -rf build model_store/*.mar logs key_file.json .pytest_cache

# The tests that need none of the real components (pyproject.toml's markers): no TorchServe, no
# browser, no container, no nginx, no GPU, no KServe, no training beyond tiny fixtures.
FAST_MARKERS := not (torchserve or browser or docker or gateway or gpu or oip or slow)

test-fast: install  ## the unit tests, for every commit: none of TorchServe, chromium, nginx, docker, GPU, training
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

lint: install  ## ruff check (whole tree) and mypy (contract/), as configured in pyproject.toml
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

format:  ## ruff format the whole tree (pyproject.toml's style); `make lint` does not check it yet
	$(PYTHON) -m ruff format .

# The Open Inference Protocol (KServe v2): KServe's ModelServer on the archive's model.onnx, in a
# venv of its own (kserve's and tritonclient's gRPC stubs need protobuf < 7, the main venv has 7).
oip-venv: $(OIP_VENV)/.installed  ## .venv-oip: kserve, tritonclient, onnxruntime (oip/requirements.txt)

$(OIP_VENV)/.installed: oip/requirements.txt
	[ -x $(OIP_VENV)/bin/python ] || python3 -m venv $(OIP_VENV)
	$(OIP_VENV)/bin/python -m pip install -q --disable-pip-version-check -r oip/requirements.txt
	touch $@

serve-oip: oip-venv  ## verify the archive, serve it over the Open Inference Protocol (REST OIP_HTTP_PORT=8085, gRPC OIP_GRPC_PORT=8086); returns when ready
	$(OIP_VENV)/bin/python -m oip start

stop-oip:  ## stop the server `make serve-oip` started; returns when it has exited
	@if [ -x $(OIP_VENV)/bin/python ]; then $(OIP_VENV)/bin/python -m oip stop; else echo "[oip] not running (no $(OIP_VENV))"; fi

gateway: install  ## the nginx gateway (deploy/gateway.nginx.conf) on loopback GATEWAY_PORT in front of TORCHSERVE_URL (default: make serve's); returns once it answers
	$(PYTHON) -m serve.gateway start

stop-gateway:  ## stop the gateway started by `make gateway`; returns once nginx has exited
	$(PYTHON) -m serve.gateway stop

FORMS_COUNT ?= 500
bench-forms: install  ## accuracy per form people send (ruled/squared paper, fine pen, shadow, ...) of build/'s model (bench/forms.py)
	OMP_NUM_THREADS=1 $(PYTHON) -m bench.forms --build build --data-dir data --count $(FORMS_COUNT)
