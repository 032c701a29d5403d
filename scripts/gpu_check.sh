#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, run the GPU paths and write one report.
#   always (torch with CUDA): CPU-vs-GPU greedy parity and GPU speculative output == AR
#     (tests/test_cuda.py), `bench decode` AR vs the shipped DSpark drafter on the GPU (bf16), and
#     per-step times of target and drafter vs context at batch 16 (`bench steps`, bf16 and fp32);
#   where TensorRT is installed (the docker/ image, or `pip install tensorrt-cu12`): the engine
#     build, the TensorRT parity tests and decode tokens/s TensorRT fp16 vs torch on the same GPU.
# Every step has its own time limit: the torch-CUDA part stays under 8 minutes.
#
#   bash scripts/gpu_check.sh [REPORT_DIR]      (default: runs/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-smollm2-135m-instruct}
OUT=${1:-runs/gpu_check}
REPORT="$OUT/report.md"
mkdir -p "$OUT"
START=$(date +%s)
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, never abort the report
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$(date +%s) rc=0
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then status=ok; elif [ "$rc" -eq 124 ]; then status="timed out"; else status="failed (rc $rc)"; fi
    [ "$rc" -eq 0 ] || FAILED=1
    echo "| $name | $status | ${took}s |" >>"$OUT/steps.md"
    echo "   $status in ${took}s (log: $OUT/$name.log)"
}

: >"$OUT/steps.md"
if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "needs a CUDA GPU visible to torch" >&2
    exit 2
fi
HAVE_TRT=0
"$PYTHON" -c "import tensorrt" 2>/dev/null && HAVE_TRT=1
DRAFTER=models/checkpoints/smollm2-135m-instruct-dspark

step environment 15 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
    $PYTHON -c 'import torch, onnxruntime; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"onnxruntime\", onnxruntime.__version__)'; \
    $PYTHON -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)' || echo 'tensorrt: not installed'"
step fetch 45 "$PYTHON" cli.py fetch "$MODEL"
step cuda_tests 90 "$PYTHON" -m pytest -q -rs tests/test_cuda.py
step decode_bench_cuda 120 "$PYTHON" cli.py bench decode --target "$MODEL" --device cuda --dtype bfloat16 \
    --prompts heldout:4 --new-tokens 96 --config "checkpoint=$DRAFTER:7" --json-out "$OUT/decode_cuda.json"
step step_times_cuda 90 "$PYTHON" cli.py bench steps --model "$MODEL" --device cuda --runtime torch/bfloat16 \
    --runtime torch/float32 --context 128,512,1024,2048 --batch 16 --json-out "$OUT/steps_cuda.json"
if [ "$HAVE_TRT" -eq 1 ]; then
    step export_tensorrt 140 "$PYTHON" cli.py export --model "$MODEL" --to tensorrt --dtype float16 \
        --max-batch-size 16 --max-context 2048
    step parity_tests 160 "$PYTHON" -m pytest -q -rs tests/test_onnx_export.py
    step decode_bench 60 "$PYTHON" cli.py bench runtimes --model "$MODEL" --runtime torch --runtime tensorrt \
        --dtype float16 --device cuda --new-tokens 32 --json-out "$OUT/bench.json"
else
    echo "| tensorrt steps | skipped: TensorRT not installed | - |" >>"$OUT/steps.md"
fi

{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - START ))s)"
    echo
    echo '```'
    cat "$OUT/environment.log"
    echo '```'
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    cat "$OUT/steps.md"
    echo
    for name in cuda_tests decode_bench_cuda step_times_cuda parity_tests decode_bench; do
        [ -f "$OUT/$name.log" ] || continue
        echo "## $name"
        echo '```'
        grep -v 'prompt/s\]' "$OUT/$name.log" | tail -n 25
        echo '```'
        echo
    done
} >"$REPORT"
echo "report: $REPORT"
exit "$FAILED"
