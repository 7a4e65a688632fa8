#!/usr/bin/env bash
# On the GPU machine: the serving benchmark (python -m sglora.bench_serving) against sglora
# serving Qwen3-30B-A3B with dummy weights and random rank-16 adapters (attention + every
# expert), in four scenarios, each a sweep of request rates up to saturation (rate inf):
#   a  base only                          server 1 (64 adapter names, 8 slots)
#   b  8 adapters, uniform                server 1
#   c  64 adapters, Zipf(1.0), 20% base   server 1 (adapters rotate through the 8 slots)
#   d  256 adapters, uniform              server 2 (--max-loras-per-batch $D_SLOTS, rotating;
#                                         a list of slot counts runs a server each)
# Rows go to benchmarks/results/serving_<device>.json; that file, the PNG charts, the bench log
# and the servers' log tails are copied to $OUT.
#
# Needs the wheels the image lacks: run scripts/prepare_device_wheels.sh here first and carry
# `.whl`. Then, on the device:
#   scripts/device_serving.sh                      # all four, within BUDGET_S
#   SCENARIOS="a b" RATES="16 inf" scripts/device_serving.sh
# Adapter files: $DISTINCT distinct checkpoints, served under many names (the server parses each
# file once): 256 distinct rank-16 expert adapters would be 320 GB. Every name still gets its own
# slot load, so rotation costs what distinct adapters would.
# Everything is bounded by BUDGET_S: a scenario that would not finish in time is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-530}          # s, the whole script: start-ups, adapters and sweeps
SCENARIOS=${SCENARIOS:-a b c d}
RATES=${RATES:-8 32 inf}           # req/s for a, b, c
D_RATES=${D_RATES:-1 4 inf}        # d is bound by slot loads: lower rates
NUM_PROMPTS=${NUM_PROMPTS:-256}    # per rate (a, b, c); inf sends them all at once
D_NUM_PROMPTS=${D_NUM_PROMPTS:-64}
MAX_DURATION=${MAX_DURATION:-10}   # s: no request sent after this in a rate's run
DRAIN=${DRAIN:-30}                 # s after the last send before open requests are cancelled
INPUT_LEN=${INPUT_LEN:-512} OUTPUT_LEN=${OUTPUT_LEN:-128} LEN_RANGE=${LEN_RANGE:-0}
RANK=${RANK:-16} DISTINCT=${DISTINCT:-8} TARGETS=${TARGETS:-attn experts}
ABC_SLOTS=${ABC_SLOTS:-8} D_SLOTS=${D_SLOTS:-16} # D_SLOTS="8 16 32": a server each
# SERVER_ARGS: more server flags, e.g. "--tp-size 4" (scripts/device_tp4_bench.sh)
MODEL=${MODEL:-benchmarks/configs/qwen3-30b-a3b}
ADAPTERS=${ADAPTER_DIR:-}
PORT=${PORT:-30123}
SERVER_TIMEOUT=${SERVER_TIMEOUT:-420}
OUT=${OUT:-/tmp/sglora-serving}
mkdir -p "$OUT"

# shellcheck source=scripts/device_lib.sh
source scripts/device_lib.sh
install_wheels || exit 2
LOG="$OUT/bench.log"
log() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
GPU=${GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)}
SLUG=$(python3 -c "from sglora.bench_serving.server import device_slug; print(device_slug('$GPU'))")
RESULTS=${RESULTS:-benchmarks/results/serving_$SLUG.json}
# the tiny tokenizer (vocab 1024): prompts of exact lengths; dummy weights need no real one
TOK=$(python3 -c "from sglora.testing.tiny import tiny_model_path; print(tiny_model_path('qwen3_moe'))")
log "device $GPU, tokenizer $TOK, results $RESULTS"

[ -z "${ADAPTER_DIR:-}" ] && ADAPTERS=$(adapter_dir "$DISTINCT")
# shellcheck disable=SC2086
make_adapters "$ADAPTERS" "$DISTINCT" "$RANK" $TARGETS >>"$LOG" 2>&1 || exit 1
du -sh "$ADAPTERS" | tee -a "$LOG"
log "adapters ready"

