#!/usr/bin/env bash
# On a multi-GPU machine: tensor parallelism on the GPU, everything copied to $OUT.
#   1. TP2 vs TP1 bf16 logprobs of mixed-adapter batches (scripts/tp_logprob_check.py)
#   2. the decode benchmark at TP=$TP (default 4) and TP2: Qwen3-30B-A3B dummy, bf16, modes
#      lora_disabled / nolora_batch / lora_8x_r16, input 1024; rows with a `tp` key in
#      $OUT/decode_rows.json (scripts/append_rows.py adds them to benchmarks/results/)
#   3. serving: the serving benchmark's scenario (b) (8 adapters, uniform) at TP=$TP
#      (needs `.whl` carried, see scripts/prepare_device_wheels.sh)
#   tune: the fused-MoE configs of one rank's expert shard at each TP in $TUNE_TPS (default
#      "2 4"), tuned side by side on GPUs 0, 1, ... and merged into
#      sglora/kernels/configs/moe_<device>.json (copied to $OUT) for the steps after it
#   tp1: the TP1 baseline on this host's GPU 0 (bs $BS2), for TP scaling measured side by side
#
#   collectives: scripts/bench_collectives.py on 2 and on $TP GPUs (NCCL against the one-shot
#      all-reduce through peers' memory, per decode size)
#
#   STEPS="check tp tp2" TP=4 BS="1 64 128 256 512" scripts/device_tp4_bench.sh
#   STEPS="tune tp1 tp2 tp" scripts/device_tp4_bench.sh
# Each step but serving (bounded by its BUDGET_S) is killed after STEP_TIMEOUT s (default 540),
# so one hung step cannot hold the machine for the others. BENCH_ARGS go to every
# bench_one_batch.py run, e.g. "--extra disable_custom_all_reduce=true".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SGLORA_CACHE_DIR=${SGLORA_CACHE_DIR:-$PWD/.cache/sglora}
OUT=${OUT:-/tmp/sglora-tp}
TP=${TP:-4}
STEPS=${STEPS:-check tp tp2}
BS=${BS:-1 64 128 256 512}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
FAMILIES=${FAMILIES:-qwen3_moe mixtral llama}
T="timeout -k 10 ${STEP_TIMEOUT:-540}"
for step in $STEPS; do
    start=$(date +%s)
    case $step in
    check)
        {
            CUDA_VISIBLE_DEVICES=0 $T python scripts/tp_logprob_check.py --save /tmp/tp1.json \
                --families $FAMILIES &&
                CUDA_VISIBLE_DEVICES=0,1 $T torchrun --nproc-per-node 2 scripts/tp_logprob_check.py \
                    --tp 2 --compare /tmp/tp1.json --families $FAMILIES
        } 2>&1 | grep -v "Loading\|warn" | tee "$OUT/tp_check.log"
        ;;
    tune)
        gpu=0
        for n in ${TUNE_TPS:-2 4}; do
            CUDA_VISIBLE_DEVICES=$gpu $T python scripts/tune_kernels.py --tp "$n" --jobs 12 \
                --out "$OUT/tune_tp$n.json" >"$OUT/tune_tp$n.log" 2>&1 &
            gpu=$((gpu + 1))
        done
        wait
        python - "$OUT"/tune_tp*.json <<'PY'
import json, sys
from sglora.kernels.moe_common import CONFIG_DIR, device_name
dst = CONFIG_DIR / f"moe_{device_name()}.json"
data = json.loads(dst.read_text()) if dst.exists() else {}
for path in sys.argv[1:]:
    data.update(json.loads(open(path).read()))
dst.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
print("configs:", sorted(data))
PY
        cp sglora/kernels/configs/moe_*.json "$OUT/"
        ;;
    tp1)
        # shellcheck disable=SC2086
        CUDA_VISIBLE_DEVICES=0 $T python scripts/bench_one_batch.py --batch-sizes ${BS2:-1 64 256} \
            --decode-steps "${STEPS_PER_BS:-8}" --input-len 1024 --out "$OUT/decode_rows.json" \
            ${BENCH_ARGS:-} 2>&1 | grep -v "Loading\|warn" | tee "$OUT/bench_tp1.log"
        ;;
    tp | tp2)
        n=$TP && [ "$step" = tp2 ] && n=2 && bs=${BS2:-1 64 256} || bs=$BS
        # shellcheck disable=SC2086
        $T torchrun --nproc-per-node "$n" scripts/bench_one_batch.py --tp "$n" --batch-sizes $bs \
            --decode-steps "${STEPS_PER_BS:-8}" --input-len 1024 --out "$OUT/decode_rows.json" \
            ${BENCH_ARGS:-} 2>&1 | grep -v "Loading\|warn" | tee "$OUT/bench_tp$n.log"
        ;;
    collectives)
        for n in $(printf "%s\n" 2 "$TP" | sort -un); do
            $T torchrun --nproc-per-node "$n" scripts/bench_collectives.py \
                --out "$OUT/collectives_tp$n.json" 2>&1 | grep -v "Warn\|warn\|\*\*\*" |
                tee "$OUT/collectives_tp$n.log"
        done
        ;;
    serving)
        SCENARIOS=b SERVER_ARGS="--tp-size $TP ${SERVER_ARGS:-}" OUT="$OUT/serving" bash scripts/device_serving.sh
        ;;
    esac
    echo "== $step: $(($(date +%s) - start)) s"
done
