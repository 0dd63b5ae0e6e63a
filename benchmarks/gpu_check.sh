#!/usr/bin/env bash
# One-shot accelerator check: model/generation parity tests on the GPU, then the benchmark suite's
# GPU rows (bf16 compute: SFT tokens/s + MFU and decode vs the HBM floor at GPT-2 124M and ~1B Llama).
# Usage (on a GPU machine with jax[cuda], flax, optax, torch, transformers installed):
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/rlhf_jax_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
echo "== GPU tests (f32 at highest matmul precision: parity tolerances are f32's) =="
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-170}" $PY -m pytest -q -p no:cacheprovider \
  tests/test_models.py tests/test_generation.py -k "not 8_devices" 2>&1 | tail -n 25 | tee "$OUT/gpu_tests.log"
echo "== GPU benchmarks =="
timeout "${BENCH_TIMEOUT:-360}" $PY -m benchmarks.run --only sft,gen,mfu --shapes gpt2,llama1b --no-install \
  --out "$OUT" 2>&1 | tail -n 60
