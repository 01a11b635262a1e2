# The stages, in order: install -> data -> train -> export -> archive -> serve -> predict -> stop.
# `make help` lists the targets; variables: DATASET, EPOCHS, NPROC, FORMAT, IMG, PORT, PYTHON, TRAIN_ARGS, PYTEST_ARGS, VARIANT.
SHELL := /bin/bash
VENV := .venv
PEERS_VENV := .venv-peers
PYTHON ?= $(VENV)/bin/python
DATASET ?= auto
EPOCHS ?= 10
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

.PHONY: help install data train export archive keys quantize ort edge web serve predict stop test test-gpu parity peers-venv bench demo image image-test clean bench-forms

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## Java 17 check, Debian's Fashion-MNIST, .venv with requirements.txt (idempotent)
	@bash install.sh

data: install  ## fetch/prepare DATASET (auto|mnist|fashion-mnist) under data/
	$(PYTHON) -m train --dataset $(DATASET) --prepare-data-only

train: install  ## train DATASET for EPOCHS epochs -> checkpoints/{last,best}.pt (NPROC>1: torchrun)
ifeq ($(NPROC),1)
	$(PYTHON) -m train --dataset $(DATASET) --epochs $(EPOCHS) $(TRAIN_ARGS)
else
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m train --dataset $(DATASET) --epochs $(EPOCHS) $(TRAIN_ARGS)
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

test: install  ## the whole suite (GPU tests skip, saying why, where there is no GPU)
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

bench: install peers-venv  ## side-by-side benchmarks, peers included -> bench/results/latest.{md,png} and a JSON
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -qq wrk >/dev/null; } || \
		{ echo "make bench needs wrk: apt-get install wrk"; exit 1; }
	$(PYTHON) -m bench

demo: install  ## the whole path: data, train, export, archive, serve, predict, stop
	$(MAKE) data train keys archive TRAIN_ARGS="$(TRAIN_ARGS) $(if $(wildcard checkpoints/last.pt),--resume)"
	$(MAKE) serve
	$(PYTHON) -m serve predict build/samples/*.png; status=$$?; $(MAKE) stop; exit $$status

image: archive  ## the serving image mnist-serve:VARIANT (cpu, gpu) from model_store/mnist.mar, offline (dockerd running)
	bash deploy/build-image.sh $(VARIANT)

image-test: archive  ## build the CPU image and smoke-test it: healthy, REST answers, metrics (starts dockerd if needed)
	bash deploy/image-test.sh

clean:  ## remove build outputs (keeps data/, checkpoints/ and the venv)
	rm -rf build model_store/*.mar logs key_file.json .pytest_cache

FORMS_COUNT ?= 500
bench-forms: install  ## accuracy per form people send (ruled/squared paper, fine pen, shadow, ...) of build/'s model (bench/forms.py)
	OMP_NUM_THREADS=1 $(PYTHON) -m bench.forms --build build --data-dir data --count $(FORMS_COUNT)
