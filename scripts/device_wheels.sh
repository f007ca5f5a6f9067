#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the lent GPU machine (Python 3.12, no registry there), fetched here
# into .whl (git-ignored through .git/info/exclude), with the tokenizer it needs in .device_carry. Run once from the
# repository root, then name both in the device call's carry:
#   bash scripts/device_wheels.sh
# What the machine's image lacks (its package list: the device tool's KINDS.md): diffusers and importlib-metadata
# (images), gguf (GGUF files), and the server's stack for `PART=server` (fastapi, starlette, pydantic, pydantic-core,
# annotated-types, typing-inspection, uvicorn, orjson). Versions: the ones this project's .venv runs.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.device_carry/' .git/info/exclude 2>/dev/null || echo '/.device_carry/' >> .git/info/exclude
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
names=(diffusers importlib-metadata gguf fastapi starlette pydantic pydantic-core annotated-types typing-inspection
       uvicorn orjson)
specs=()
for name in "${names[@]}"; do specs+=("$name==$(version "$name")"); done
mkdir -p .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "${specs[@]}"
mkdir -p .device_carry/smollm2-tokenizer
model=$(.venv/bin/python -c "from loom.models.catalogue import resolve_model; print(resolve_model('smollm2:f32'))")
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja generation_config.json; do
  [ -f "$model/$f" ] && cp "$model/$f" .device_carry/smollm2-tokenizer/
done
ls .whl .device_carry/smollm2-tokenizer
du -sh .whl .device_carry
