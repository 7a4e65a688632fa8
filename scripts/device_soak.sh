#!/usr/bin/env bash
# On the GPU machine: the long soak of the reliability issue. scripts/soak.py drives a server of
# Qwen3-30B-A3B (dummy bf16 weights, 8 random rank-16 adapters on attention + experts, 4 slots,
# runtime loads confined to the adapters' directory) with mixed faulty traffic for DURATION s.
# The soak outlasts one device command (10 min), so it runs in its own process session:
#   setsid nohup scripts/device_soak.sh </dev/null >/tmp/soak.out 2>&1 &   # returns at once
#   scripts/device_soak.sh --wait 590    # a later call: waits for the end (at most 590 s),
#                                        # copies report, log and server log tail to $OUT
# Everything lives in $DIR until then. Needs .whl carried (scripts/prepare_device_wheels.sh).
# MEM_FRACTION (default 0.7) leaves GPU memory for other work on the machine meanwhile.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${SOAK_DIR:-/tmp/sglora-soak}
if [ "${1:-}" = --wait ]; then
    end=$(($(date +%s) + ${2:-590}))
    while [ ! -f "$DIR/done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    [ -f "$DIR/done" ] && echo "soak finished: exit $(cat "$DIR/done")" || echo "soak still running"
    tail -30 "$DIR/soak.log" 2>/dev/null
    mkdir -p "${OUT:-/tmp/out}"
    cp "$DIR"/soak_*.json "$DIR/soak.log" "${OUT:-/tmp/out}/" 2>/dev/null
    [ -f "$DIR/server_soak.log" ] && { head -40 "$DIR/server_soak.log" && echo ... &&
        tail -80 "$DIR/server_soak.log"; } >"${OUT:-/tmp/out}/server_soak.log"
    exit 0
fi
rm -rf "$DIR" && mkdir -p "$DIR"
OUT=$DIR PORT=${PORT:-30000} MODEL=${MODEL:-benchmarks/configs/qwen3-30b-a3b}
DURATION=${DURATION:-1800} WARMUP=${WARMUP:-300}
# shellcheck source=scripts/device_lib.sh
source scripts/device_lib.sh
finish() { stop_server; echo "${1:-1}" >"$DIR/done"; }
trap 'finish 1' EXIT
install_wheels || exit 2
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
SLUG=$(python3 -c "from sglora.bench_serving.server import device_slug; print(device_slug('$GPU'))")
TOK=$(python3 -c "from sglora.testing.tiny import tiny_model_path; print(tiny_model_path('qwen3_moe'))")
ADAPTERS=$(adapter_dir 8)
make_adapters "$ADAPTERS" 8 16 attn experts >>"$DIR/soak.log" 2>&1 || exit 1
specs=()
for i in $(seq 0 7); do specs+=("lora$i=$ADAPTERS/lora$i"); done
echo "[$(date -u +%T)] $GPU: starting the server" >>"$DIR/soak.log"
start_server soak --tokenizer-path "$TOK" --max-loras-per-batch 4 --max-lora-rank 16 \
    --lora-paths "${specs[@]}" --max-queued-requests 256 --lora-allowed-dirs "$ADAPTERS" \
    --mem-fraction-static "${MEM_FRACTION:-0.7}" >>"$DIR/soak.log" 2>&1 || exit 1
echo "[$(date -u +%T)] server ready; soak for $DURATION s" >>"$DIR/soak.log"
python3 scripts/soak.py --url "http://127.0.0.1:$PORT" --duration "$DURATION" --warmup "$WARMUP" \
    --concurrency 64 --max-tokens 128 --prompt-words 600 --out "$DIR/soak_$SLUG.json" >>"$DIR/soak.log" 2>&1
rc=$?
trap - EXIT
finish "$rc"
