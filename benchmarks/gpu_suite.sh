#!/usr/bin/env bash
# The suite on a GPU machine with JAX (CUDA), flax, optax and PyTorch already installed and
# nothing to download (benchmarks/README.md, "On a GPU"): jaxgeom from this checkout,
# NNGeometry from the wheels in $WHEELS if any, $JOBS (default 6) cases at a time (they
# compile side by side and time in turn, see bench_fim.run_all). XLA_FLAGS defaults to
# --xla_gpu_enable_triton_gemm=false: on an H200 that cut first calls from 10-55 s to
# 0.2-2 s and ran most float32 (full precision) builds as fast or faster
# (benchmarks/README.md); --xla_gpu_autotune_level=0 compiles fast too but picks slow
# convolutions (10-60x). Usage: bash benchmarks/gpu_suite.sh OUT_DIR [SECONDS] [options]
set -u
out=${1:?output folder}; budget=${2:-500}; shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}"
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jax; jax.numpy.ones(1).block_until_ready()" 2>/dev/null \
  || { echo "XLA_FLAGS=$XLA_FLAGS rejected: unset"; unset XLA_FLAGS; }
{ nvidia-smi; python3 -c "import jax, jaxgeom; print(jax.__version__, jax.devices())"
  python3 -m pip list 2>/dev/null | grep -i -E "^(jax|jaxlib|flax|optax|torch|nngeometry) "
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
timeout "$budget" python3 benchmarks/bench_fim.py --no-scaling --jobs "${JOBS:-6}" --timeout 420 \
  --out "$out/gpu.json" "$@"
python3 benchmarks/bench_fim.py --report "$out/gpu.json" --markdown > "$out/gpu_table.md"
tail -n 80 "$out/gpu_table.md"
