#!/usr/bin/env bash
# Train DSpark drafters on one CUDA host that reaches no registry, inside a fixed time budget.
# The host needs this checkout, torch with CUDA, and the gguf package; it fetches nothing: the
# target comes in as a copy of its GGUF file (checked against the pinned SHA-256), the prompts as
# the files `cli.py prompts --out DIR` writes, and the target answers them there (data generated
# where the GPU is). Only the checkpoints come back: each run's drafter directory as a tarball in
# pieces of at most 15 MiB (join with `cat NAME.tar.part* | tar x`), plus one report.
#
#   bash scripts/gpu_train.sh GGUF PROMPTS_DIR OUT [BUDGET_S]
#
# BUDGET_S (default 540) bounds the whole script: data generation stops at GEN_S and trains on the
# shards done by then; the training runs share the GPU in parallel and get what is left, less a
# reserve for loading the data, calibrating and packing. Measured on one H200 (SmolLM2-135M):
# 7.3-7.9 answers/s at batch 512 x 512 tokens, so 200 s answer ~1,300 prompts; two drafters
# training side by side ran 12 and 9 steps/s (2 and 4 layers, 16 x 256 blocks a step); loading
# ~1,300 answers into each run took over 100 s, hence the reserve. Environment (defaults in brackets):
#   MODEL [smollm2-135m-instruct]  DEVICE [cuda]  TEMPS [0,0.7,1] answer temperatures, one answer each
#   NEW_TOKENS [512]  GEN_BATCH [512]  GEN_S [200]  RESERVE_S [200]
#   RUNS ["l2:2:1024 l4:4:1536"] name:layers:FFN of each drafter trained
#   TRAIN_ARGS [--batch-size 16 --anchors 256 --lr 2e-3 --eval-every 200 --checkpoint-every 100]
set -euo pipefail
cd "$(dirname "$0")/.."

GGUF=$1 PROMPTS=$2 OUT=$3 BUDGET=${4:-540}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-smollm2-135m-instruct}
DEVICE=${DEVICE:-cuda}
TEMPS=${TEMPS:-0,0.7,1}
NEW_TOKENS=${NEW_TOKENS:-512}
GEN_BATCH=${GEN_BATCH:-512}
GEN_S=${GEN_S:-200}
RESERVE_S=${RESERVE_S:-200}
RUNS=${RUNS:-"l2:2:1024 l4:4:1536"}
TRAIN_ARGS=${TRAIN_ARGS:-"--batch-size 16 --anchors 256 --lr 2e-3 --eval-every 200 --checkpoint-every 100"}
export DSPARK_CACHE_DIR=${DSPARK_CACHE_DIR:-/tmp/dspark-cache}
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
WORK=$(mktemp -d)
mkdir -p "$OUT"
REPORT="$OUT/report.log"
DATA=(--target "$MODEL" --prompts-dir "$PROMPTS" --max-new-tokens "$NEW_TOKENS" --answer-temperatures "$TEMPS"
      --generation-batch "$GEN_BATCH")

note() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$REPORT"; }

note "host: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no nvidia-smi)"
"$PYTHON" cli.py fetch "$MODEL" --gguf "$GGUF" >"$WORK/fetch.log" 2>&1 || { tail -20 "$WORK/fetch.log" >>"$REPORT"; exit 1; }
note "model installed and converted"

rc=0
timeout "$GEN_S" "$PYTHON" cli.py train-data "${DATA[@]}" --device "$DEVICE" >"$WORK/data.log" 2>&1 || rc=$?
tr '\r' '\n' <"$WORK/data.log" | grep -v '^\s*$' | tail -4 >>"$REPORT"
[ "$rc" -eq 0 ] && note "data complete" || note "data generation stopped (rc $rc); training on the shards done"

minutes=$("$PYTHON" -c "print(max(0.5, ($DEADLINE - $RESERVE_S - $(date +%s)) / 60))")
note "training ${RUNS} in parallel for $minutes minutes each"
pids=()
for run in $RUNS; do
    IFS=: read -r name layers ffn <<<"$run"
    # shellcheck disable=SC2086
    "$PYTHON" cli.py train --drafter dspark "${DATA[@]}" --device "$DEVICE" --no-generate --max-minutes "$minutes" \
        --layers "$layers" --intermediate-size "$ffn" --export-bf16 --out "$WORK/$name" $TRAIN_ARGS \
        >"$WORK/$name.log" 2>&1 &
    pids+=($!)
done
# Past the deadline a run is stopped; its last periodic checkpoint still comes back (uncalibrated).
left=$((DEADLINE - 15 - $(date +%s)))
( sleep $((left > 0 ? left : 0)); kill "${pids[@]}" 2>/dev/null ) &
watchdog=$!
for pid in "${pids[@]}"; do wait "$pid" || note "a run ended with rc $?"; done
kill "$watchdog" 2>/dev/null || true

for run in $RUNS; do
    name=${run%%:*}
    { echo "== $name"; tr '\r' '\n' <"$WORK/$name.log" | grep -E '^\{"step"|Error|error' | tail -30
      tr '\r' '\n' <"$WORK/$name.log" | grep -E 'it/s|s/it' | tail -1; } >>"$REPORT"
    [ -f "$WORK/$name/model.safetensors" ] || continue
    "$PYTHON" - "$WORK/$name/model.safetensors" <<'PY'  # a stopped run's checkpoint is fp32: halve it too
import sys, torch
from safetensors.torch import load_file, save_file
path = sys.argv[1]
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()}, path)
PY
    tar -C "$WORK/$name" -cf - --exclude training_state.pt --exclude .dspark-train --exclude '.*.tmp' . | split -b 15M -d - "$OUT/$name.tar.part"
done
note "done"
