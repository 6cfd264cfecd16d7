#!/usr/bin/env bash
# One command for a GPU run: the test suite on CUDA, then a sweep of all seven models (op and
# model level; bf16 with SDPA on its FlashAttention backend, and fp32; forward, train and decode;
# n = 1k ... 64k) with CUDA-event timing, each CSV analysed. Writes results/gpu_<gpu name>/.
# Sized for one H100/H200-class GPU: about 10 minutes. Needs no network and no install: it runs
# from the checkout with the machine's python3 (torch with CUDA, typer, rich, pandas, seaborn,
# scipy, filelock); set PYTHON to use another interpreter.
#
#   bash scripts/gpu_run.sh              # everything
#   GPU_RUN_SKIP_TESTS=1 bash scripts/gpu_run.sh   # the sweep only
#   GPU_RUN_DEVICE=cpu GPU_RUN_LENGTHS="64 128" GPU_RUN_SKIP_TESTS=1 bash scripts/gpu_run.sh
#                                        # a CPU smoke run of the same flow (results/gpu_cpu_smoke/)
#
# Exit status: the tests' status if they fail (the sweep still runs), else the sweep's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

DEVICE=${GPU_RUN_DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
  name=$($PY -c "import re, torch; assert torch.cuda.is_available(); print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name(0).lower()).strip('_'))" 2>/dev/null) \
    || { echo "gpu_run: no CUDA device visible to $PY; this command is for a GPU machine" >&2; exit 2; }
else
  name=cpu_smoke
fi
out=results/gpu_$name
if [ -e "$out" ]; then echo "gpu_run: $out already exists; move it away first (results are never replaced)" >&2; exit 2; fi
mkdir -p "$out"
start=$(date +%s)
echo "gpu_run: writing $out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

rc_tests=0
if [ -z "${GPU_RUN_SKIP_TESTS:-}" ]; then
  # Every oracle test parametrised over device runs its cuda cases here; the compile tests include
  # the decode loop under torch.cuda.set_sync_debug_mode("error"). Ray is not needed.
  timeout 300 $PY -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -n 40 | tee "$out/tests.log"
  rc_tests=${PIPESTATUS[0]}
  echo "gpu_run: tests exit $rc_tests ($(( $(date +%s) - start )) s)"
fi

sweep() {  # sweep NAME ARGS...: one compare run into $out/NAME.csv, then its analysis
  local csv="$out/$1.csv"; shift
  $PY cli.py compare --devices "$DEVICE" --models BSBR Standard Linear DeltaNet SlidingWindow Hopfield GAU \
      --batch-size 4 --hidden-dim 512 --num-heads 8 --chunk-size 128 --window-size 512 \
      --repeats 5 --min-run-time 0.05 --warmup 3 --decode-tokens 16 --output "$csv" "$@" \
    && $PY cli.py analyze "$csv" --output-dir "${csv%.csv}_analysis" > /dev/null
}
L=${GPU_RUN_LENGTHS:-1024 2048 4096 8192 16384 32768 65536}
rc=0
# the performance target: op level, bf16, forward + backward against SDPA's flash kernel
sweep op_bf16 --level op --dtype bfloat16 --sdpa-backend flash --modes forward train decode --seq-lengths $L || rc=1
sweep op_fp32 --level op --dtype float32 --modes forward train decode --seq-lengths $L || rc=1
sweep model_bf16 --level model --dtype bfloat16 --sdpa-backend flash --num-layers 2 --vocab-size 1000 \
      --modes forward train decode --seq-lengths $L || rc=1
sweep model_fp32 --level model --dtype float32 --num-layers 2 --vocab-size 1000 \
      --modes forward train decode --seq-lengths ${GPU_RUN_LENGTHS:-1024 4096 16384} || rc=1
echo "gpu_run: sweep exit $rc ($(( $(date +%s) - start )) s in all)"

if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" "$out"; fi  # the device tool brings $OUT back
[ "$rc_tests" -ne 0 ] && exit "$rc_tests"
exit "$rc"
