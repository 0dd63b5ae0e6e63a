#!/usr/bin/env bash
# The one accelerator script (issue 22): model/generation parity tests on the GPU, then every GPU row of
# the benchmark suite in one run of benchmarks.run, and one table at the end ($OUT/latest.md, with
# every figure and timing in $OUT/latest.json). bf16 compute, float32 params (generation: bf16-stored
# weights), MFU over the data-sheet dense bf16 peak (benchmarks/probes.py GPU_PEAKS).
#
# Usage (on a GPU machine with jax[cuda], flax and optax; torch + transformers for the parity tests):
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Knobs: PY (python, default python3), TEST_TIMEOUT / CHECK_TIMEOUT / BENCH_TIMEOUT (seconds),
# BENCH_ITEMS, SHAPES (sft/rm/mfu), LARGE (rl/gen/attn/chunk), GEN_BATCHES, BENCH_ARGS (extra
# benchmarks.run options), RUN_TESTS=0 (skip the parity tests), ATTENTION_IMPL (default auto: cuDNN's
# kernel on a GPU, once benchmarks/attention_check.py has compared it with xla; xla if that check fails).
# XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92 here: the 1B PPO iteration holds four 1B models, policy and
# value with float32 weights and Adam moments, reference and reward model in bf16: ~35 GB before its
# temporaries), JAX_COMPILATION_CACHE_DIR (a second run on the
# same machine reuses the compiled programs: only the changed ones compile again).
# A smoke run of this script on a CPU, minuscule shapes, not a result:
#   RUN_TESTS=0 SHAPES=micro LARGE=micro GEN_BATCHES=2,3 BENCH_ARGS="--workload micro --reps 1" \
#     OUT=/tmp/gpu_smoke bash benchmarks/gpu_check.sh
#
# Rows (benchmarks/README.md, "GPU script"):
#   sft, rm    SFT step tokens/s (batch 8 x 512), reward-model step pairs/s (8 pairs x 512), at GPT-2
#              124M and the 1B Llama shape
#   mfu        SFT-step and RM-step MFU at both shapes (targets: 0.35 at GPT-2, 0.50 at 1B)
#   rl         fused PPO and GRPO iterations at 1B: s/iteration, rollout share, MFU (workload of
#              experiments/ppo_llama1b.py and grpo_llama1b.py: 64 prompts / 16 x G 8, 64 + 64 tokens)
#   gen        1B generation, bf16 weights: new tokens/s at batch 16, 64, 256; decode step vs HBM floor at 16
#   attn       1B SFT step: attention_impl=auto (cuDNN) vs xla, and the first step's loss of both
#   chunk      1B SFT step with SFTStepConfig(logits_chunk=128) vs whole logits (+ XLA temp bytes)
#
# Time budget, one H100 (989 TFLOP/s dense bf16, assumed 40% = 396 TFLOP/s; 3.35 TB/s HBM; figures
# computed 2026-12-06 with benchmarks.jax_side.flops_per_token / reward_flops_per_token). Model FLOPs
# of the timed work (warm-up call + reps; rlhf_jax.models.flops_per_token, rl.trainer.run_flops):
#   sft  gpt2 3.2 TFLOP/step, 1B 30.8 TFLOP/step; 4 calls each            ->  0.4 s
#   rm   gpt2 4.4, 1B 48.7 TFLOP/step (8,192 tokens); 4 calls each        ->  0.6 s
#   attn/chunk 1B 30.8 TFLOP/step, 4 calls each (xla attention ~1.5x)     ->  0.8 s
#   gen  1B decode is bandwidth-bound: 2.47 GB bf16 weights/step = 0.74 ms floor; 128 steps x 3 calls
#        x ~2 ms at batch 16 and 64, compute-bound ~3 ms/step at 256 (0.63 TFLOP/step)  ->  ~5 s
#   rl   PPO 589 TFLOP/iteration (8,192 tokens: 5 forwards + 4 epochs x 2 trained models),
#        GRPO 284 TFLOP (16,384 tokens: 4 forwards + 1 epoch); 3 iterations + 3 rollouts each  -> ~8 s
# so the compute is ~15 s; the rest is compilation (about 20 programs, 10-60 s each on one GPU:
# the fused RL iterations are the largest) and model initialisation: ~5-6 min estimated. The caps:
# tests 100 s, attention check 60 s, benchmarks 320 s: 8 min in all at most, plus the start-up. A
# capped run still leaves every item finished before the cap in $OUT/latest.{md,json} (marked
# partial); item_seconds in latest.json says what each item took, compilation included.
set -u
OUT=${OUT:-/tmp/rlhf_jax_gpu}
mkdir -p "$OUT"
rm -f "$OUT/latest.md" "$OUT/latest.json"  # a table at the end is this run's or none
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/rlhf_jax_gpu_jit_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
PY=${PY:-python3}
BENCH_ITEMS=${BENCH_ITEMS:-sft,rm,mfu,rl,gen,attn,chunk}
SHAPES=${SHAPES:-gpt2,llama1b}
LARGE=${LARGE:-llama1b}
GEN_BATCHES=${GEN_BATCHES:-16,64,256}
BENCH_ARGS=${BENCH_ARGS:-}
RUN_TESTS=${RUN_TESTS:-1}
start=$(date +%s)
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
else
  echo "no nvidia-smi on this machine"
fi
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
if [ "$RUN_TESTS" = 1 ]; then
  echo "== GPU tests (f32 at highest matmul precision: parity tolerances are f32's) =="
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-100}" $PY -m pytest -q -p no:cacheprovider \
    tests/test_models.py tests/test_generation.py -k "not 8_devices" 2>&1 | tail -n 25 | tee "$OUT/gpu_tests.log"
fi
ATTENTION_IMPL=${ATTENTION_IMPL:-auto}
if [ "$ATTENTION_IMPL" = auto ]; then
  # cuDNN's kernel (what auto is on a GPU) against xla, loss and gradients, before every row depends on it
  echo "== attention check (auto vs xla, bf16) =="
  if ! timeout "${CHECK_TIMEOUT:-60}" $PY -m benchmarks.attention_check > "$OUT/attention_check.log" 2>&1; then
    ATTENTION_IMPL=xla
    echo "attention_impl=auto FAILED the check: the benchmarks run with --attention-impl xla ($OUT/attention_check.log)"
  fi
  tail -n 12 "$OUT/attention_check.log"
fi
echo "== GPU benchmarks: $BENCH_ITEMS, attention_impl=$ATTENTION_IMPL ($(( $(date +%s) - start )) s so far) =="
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout "${BENCH_TIMEOUT:-320}" $PY -m benchmarks.run --only "$BENCH_ITEMS" --shapes "$SHAPES" \
  --item-shapes "rl=$LARGE,gen=$LARGE,attn=$LARGE,chunk=$LARGE" --gen-batches "$GEN_BATCHES" --logits-chunk 128 \
  --attention-impl "$ATTENTION_IMPL" --no-install --out "$OUT" $BENCH_ARGS > "$OUT/bench.log" 2>&1
rc=$?
grep -E '^\[bench' "$OUT/bench.log" | tail -n 60
if [ "$rc" -ne 0 ]; then
  echo "benchmarks.run exited $rc (124: BENCH_TIMEOUT reached; 1: a side raised). Errors from $OUT/bench.log:"
  grep -E -B2 -A12 '^Traceback' "$OUT/bench.log" | tail -n 60
fi
echo "== table ($OUT/latest.md; $(( $(date +%s) - start )) s in all) =="
cat "$OUT/latest.md" 2>/dev/null || echo "no table: the benchmark wrote nothing (see $OUT/bench.log)"
