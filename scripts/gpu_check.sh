#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and TensorRT (the docker/ image, or a CUDA host with
# `pip install -e . tensorrt-cu12`), export SmolLM2, build its TensorRT engines, run the TensorRT
# and ONNX parity tests and the decode benchmark (TensorRT fp16 vs torch on the same GPU), and
# write a short report. Every step has its own time limit; the whole run stays under 8 minutes.
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
if ! "$PYTHON" -c "import tensorrt, torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "needs TensorRT and a CUDA GPU visible to torch (use the docker/ image)" >&2
    exit 2
fi

step environment 15 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
    $PYTHON -c 'import tensorrt, torch, onnxruntime; print(\"tensorrt\", tensorrt.__version__, \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"onnxruntime\", onnxruntime.__version__)'"
step fetch 45 "$PYTHON" cli.py fetch "$MODEL"
step export_tensorrt 140 "$PYTHON" cli.py export --model "$MODEL" --to tensorrt --dtype float16 \
    --max-batch-size 16 --max-context 2048
step parity_tests 160 "$PYTHON" -m pytest -q -rs tests/test_onnx_export.py
step decode_bench 60 "$PYTHON" cli.py bench runtimes --model "$MODEL" --runtime torch --runtime tensorrt \
    --dtype float16 --device cuda --new-tokens 32 --json-out "$OUT/bench.json"

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
    echo "## Parity tests"
    echo '```'
    tail -n 15 "$OUT/parity_tests.log"
    echo '```'
    echo
    echo "## Decode benchmark (greedy, batch 1)"
    echo '```'
    tail -n 12 "$OUT/decode_bench.log"
    echo '```'
} >"$REPORT"
echo "report: $REPORT"
exit "$FAILED"
