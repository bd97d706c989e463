#!/usr/bin/env bash
# The measurement behind --quant int4's defaults (block size 32, symmetric): SmolLM2 compiled
# at each block size with and without zero points, scored against the fp32 bundle by
# ../quant-accuracy/accuracy.py (teacher-forced agreement, decode speed in a rotating order).
#     bash run.sh RUN_DIR [PROMPTS]
set -euo pipefail
run=${1:?usage: run.sh RUN_DIR [PROMPTS]}
prompts=${2:-10}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$run"
[ -d "$run/fp32.onnx" ] || specee-compile smollm2 --out "$run/fp32.onnx" -q
for block in 32 64 128; do
  [ -d "$run/int4-$block.onnx" ] || specee-compile smollm2 --out "$run/int4-$block.onnx" --quant int4 --quant-block $block -q
  [ -d "$run/int4-$block-asym.onnx" ] || specee-compile smollm2 --out "$run/int4-$block-asym.onnx" --quant int4 \
    --quant-block $block --quant-asymmetric -q
done
python "$here/../quant-accuracy/accuracy.py" "$run/fp32.onnx" "$run/int4-32.onnx" \
  int4-32-asym="$run/int4-32-asym.onnx" int4-64="$run/int4-64.onnx" int4-64-asym="$run/int4-64-asym.onnx" \
  int4-128="$run/int4-128.onnx" int4-128-asym="$run/int4-128-asym.onnx" --base-name int4-32 --prompts "$prompts"
