#!/usr/bin/env bash
# The lab report's h200 preset on one H200: accuracy from the embedded model, speed from a
# synthetic-weight Llama-3.3-70B in fp8 with fp8 per-head KV. Writes under $OUT/report_h200.
source benchmarks/device/setup.sh
timeout "${LIMIT:-560}" python3 -m longserve.cli report --preset h200 --no-progress \
  --out "$OUT/report_h200"
