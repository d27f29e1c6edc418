#!/usr/bin/env bash
# The GPU measurements of both backends in one call of at most 10 minutes, each with its own time limit:
# the paper config's step, memory, utilisation and JAX's cold compile column (benchmarks/bench.py), torch's
# speed options alone and combined (benchmarks/torch_options.py), JAX's step under XLA's latency-hiding
# scheduler, JAX's start with a warm compilation cache, and the quickstart's steps/s in each backend.
#
#     OUT=results bash benchmarks/gpu_matrix.sh          # from the repository root, on a GPU machine
#
# Writes under $OUT: bench/ (bench.md, bench.json), torch_options.json, one .txt per measurement (its
# output) and log.txt (each measurement's exit status; 124 = stopped at its limit).
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"

measure() {            # measure NAME SECONDS COMMAND...: runs COMMAND with a limit, output in $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1

# The paper config (CIFAR-10, batch 128) in bf16 and float32, both backends side by side.
measure bench 200 python -m benchmarks.bench --sizes=cifar10 --dtypes=bfloat16,float32 --steps=10 --warmup=3 \
  --worker_timeout=100 --out="$OUT/bench"
# torch's options on the paper config in bf16, alone and combined (the first step holds compile time).
measure torch_options 160 python -m benchmarks.torch_options --sizes=cifar10 --dtypes=bfloat16 --steps=10 \
  --warmup=3 --options=cudnn_benchmark,channels_last,compile,channels_last+cudnn_benchmark+compile \
  --out="$OUT/torch_options.json"
# JAX's step with XLA's latency-hiding scheduler.
XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true measure jax_latency_hiding 80 python -m benchmarks.bench \
  --backends=jax --sizes=cifar10 --dtypes=bfloat16 --steps=10 --warmup=3 --out="$OUT/jax_latency_hiding"
# JAX's start, cold then warm: the trainer prints the first call's time; the second run reads the cache.
for run in cold warm; do
  measure "jax_quickstart_$run" 45 python train_jax.py --workdir="$OUT/quickstart_jax_$run" \
    --compilation_cache="$OUT/jax_cache" --config.training.num_steps_train=1000
done
measure torch_quickstart 45 python train_torch.py --workdir="$OUT/quickstart_torch" \
  --config.training.num_steps_train=1000
