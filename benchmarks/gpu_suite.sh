#!/usr/bin/env bash
# Every GPU measurement the README still lacks, as one command that fits in about 8 minutes on one GPU:
#
#   benchmarks/gpu_suite.sh            # on a machine with CUDA, after `make .venv/.installed`
#   QUICK=1 DEVICE=cpu benchmarks/gpu_suite.sh   # a few iterations of each step on the CPU: checks the script
#
# Each step has its own time limit and a failed step does not stop the others; results go to
# benchmarks/results/*_cuda.json (the quick run writes to a temporary folder instead).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEV=${DEVICE:-cuda}
QUICK=${QUICK:-0}
export HF_HUB_OFFLINE=1
export PTQ_CACHE_DIR=${PTQ_CACHE_DIR:-$HOME/.cache/ptq}
RESULTS=benchmarks/results
if [ "$QUICK" = 1 ]; then RESULTS=$(mktemp -d); fi
q() { if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi; }  # full value, quick value
started=$(date +%s)
step() {
  local limit=$1; shift
  if [ "$QUICK" = 1 ]; then limit=$(( limit * 4 )); fi  # the limits are sized for a GPU; the check runs on a CPU
  echo "== [$(( $(date +%s) - started )) s] $*"
  timeout "$limit" "$@" || echo "!! exit $? (failed or over ${limit} s): $*"
}

# 1. synthesis step ÷ bare forward+backward, BN statistics fused vs hooked, batch 32 and 128 (lite0, 224²)
for batch in $(q "32 128" "2"); do
  for fuse in on off; do
    step 75 "$PY" benchmarks/synth_speed.py --batch "$batch" --methods bns,intraq,fdda --fuse "$fuse" --device "$DEV" \
      --iters "$(q 20 2)" --rounds "$(q 3 1)" --out "$RESULTS/synth_speed_tf_efficientnet_lite0_b${batch}_fuse${fuse}_cuda.json"
  done
done
# 2. the BN layers with their statistics, per way of computing them
step 60 "$PY" benchmarks/bn_kernels.py --device "$DEV" --batch "$(q 32 2)" --rounds "$(q 7 1)" \
  --out "$RESULTS/bn_kernels_tf_efficientnet_lite0_b32_cuda.json"
# 3. genie's lite0 calibration-quality row (RTN W8A8), a tenth of its published 4,000 iterations
step 200 "$PY" benchmarks/synth_quality.py lite0 --methods genie --iters-scale "$(q 0.1 0.001)" --device "$DEV" \
  --out "$RESULTS/synth_quality_lite0_genie_cuda.json"
# 4. GPTQ + bias correction on lite0, zero-shot: 256 IntraQ images at 500 iterations (synthesis time in the set)
step 200 "$PY" benchmarks/rounding_quality.py lite0 --device "$DEV" --images "$(q 256 4)" --synth-iters "$(q 500 2)" \
  --settings 4/8,4/4 --methods rtn,gptq+bc,gptq+abc --out "$RESULTS/rounding_quality_lite0_intraq256-it500_cuda.json"
# 5. QDrop's wall time per iteration on lite0 W4A4 (500 iterations per unit, a 40th of the published recipe),
#    started from GPTQ and from round-to-nearest, on the set of step 4
step 240 "$PY" benchmarks/rounding_quality.py lite0 --device "$DEV" --images "$(q 256 4)" --synth-iters "$(q 500 2)" \
  --settings 4/4 --methods qdrop-500,gptq+bc\>qdrop-500 --extra "qdrop-500=method=qdrop;recon.iters=$(q 500 2)" \
  --extra "gptq+bc>qdrop-500=method=qdrop;recon.init=gptq;quant.bias_correction=empirical;recon.iters=$(q 500 2)" \
  --out "$RESULTS/rounding_quality_lite0_intraq256-it500_cuda.json"
echo "== done in $(( $(date +%s) - started )) s; results in $RESULTS"
