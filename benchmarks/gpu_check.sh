#!/usr/bin/env bash
# Every GPU check in one pass, for a lent H100/H200 (Python 3.12 with torch and transformers, no registry).
# The packaged SmolLM2 weights cannot travel, so a random-weight model with SmolLM2-135M's exact architecture and
# its real tokenizer stands in. Carry: .whl (diffusers, gguf, the server's stack and their pure-Python needs) and
# .device_carry (tokenizer); `bash scripts/device_wheels.sh` makes both here.
#   bash benchmarks/gpu_check.sh            (OUT=folder for logs and JSON; default /tmp/loom-gpu)
#   PART=llm bash benchmarks/gpu_check.sh   (parts: llm, parity, shapes, moe, other, server; comma-separated; default all: a
#                                            device call runs at most 10 minutes, so a session may run the parts in turn)
set -u
OUT=${OUT:-/tmp/loom-gpu}
PART=${PART:-all}
want() { [ "$PART" = all ] || [[ ",$PART," == *",$1,"* ]]; }
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 LOOM_HOME=/tmp/loom-home PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 scripts/random_smollm2.py --tokenizer .device_carry/smollm2-tokenizer
if want llm; then
echo "== parity on CUDA, bfloat16"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py tests/engine/test_step_upload.py \
  -k "not real_shapes" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
echo "== Triton paged attention, layer ops and grouped MoE compiled on the GPU (interpreted on CPU in make test)"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py tests/ops/test_triton_layers.py \
  tests/ops/test_triton_moe.py 2>&1 \
  | tee "$OUT/pytest_triton.log" | tail -6
echo "== quantized linears (GGUF blocks, weight-only int8) compiled on the GPU, then their speed against bf16 cuBLAS"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_quantized.py 2>&1 \
  | tee "$OUT/pytest_triton_quantized.log" | tail -6
timeout 120 python3 benchmarks/gguf_cuda.py --out "$OUT/gguf_cuda.json" 2>&1 | tail -25
fi
if want other; then
echo "== model-server workers on the GPUs (round-robin, ctx.device), finetuning on CUDA (DDP on NCCL: 2+ GPUs)"
timeout 180 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/batching/test_gpu_workers.py \
  tests/finetune/test_gpu.py \
  2>&1 | tee "$OUT/pytest_gpu_workers_finetune.log" | tail -8
fi
if want llm; then
echo "== throughput, bfloat16, SmolLM2-135M architecture (random weights)"
timeout 240 python3 benchmarks/throughput.py --backend loom,hf,hf-cb --out "$OUT/throughput_gpu.json" 2>&1 \
  | grep -vE "Warning|warn" | tail -8
echo "== the same workload, Loom with async scheduling (step N + 1 queued while N runs)"
timeout 120 python3 benchmarks/throughput.py --backend loom --async-scheduling --out "$OUT/throughput_gpu_async.json" \
  2>&1 | grep -vE "Warning|warn" | tail -3
fi
if want parity; then
echo "== parity at Llama-3.2-1B and 3.1-8B shapes (HF's random init, saved and loaded), graphs on and off"
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py -k real_shapes 2>&1 \
  | tee "$OUT/pytest_cuda_shapes.log" | tail -8
fi
if want shapes; then
echo "== the issue 11 table at real shapes: Llama-3.2-1B / 3.1-8B (random weights drawn on the GPU), roofline, decode"
# SHAPES_ARGS=--async-scheduling: Loom's runs with async scheduling (a second call, to compare)
timeout 420 python3 benchmarks/gpu_shapes.py --tokenizer .device_carry/smollm2-tokenizer ${SHAPES_ARGS:-} --out "$OUT/gpu_shapes.json" \
  2>&1 | grep -vE "Warning|warn" | tail -6
fi
if want moe; then
echo "== mixture of experts, bf16: grouped Triton experts + CUDA graphs vs the per-expert path vs transformers"
timeout 200 python3 benchmarks/moe.py --device cuda --num-prompts 64 --rounds 1 --out "$OUT/moe_cuda.json" 2>&1 \
  | grep -vE "Warning|warn|Loading" | tail -2
timeout 200 python3 benchmarks/moe.py --device cuda --model gpt_oss --num-prompts 64 --rounds 1 \
  --out "$OUT/moe_gpt_oss_cuda.json" 2>&1 | grep -vE "Warning|warn|Loading" | tail -2
fi
if want other; then
echo "== the engine's host work per decode step (a 1-layer model: what the GPU waits for each step)"
timeout 90 python3 benchmarks/host_overhead.py --out "$OUT/host_overhead.json" 2>&1 | grep -vE "Warning|warn" | tail -4
timeout 90 python3 benchmarks/host_overhead.py --async-scheduling --out "$OUT/host_overhead_async.json" 2>&1 \
  | grep -vE "Warning|warn" | tail -4
echo "== images, SD-1.5-sized UNet 512x512"
timeout 170 python3 benchmarks/images.py --cuda --budget-s 110 --out-dir "$OUT" 2>&1 | tail -8
echo "== images: IP-Adapter and LoRA switching per SD-1.5-sized step (issue 15: <= 10% each)"
timeout 90 python3 benchmarks/images.py --controls --cuda --iters 20 --repeats 3 --out-dir "$OUT" 2>&1 | tail -3
fi
if want server; then
echo "== the OpenAI server streaming from a 1-layer model: engine on a thread vs --engine-process (host-bound steps)"
timeout 300 python3 benchmarks/engine_process.py --rounds 2 --threads 1 --out "$OUT/engine_process_gpu.json" 2>&1 \
  | grep -vE "Warning|warn|^round" | tail -3
fi
echo "== done"