start_server_with() { # $1: name, $2: adapter names, $3: slots
    local specs=() i
    for ((i = 0; i < $2; i++)); do specs+=("lora$i=$ADAPTERS/lora$((i % DISTINCT))"); done
    # shellcheck disable=SC2086
    start_server "$1" --tokenizer-path "$TOK" --served-model-name qwen3-30b-a3b \
        --max-loras-per-batch "$3" --max-lora-rank "$RANK" --lora-paths "${specs[@]}" ${SERVER_ARGS:-}
}
trap stop_server EXIT

bench() { # $1: label, $2: rates, $3: prompts, then more bench flags
    local label=$1 rates=$2 prompts=$3
    shift 3
    # shellcheck disable=SC2086
    timeout $(($(left) > 30 ? $(left) : 30)) python3 -m sglora.bench_serving --backend sglang \
        --base-url "http://127.0.0.1:$PORT" --tokenizer "$TOK" --device-name "$GPU" \
        --results "$RESULTS" --label "$label" --request-rate $rates --num-prompts "$prompts" \
        --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --input-range "$LEN_RANGE" \
        --output-range "$LEN_RANGE" --max-duration "$MAX_DURATION" --drain-timeout "$DRAIN" \
        --warmup-requests 8 --notes "scripts/device_serving.sh, rank $RANK $TARGETS, dummy" \
        "$@" 2>&1 | tee -a "$LOG"
}
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }
fits() { # $1: scenario, $2: rates, $3: s more; whether its sweep fits the time left
    local need=$((${3:-0} + $(wc -w <<<"$2") * (MAX_DURATION + DRAIN / 2 + 10)))
    [ "$(left)" -gt "$need" ] && return 0
    log "skipped $1: $(left) s left, it needs about $need s"
    return 1
}

if has a || has b || has c; then
    log "server 1: 64 adapter names, $ABC_SLOTS slots"
    if start_server_with abc 64 "$ABC_SLOTS"; then
        log "server 1 ready"
        has a && fits a "$RATES" && bench "a: base" "$RATES" "$NUM_PROMPTS"
        has b && fits b "$RATES" && bench "b: 8 uniform" "$RATES" "$NUM_PROMPTS" --num-adapters 8
        has c && fits c "$RATES" && bench "c: 64 zipf1 +20% base" "$RATES" "$NUM_PROMPTS" \
            --num-adapters 64 --adapter-dist zipf --zipf-alpha 1.0 --base-fraction 0.2
    else
        log "server 1 failed to start: see server_abc.log"
    fi
    stop_server
fi
for slots in $D_SLOTS; do # "8 16 32": one server each, as long as the budget lasts
    has d && fits "d with $slots slots" "$D_RATES" 90 || continue # 90: the server's start
    log "server 2: 256 adapter names, $slots slots"
    if start_server_with "d$slots" 256 "$slots"; then
        log "server 2 ready"
        bench "d: 256 uniform, $slots slots" "$D_RATES" "$D_NUM_PROMPTS" --num-adapters 256
    else
        log "server 2 failed to start: see server_d$slots.log"
    fi
    stop_server
done

cp "$RESULTS" "$OUT/" 2>/dev/null
if python3 -c "import matplotlib" 2>/dev/null; then
    python3 -m sglora.bench_serving.plot "$RESULTS" --out-dir "$OUT" | tee -a "$LOG"
else
    log "no matplotlib here: plot at home with python -m sglora.bench_serving.plot $RESULTS"
fi
for f in "$OUT"/server_*.log; do # the start-up and the end are what matter
    [ -f "$f" ] && { head -60 "$f" && echo ... && tail -60 "$f"; } >"$f.tail" && mv "$f.tail" "$f"
done
log "done in $(($(date +%s) - T0)) s"
