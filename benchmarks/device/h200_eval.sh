#!/usr/bin/env bash
# RULER on the embedded model on one H200: 2K-8K in its window, then 16K/32K with and without
# YaRN (factor 2 and 4 over its 8K window). Writes JSON under $OUT.
source benchmarks/device/setup.sh
run() { timeout "$1" python3 -m longserve.cli eval ruler --tasks all --samples "${SAMPLES:-10}" \
  --no-progress --device cuda --dtype bfloat16 "${@:2}"; }
run 150 --lengths 2048,4096,8192 --out "$OUT/ruler_h200_window.json"
run 120 --lengths 16384,32768 --max-model-len 32832 --out "$OUT/ruler_h200_noyarn.json"
run 60 --lengths 16384 --rope-scaling '{"rope_type":"yarn","factor":2,"original_max_position_embeddings":8192}' \
  --out "$OUT/ruler_h200_yarn2.json"
run 120 --lengths 16384,32768 --max-model-len 32832 \
  --rope-scaling '{"rope_type":"yarn","factor":4,"original_max_position_embeddings":8192}' \
  --out "$OUT/ruler_h200_yarn4.json"
